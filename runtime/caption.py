"""python -m runtime.caption IMAGE|VIDEO [...]: one caption per image, or per interval of a
video file, network stream or camera (`--every`); with --question, the answer to it (visual
question answering, on a model that takes questions).

Exit status: 0 when every input was captioned, 1 when any failed (an image that does not
decode, a stream that broke or ended early; the other results are still printed), 2 for
usage errors (bad option, unusable model package or provider).
"""

import argparse
import itertools
import json
import logging
import sys
import warnings
from pathlib import Path

import onnxruntime as ort

from .cli import USAGE_ERRORS, add_asking_options, add_model_options, expand, open_captioner
from .engine import Caption, Captioner
from .answers import draw
from .preprocess import DEFAULT_MAX_PIXELS, ImageError, open_image
from .stream import Stream, StreamError, VttWriter, is_stream, require_av


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.caption", description="Caption images on the edge.")
    parser.add_argument("images", nargs="+", metavar="IMAGE|VIDEO",
                        help="image files, folders of images, video files, rtsp:// URLs, /dev/videoN cameras, "
                             "or - for a video stream on stdin")
    add_model_options(parser)
    add_asking_options(parser)
    parser.add_argument("--beams", type=int, default=None, help="beam width (default: the model's, greedy)")
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None,
                        help="sample with this temperature (0: greedy, the default; above 0 takes one beam)")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of this probability")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same sampled text")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse larger images before decoding them (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--max-batch", type=int, default=8, help="TensorRT profile bound on images x beams")
    parser.add_argument("--every", type=float, default=1.0, metavar="SECONDS",
                        help="caption one video frame per interval (default 1)")
    parser.add_argument("--vtt", type=Path, default=None, metavar="FILE",
                        help="also write the captions of the one video input as WebVTT subtitles")
    parser.add_argument("--draw", type=Path, default=None, metavar="DIR",
                        help="write each image with its task's boxes and polygons drawn to DIR (Florence-2)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--stream", action="store_true",
                        help="print each image's text as it is generated (greedy; a beam search's when it ends)")
    parser.add_argument("--verbose", action="store_true", help="also say which providers this onnxruntime lacks")
    return parser


def report(c: Caption, as_json: bool, time: float | None = None) -> None:
    """One result on stdout (an error on stderr unless --json); `time` for a video frame."""
    at = {} if time is None else {"time": round(time, 3)}
    if as_json:
        asked = {**({} if c.task is None else {"task": c.task}), **({} if c.question is None else {"question": c.question})}
        answer = {} if c.question is None else {"answer": c.text}
        record = {"image": c.image, **at, **asked, "error": c.error} if c.error else \
            {"image": c.image, **at, **asked, "caption": c.text, **answer,
             **({} if c.result is None else {"result": c.result}), "tokens": c.tokens, "ms": round(c.ms, 2)}
        print(json.dumps(record), flush=True)
    elif c.error:
        print(f"error: {c.error}", file=sys.stderr, flush=True)
    else:
        print(f"{c.image}{'' if time is None else f'@{time:.2f}s'}: {c.text}", flush=True)


def stream_text(captioner: Captioner, image: str, cfg: dict) -> bool:
    """`image: ` and its text piece by piece as it is generated; False (after one error line) if it failed."""
    try:
        pieces = captioner.stream(image, **{k: v for k, v in cfg.items() if k not in ("num_beams", "length_penalty")})
        first = next(pieces, "")  # the image is read and encoded here: its error comes before any output
        print(f"{image}: {first}", end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print(flush=True)
        return True
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return False


def caption_stream(captioner: Captioner, source: str, cfg: dict, every: float, as_json: bool,
                   vtt: VttWriter | None) -> bool:
    """Captions a video source frame by frame as it decodes; False when it failed, after
    printing (and adding to `vtt`, which it closes) every caption made before the failure."""
    stream = None
    try:
        stream = Stream(source, every)
        with stream:
            for t, frame in stream:
                c = captioner.caption([frame], **cfg)[0]
                c.image = source
                report(c, as_json, t)
                if vtt and not c.error:
                    vtt.add(t, c.text)
        return True
    except StreamError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return False
    finally:
        if vtt:
            vtt.close(stream.end if stream else 0.0)
        if stream and stream.skipped:
            print(f"{source}: skipped {stream.skipped} undecodable packet(s)", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Hostile files make Pillow warn (bogus TIFF tags, huge headers) in multi-line form;
    # the one-line error per failed image is the CLI's whole report.
    warnings.filterwarnings("ignore", module="PIL")
    logging.basicConfig(format="%(message)s")  # e.g. "building TensorRT engine, once", before the wait
    ort.set_default_logger_severity(4)  # provider failures come as our one-line notes; doctor shows the detail
    try:
        if args.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if not args.every > 0:
            raise ValueError("--every must be a positive number of seconds")
        if args.stream and (args.json or any(map(is_stream, args.images))):
            raise ValueError("--stream prints images' text as it comes: not with --json or video inputs")
        if args.vtt and sum(map(is_stream, args.images)) != 1:
            raise ValueError("--vtt writes the subtitles of one video input; give exactly one")
        if any(map(is_stream, args.images)):
            require_av()
        captioner = open_captioner(args, max_pixels=args.max_pixels, max_batch=args.max_batch)
        cfg = dict(max_new_tokens=args.max_tokens, num_beams=args.beams, length_penalty=args.length_penalty,
                   question=args.question, task=args.task, text=args.text, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        captioner.generation_config(**cfg)  # reject bad options before any image is read
        if args.draw:
            if captioner.manifest.prompting.tasks is None:
                raise ValueError("--draw draws the boxes and polygons of a task; this model has no tasks")
            args.draw.mkdir(parents=True, exist_ok=True)
        vtt = VttWriter(args.vtt, args.every) if args.vtt else None
    except (*USAGE_ERRORS, StreamError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    for note in captioner.info * args.verbose + captioner.notes:
        print(note, file=sys.stderr)
    beams = captioner.generation_config(**cfg).num_beams
    if args.batch_size > (per_pass := captioner.images_per_pass(beams)):
        print(f"batch size {args.batch_size} x {beams} beams is over --max-batch {args.max_batch}: "
              f"{per_pass} image(s) per forward pass", file=sys.stderr)
    failed = 0
    try:
        for video, group in itertools.groupby(args.images, key=is_stream):
            if video:
                failed += sum(not caption_stream(captioner, s, cfg, args.every, args.json, vtt) for s in group)
                continue
            images = expand(list(group))
            if args.stream:
                failed += sum(not stream_text(captioner, image, cfg) for image in images)
                continue
            for start in range(0, len(images), args.batch_size):
                for c in captioner.caption(images[start : start + args.batch_size], batch_size=args.batch_size, **cfg):
                    failed += c.error is not None
                    report(c, args.json)
                    if args.draw and c.error is None:
                        drawn = args.draw / f"{Path(c.image).stem}.png"
                        draw(open_image(c.image, args.max_pixels), c.result).save(drawn)
    except KeyboardInterrupt:  # the way a camera or live stream is stopped: keep what was written
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
