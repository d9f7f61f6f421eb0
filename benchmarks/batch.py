"""python -m benchmarks.batch [--rounds N] [--crops N]

Batch captioning on this machine, whole processes timed end to end (what a user waits for), in
interleaved rounds (A B C D A B C D ...), medians: the plain CLI over a folder (one image per pass,
and `--batch-size 16`), and `python -m runtime.batch` on local Ray with 1 and 2 actors (its own
images/s, without Ray's start, from its summary line, beside the wall time). The input is the
held-out photos whole plus seeded crops, written as PNG files.

Also measured, for the projection to GPU nodes: the CPU time to decode and preprocess one image
(the part of the work that stays on the CPU when the graphs run on a GPU), for the 400-pixel
held-out photos and for a 12-megapixel camera JPEG.

Writes benchmarks/results/batch-cpu.{json,md}.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from export.evaluation import heldout_images, heldout_photos
from runtime.engine import DEFAULT_MODEL
from runtime.manifest import load_manifest
from runtime.preprocess import load_pixels

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parent.parent


def timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
    """Wall seconds of a whole process, and its stderr (which must say it succeeded)."""
    start = time.perf_counter()
    r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start, r.stderr


def decode_ms(path: Path, spec: dict, repeats: int = 20) -> float:
    """Median ms to open, decode, resize and normalise one image file, on one core."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_pixels(path, spec)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--crops", type=int, default=23, help="crops per held-out photo (39 x (1 + crops) images)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batch", dir="/tmp") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        images = heldout_images(tmp / "in", crops=args.crops)
        env = {**os.environ, "RAY_TMPDIR": str(tmp)}
        variants = {
            "cli, batch 1": lambda out: [sys.executable, "-m", "runtime.caption", str(tmp / "in"), "--json"],
            "cli, batch 16": lambda out: [sys.executable, "-m", "runtime.caption", str(tmp / "in"), "--json",
                                          "--batch-size", "16"],
            "ray, 1 actor": lambda out: [sys.executable, "-m", "runtime.batch", str(tmp / "in"), "--out", out],
            "ray, 2 actors": lambda out: [sys.executable, "-m", "runtime.batch", str(tmp / "in"), "--out", out,
                                          "--actors", "2"],
        }
        walls, inner = {k: [] for k in variants}, {k: [] for k in variants if k.startswith("ray")}
        for r in range(args.rounds):
            for name, command in variants.items():
                seconds, err = timed(command(str(tmp / f"out-{r}-{name[-7:].strip()}")), env)
                walls[name].append(seconds)
                if name in inner:
                    inner[name].append(float(re.search(r"s, ([\d.]+) images/s;", err).group(1)))
                print(f"round {r}: {name}: {seconds:.1f} s", flush=True)
        spec = load_manifest(DEFAULT_MODEL).preprocess
        camera = tmp / "camera.jpg"
        Image.open(heldout_photos()[0]).convert("RGB").resize((4000, 3000)).save(camera, quality=90)
        decode = {"heldout_400px": round(decode_ms(Path(images[0]), spec), 2),
                  "camera_12mpx": round(decode_ms(camera, spec, repeats=5), 1)}
    rows = []
    for name in variants:
        wall = statistics.median(walls[name])
        rows.append({"variant": name, "wall_s": round(wall, 2), "images_per_s_wall": round(len(images) / wall, 1),
                     "images_per_s_in_job": round(statistics.median(inner[name]), 1) if name in inner else None})
    result = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "images": len(images),
              "rounds": args.rounds, "variants": rows, "decode_preprocess_ms": decode}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Batch captioning, {len(images)} held-out images (400 px PNG) on {result['machine']}, bundled model "
             f"(int8), whole processes, medians of {args.rounds} interleaved rounds.", "",
             "| variant | wall s | images/s (wall) | images/s (in the job, after Ray starts) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['wall_s']} | {r['images_per_s_wall']} | {r['images_per_s_in_job'] or ''} |"
              for r in rows]
    lines += ["", f"Decode + preprocess on one core: {decode['heldout_400px']} ms per 400-pixel photo, "
                  f"{decode['camera_12mpx']} ms per 12-megapixel camera JPEG."]
    (RESULTS / "batch-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
