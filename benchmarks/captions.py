"""python -m benchmarks.captions --baseline PKG [--baseline-int8 PKG] [--package NAME=PKG ...]

The bundled model as a new user meets it: captions of photos that no step of training, tuning or
quantization opened (benchmarks/photos/: people, several objects, scenes, single objects) and of the
runtime's samples (for regressions), by the bundled packages (FP32 and INT8) and by a baseline
package (the previous default). Each caption carries the judgement a person wrote after looking at
the photo, kept in benchmarks/photos/judged.json by photo and caption text:
- true: everything named is in the photo, and the photo's people (when a face is visible) and main
  object are named (a hedge "perhaps X or Y" is true when X is);
- partly: everything named is in the photo, but a person or a main object goes unnamed, or only a
  hedge's second choice is right;
- wrong: the caption names something the photo does not show as its subject.
A caption nobody has judged yet shows as "?" (the table then says so: judge it, rerun). Photos
judged with an "added" label (a batch: its date, and which batch of the day) were first captioned
after the model they were added to test was fixed; the summary counts each batch apart, and the photos
read before (weighed in the model's changes) apart from them. A batch is fresh for one model only:
once read, it weighs in the next change.
Also the vision graph's ms per image (current vs baseline, interleaved medians, 2 threads) and the
packages' sizes.

Writes benchmarks/results/captions-cpu.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.int8_curve import package_bytes
from export.evaluation import HELDOUT
from runtime import DEFAULT_MODEL, Captioner
from runtime.preprocess import load_pixels

RESULTS = Path(__file__).parent / "results"
PHOTOS = Path(__file__).parent / "photos"
SAMPLES = Path(__file__).parent.parent / "runtime" / "samples"
JUDGED = PHOTOS / "judged.json"
INT8 = DEFAULT_MODEL.parent / "default-int8"
GOOD = ("true", "partly")
# Held-out wallpapers with a subject to name (the rest are textures, skies and landscapes): seen by the
# INT8 gate's agreement counts only, never by training or tuning.
WALLPAPERS = ("colorfulcups", "dragonfly", "eveningglow", "fallenleaf", "friends", "greentock", "kite", "kleiber",
              "ladybird", "picture-0b", "picture-1a")


def photos() -> list[Path]:
    return (sorted(PHOTOS.glob("*.jpg")) + [HELDOUT / f"{name}.jpg" for name in WALLPAPERS]
            + sorted(SAMPLES.glob("*.jpg")))


def summary(verdicts: list[str]) -> dict:
    counts = {v: verdicts.count(v) for v in ("true", "partly", "wrong", "?")}
    return {**counts, "photos": len(verdicts), "good_share": round(sum(counts[v] for v in GOOD) / len(verdicts), 3)}


def vision_ms(captioners: dict[str, Captioner], images: list[Path], rounds: int) -> dict[str, float]:
    """Median ms of one image through each package's vision graph, the packages interleaved."""
    # Each package's own preprocessing: the baseline's centre crop is not the current whole photo.
    pixels = {name: [np.stack([load_pixels(p, cap.manifest.preprocess)]) for p in images]
              for name, cap in captioners.items()}
    times = {name: [] for name in captioners}
    for _ in range(rounds):
        for i in range(len(images)):
            for name, cap in captioners.items():
                start = time.perf_counter()
                cap.graphs.encode(pixels[name][i])
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def table(result: dict) -> str:
    names = result["packages"]
    lines = [f"Captions of {len(result['photos'])} photos ({result['machine']}); judgement in brackets.", "",
             "| photo | shows | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row in result["photos"]:
        cells = [f"{row[n]['caption']} [{row[n]['verdict']}]" for n in names]
        lines.append(f"| {row['photo']} | {row['shows']} | " + " | ".join(cells) + " |")
    lines += ["", "| package | photos | true | partly | wrong | unjudged | true or partly | vision ms/image | MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        for group, s in result["summary"][n].items():
            lines.append(f"| {n} | {group} | {s['true']} | {s['partly']} | {s['wrong']} | {s['?']} | "
                         f"{s['good_share']:.0%} | {result['vision_ms'][n]} | {result['mib'][n]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.captions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="the previous default package (FP32)")
    parser.add_argument("--baseline-int8", type=Path, help="the previous INT8 package, for its vision ms and size")
    parser.add_argument("--package", action="append", default=[], metavar="NAME=PKG",
                        help="another package to caption with, as column NAME (e.g. an intermediate default)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over the photos")
    args = parser.parse_args(argv)
    packages = {"baseline": args.baseline, "fp32": DEFAULT_MODEL, "int8": INT8}
    if args.baseline_int8:
        packages["baseline-int8"] = args.baseline_int8
    for named in args.package:
        name, _, path = named.partition("=")
        if not name or not path or name in packages:
            parser.error(f"--package wants a new NAME=PKG, got {named!r}")
        packages[name] = Path(path)
    caps = {n: Captioner(p, provider="cpu", threads=2) for n, p in packages.items()}
    judged = json.loads(JUDGED.read_text())
    images = photos()
    result = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "packages": list(packages),
              "photos": [], "summary": {}}
    captions = {n: cap.caption([str(p) for p in images]) for n, cap in caps.items()}
    for i, path in enumerate(images):
        seen = judged.get(path.name, {"shows": "?", "verdicts": {}})
        row = {"photo": path.name, "shows": seen["shows"], "added": seen.get("added")}
        for n in packages:
            text = captions[n][i].text
            row[n] = {"caption": text, "verdict": seen["verdicts"].get(text, "?")}
        result["photos"].append(row)
    rows = result["photos"]
    batches = {"all": rows, "read before": [r for r in rows if not r["added"]]}
    for added in sorted({r["added"] for r in rows if r["added"]}):
        batches[f"added {added}"] = [r for r in rows if r["added"] == added]
    for n in packages:
        result["summary"][n] = {group: summary([r[n]["verdict"] for r in batch]) for group, batch in batches.items()}
    result["vision_ms"] = vision_ms(caps, images, args.rounds)
    result["mib"] = {n: round(package_bytes(p) / 2**20, 1) for n, p in packages.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "captions-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "captions-cpu.md").write_text(table(result))
    print(table(result))
    unjudged = sum(s["all"]["?"] for s in result["summary"].values())
    if unjudged:
        print(f"{unjudged} captions not yet judged: add them to {JUDGED}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
