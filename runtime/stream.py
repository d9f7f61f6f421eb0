"""Video files, network streams and cameras as inputs: one frame per interval, decoded by
PyAV (FFmpeg's libraries, shipped in its wheel; the `video` extra).

A source is a video file, an rtsp:// (or other FFmpeg network) URL, a V4L2 camera
(/dev/videoN) or `-`, a stream piped on stdin (e.g. from a GStreamer pipeline). Times are
seconds from the first frame of the stream, as a player shows them.
"""

import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi", ".ts", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp"}
NETWORK = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
READ_TIMEOUT_S = 10.0  # a live source that sends nothing for this long has broken


class StreamError(Exception):
    """A stream that cannot be opened, or that broke or ended early; one line naming it."""


def is_stream(arg: str) -> bool:
    return arg == "-" or arg.startswith(NETWORK) or arg.startswith("/dev/video") \
        or Path(arg).suffix.lower() in VIDEO_SUFFIXES


def is_live(arg: str) -> bool:
    """Live sources have no end: one that stops sending is an error, not the end of a file.
    (A pipe on stdin ends when its writer closes it, like a file.)"""
    return arg.startswith(NETWORK) or arg.startswith("/dev/video")


def require_av():
    try:
        import av
    except ImportError:
        raise StreamError("video input needs PyAV: pip install 'edgecap[video]'") from None
    return av


class Stream:
    """Iterating gives (time, HxWx3 uint8 RGB frame): the first decodable frame at or after
    each multiple of `every` seconds. Packets that do not decode (a corrupted stretch) are
    skipped and counted in `skipped`; the iteration raises StreamError when the source breaks,
    a live one ends, or a file ends before the duration its header declares (truncated)."""

    def __init__(self, source: str, every: float):
        if not every > 0:
            raise ValueError("--every must be a positive number of seconds")
        av = require_av()
        self.source, self.every, self.skipped, self.live = source, every, 0, is_live(source)
        self.end = 0.0  # where the frames decoded so far end, in seconds
        if source != "-" and not self.live and not Path(source).is_file():
            raise StreamError(f"{source}: no such file")
        try:
            self._container = av.open(sys.stdin.buffer if source == "-" else source,
                                      format="v4l2" if source.startswith("/dev/video") else None,
                                      container_options={"rtsp_transport": "tcp"} if source.startswith("rtsp") else {},
                                      timeout=READ_TIMEOUT_S if self.live else None)
        except av.FFmpegError as e:
            raise StreamError(f"{source}: cannot open: {e.strerror}") from None
        if not self._container.streams.video:
            self._container.close()
            raise StreamError(f"{source}: has no video stream")
        self._video = self._container.streams.video[0]
        self._video.thread_type = "AUTO"  # frame threads: decoding runs while a frame is captioned

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._container.close()

    def __iter__(self) -> Iterator[tuple[float, np.ndarray]]:
        av, due, origin, t = require_av(), 0.0, None, 0.0
        try:
            for packet in self._container.demux(self._video):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    self.skipped += 1
                    continue
                for frame in frames:
                    if frame.time is None:
                        continue
                    if origin is None:
                        origin = frame.time
                    t = frame.time - origin
                    self.end = t + (float(frame.duration * frame.time_base) if frame.duration else 0.0)
                    if t >= due - 1e-6:
                        yield t, frame.to_ndarray(format="rgb24")
                        due = (math.floor(t / self.every + 1e-6) + 1) * self.every
        except av.FFmpegError as e:
            raise StreamError(f"{self.source}: broke after {t:.2f} s: {e.strerror}") from None
        if self.live:
            raise StreamError(f"{self.source}: ended after {t:.2f} s")
        # A cut file keeps the duration its header declared (Matroska, WebM, MP4 with the index first).
        declared = self._container.duration / 1e6 if self._container.duration else None
        frame_s = 1 / float(self._video.average_rate) if self._video.average_rate else 0.0
        if declared and t + 2 * frame_s < declared - (origin or 0.0):
            raise StreamError(f"{self.source}: ended after {t:.2f} s of the {declared:.2f} s it declares (truncated?)")


def vtt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


class VttWriter:
    """WebVTT subtitles, one cue per caption, lasting until the next caption (the last one
    `every` seconds, or to the end of the stream if that comes first). Each cue is written as soon as its end is known, so a stream that
    breaks still leaves a valid file with every caption made so far."""

    def __init__(self, path: Path, every: float):
        self.file, self.every, self.pending = open(path, "w", encoding="utf-8"), every, None
        self.file.write("WEBVTT\n")

    def add(self, t: float, text: str) -> None:
        self._flush(t)
        self.pending = (t, text)

    def _flush(self, end: float) -> None:
        if self.pending:
            start, text = self.pending
            # A cue's text cannot hold a blank line or "-->"; a caption has neither, but a model's may.
            text = " ".join(text.replace("-->", "->").split())
            self.file.write(f"\n{vtt_time(start)} --> {vtt_time(end)}\n{text}\n")
            self.file.flush()

    def close(self, end: float) -> None:
        if self.pending:
            start = self.pending[0]
            self._flush(min(start + self.every, end) if end > start else start + self.every)
        self.file.close()
