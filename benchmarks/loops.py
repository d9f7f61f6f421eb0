"""python -m benchmarks.loops [--model PKG ...] [--images N] [--json FILE]

Does the captioner ever loop? On N generated images that are no photos (benchmarks/odd_images.py:
icons, diagrams, charts, text, screenshots, flat colours, noise, patterns, gradients, tiny and
huge images), greedy and beam 4, it counts the captions that did not end with EOS before the
length limit and those that repeat a token 3-gram. Without --model: both bundled variants.
"""

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

from runtime import Captioner
from runtime.engine import BUNDLED

from .odd_images import odd_images


def repeats_ngram(tokens: list[int], n: int = 3) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def measure(package: Path, paths: list[Path]) -> dict:
    cap = Captioner(package, provider="cpu")
    limit = cap.generation_config().max_new_tokens
    out = {"package": str(package), "no_repeat_ngram_size": cap.defaults.no_repeat_ngram_size}
    for beams in (1, 4):
        captions = [c for c in cap.caption([str(p) for p in paths], num_beams=beams) if c.error is None]
        bad = [c for c in captions if len(c.tokens) >= limit or repeats_ngram(c.tokens)]
        out[f"beams_{beams}"] = {
            "captioned": len(captions),
            "reached_limit": sum(len(c.tokens) >= limit for c in captions),
            "repeated_3gram": sum(repeats_ngram(c.tokens) for c in captions),
            "bad_share": round(len(bad) / len(captions), 4),
            "bad_by_kind": dict(Counter(Path(c.image).stem.split("-")[1] for c in bad)),
            "examples": sorted({c.text for c in bad})[:5],
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", help="model package (repeatable)")
    parser.add_argument("--images", type=int, default=520)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = odd_images(args.images, Path(tmp))
        results = [measure(p, paths) for p in args.model or BUNDLED.values()]
    for r in results:
        for beams in ("beams_1", "beams_4"):
            m = r[beams]
            print(f"{r['package']} {beams.replace('_', ' ')}: {m['captioned']} images, {m['reached_limit']} reached "
                  f"the limit, {m['repeated_3gram']} repeat a 3-gram ({m['bad_share']:.1%})")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
