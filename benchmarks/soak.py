"""python -m benchmarks.soak [--images 2000] [--every 100] [--json OUT]

Captions many generated images (a mix of sizes, modes and file formats, a few broken)
in one process and records the resident set size every `--every` images. Memory must
plateau: growth after the first 200 images under 5%.
"""

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from runtime import Captioner

RESULTS = Path(__file__).parent / "results"
MODES = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]
FORMATS = {"RGB": "JPEG", "L": "PNG", "RGBA": "PNG", "P": "GIF", "CMYK": "JPEG", "I;16": "PNG"}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no /proc/self/status: RSS is only measured on Linux")


def make_image(i: int, rng: np.random.Generator) -> bytes:
    """Image i: smooth colour fields plus noise at a random size (a few beyond the aspect
    limit), in one of the modes; every 50th is truncated, so the error path is soaked too."""
    h, w = int(rng.integers(16, 1200)), int(rng.integers(16, 1200))
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * rng.integers(1, 4)) % 256, (y * rng.integers(1, 4)) % 256, (x + y) % 256], -1)
    array = (base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8)
    mode = MODES[i % len(MODES)]
    image = Image.fromarray(array)
    image = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257) if mode == "I;16" else image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, FORMATS[mode])
    data = buf.getvalue()
    return data[: len(data) // 2] if i % 50 == 49 else data


def soak(n: int, every: int) -> dict:
    captioner = Captioner(provider="cpu")
    rng = np.random.default_rng(0)
    samples, failed, start = [], 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            path = Path(tmp) / f"img{i % 10}"
            path.write_bytes(make_image(i, rng))
            failed += captioner.caption([path])[0].error is not None
            if (i + 1) % every == 0:
                samples.append({"images": i + 1, "rss_mib": round(rss_mib(), 1)})
                print(f"soak: {i + 1}/{n} images, RSS {samples[-1]['rss_mib']} MiB", file=sys.stderr, flush=True)
    return {"images": n, "failed_as_expected": failed, "seconds": round(time.perf_counter() - start, 1),
            **summarize(samples), "samples": samples}


def summarize(samples: list[dict]) -> dict:
    """RSS swings with each image's decode buffers, so a leak is judged by the trend:
    the least-squares slope over the samples after the first 200 images, extrapolated
    over that span, relative to the RSS at 200. The raw max is reported beside it."""
    later = [s for s in samples if s["images"] >= 200] or samples
    x, y = np.array([s["images"] for s in later], float), np.array([s["rss_mib"] for s in later])
    slope = np.polyfit(x, y, 1)[0] if len(later) > 1 else 0.0
    return {"rss_at_200_mib": later[0]["rss_mib"], "rss_max_after_200_mib": float(y.max()),
            "rss_final_mib": samples[-1]["rss_mib"], "max_over_200": round(float(y.max() / y[0] - 1), 4),
            "trend_growth_after_200": round(float(slope * (x[-1] - x[0]) / y[0]), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, help="write here instead of benchmarks/results/soak.json")
    args = parser.parse_args(argv)
    result = soak(args.images, args.every)
    out = args.json or RESULTS / "soak.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "plateau" if result["trend_growth_after_200"] < 0.05 else "GROWING"
    print(f"soak: {result['images']} images in {result['seconds']} s ({result['failed_as_expected']} refused: truncated or too elongated), "
          f"RSS {result['rss_at_200_mib']} MiB at 200, final {result['rss_final_mib']} MiB, "
          f"trend {result['trend_growth_after_200']:+.1%} ({verdict}), max {result['max_over_200']:+.1%} (noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
