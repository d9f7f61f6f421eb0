"""Video files, piped streams and cameras: `python -m runtime.caption VIDEO --every S` captions
one frame per interval at the right times, writes valid WebVTT, keeps what it captioned when
a stream is cut, and skips a corrupted stretch. Videos are generated here with PyAV."""

import json
import re

import av
import numpy as np
import pytest
from PIL import Image

from helpers import caption_without_torch, photos, write_video
from runtime import Captioner

NAMES = ["chelsea", "coffee", "astronaut", "rocket", "motorcycle", "camera"]


@pytest.fixture(scope="module")
def segments() -> list[np.ndarray]:
    """Six real photos at 320x240, one per second of video."""
    return [np.asarray(Image.fromarray(photos()[n]).convert("RGB").resize((320, 240))) for n in NAMES]


@pytest.fixture(scope="module")
def expected(segments) -> list[str]:
    """The CLI's model (int8 on the CPU) on each second's frame, as an image."""
    return [c.text for c in Captioner(provider="cpu").caption(segments)]


@pytest.fixture(scope="module")
def videos(tmp_path_factory, segments) -> dict:
    folder = tmp_path_factory.mktemp("videos")
    return {"lossless": write_video(folder / "lossless.mkv", segments, "ffv1"),
            "h264": write_video(folder / "h264.mkv", segments, "libx264")}


def records(r) -> list[dict]:
    return [json.loads(line) for line in r.stdout.splitlines()]


def cues(vtt: str) -> list[tuple[str, str, str]]:
    """(start, end, text) of every cue of a WebVTT file, which must be well-formed."""
    header, *blocks = vtt.split("\n\n")
    assert header == "WEBVTT"
    found = []
    for block in blocks:
        timing, text = block.strip("\n").split("\n")
        start, end = re.fullmatch(r"(\d\d:\d\d:\d\d\.\d\d\d) --> (\d\d:\d\d:\d\d\.\d\d\d)", timing).groups()
        assert start < end
        found.append((start, end, text))
    return found


def test_decoded_frames_are_the_pixels_written(videos, segments):
    """The premise of the exact checks below: the lossless video gives back the photos."""
    with av.open(str(videos["lossless"])) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 60
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, segments[i // 10])


def test_one_caption_per_interval_at_its_time_with_webvtt(videos, expected, tmp_path):
    vtt = tmp_path / "captions.vtt"
    r = caption_without_torch(videos["lossless"], "--every", "1", "--json", "--vtt", vtt)
    assert r.returncode == 0, r.stderr
    got = records(r)
    assert [(g["image"], g["time"]) for g in got] == [(str(videos["lossless"]), float(t)) for t in range(6)]
    assert [g["caption"] for g in got] == expected
    assert cues(vtt.read_text()) == [(f"00:00:0{t}.000", f"00:00:0{t + 1}.000", expected[t]) for t in range(6)]


def test_intervals_that_do_not_fall_on_segment_starts(videos, expected):
    r = caption_without_torch(videos["lossless"], "--every", "2.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{videos['lossless']}@{t:.2f}s: {expected[int(t)]}" for t in (0, 2.5, 5)]


def test_a_truncated_copy_keeps_the_captions_before_the_cut(videos, tmp_path):
    full = caption_without_torch(videos["h264"], "--json")
    assert full.returncode == 0, full.stderr
    data = videos["h264"].read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    vtt = tmp_path / "cut.vtt"
    r = caption_without_torch(cut, "--json", "--vtt", vtt)
    assert r.returncode == 1
    got = records(r)
    assert 1 <= len(got) < 6
    assert [g["caption"] for g in got] == [g["caption"] for g in records(full)][: len(got)]
    assert [text for _, _, text in cues(vtt.read_text())] == [g["caption"] for g in got]
    assert re.fullmatch(rf"error: {cut}: ended after \d+\.\d\d s of the 6\.00 s it declares \(truncated\?\)\n", r.stderr)


def test_a_corrupted_stretch_is_skipped(videos, expected, tmp_path):
    data = bytearray(videos["lossless"].read_bytes())
    at = len(data) * 4 // 10  # at the start of the third second: frames of 60 KB, one destroyed
    data[at : at + 65536] = np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes()
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(bytes(data))
    r = caption_without_torch(broken, "--json")
    assert r.returncode == 0, r.stderr
    got = records(r)
    times = [g["time"] for g in got]
    # The frame due at 2 s is gone; the next one that decodes stands for that second.
    assert times[:2] == [0.0, 1.0] and 2 < times[2] < 3 and times[3:] == [3.0, 4.0, 5.0]
    assert [g["caption"] for g in got] == expected
    assert re.fullmatch(rf"{broken}: skipped \d+ undecodable packet\(s\)\n", r.stderr)


def test_a_stream_piped_on_stdin(segments, expected, tmp_path):
    """What a GStreamer pipeline ending in `y4menc ! fdsink` (README, Jetson cameras) sends."""
    y4m = tmp_path / "camera.y4m"
    with av.open(str(y4m), "w", format="yuv4mpegpipe") as c:
        s = c.add_stream("rawvideo", rate=5)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        for frame in segments[:3]:
            for _ in range(5):
                c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    r = caption_without_torch("-", "--every", "1", "--json", stdin=y4m.read_bytes())
    assert r.returncode == 0, r.stderr
    assert [(g["image"], g["time"]) for g in records(r)] == [("-", 0.0), ("-", 1.0), ("-", 2.0)]


def test_sources_that_do_not_open_fail_alone(videos, photo_paths, expected):
    """Each failed source is one line and exit 1; the inputs around it are still captioned."""
    r = caption_without_torch("missing.mp4", "rtsp://127.0.0.1:9/none", "/dev/video99", photo_paths["chelsea"],
                              videos["lossless"], "--every", "3")
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["error: missing.mp4: no such file",
                                     "error: rtsp://127.0.0.1:9/none: cannot open: Connection refused",
                                     "error: /dev/video99: cannot open: No such file or directory"]
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{photo_paths['chelsea']}: ")
    assert lines[1:] == [f"{videos['lossless']}@{t:.2f}s: {expected[t]}" for t in (0, 3)]


@pytest.mark.parametrize("args, message", [
    (["a.mp4", "b.mkv", "--vtt", "x.vtt"], "--vtt writes the subtitles of one video input; give exactly one"),
    (["a.mp4", "--every", "0"], "--every must be a positive number of seconds"),
    (["a.mp4", "--vtt", "/nonexistent/x.vtt"], "cannot write /nonexistent/x.vtt: No such file or directory"),
])
def test_usage_errors(args, message):
    r = caption_without_torch(*args)
    assert (r.returncode, r.stderr) == (2, f"error: {message}\n")


def test_video_without_pyav_says_which_extra(videos):
    r = caption_without_torch(videos["h264"], absent=("av",))
    assert (r.returncode, r.stderr) == (2, "error: video input needs PyAV: pip install 'edgecap[video]'\n")
