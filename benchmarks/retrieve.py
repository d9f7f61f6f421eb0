"""python -m benchmarks.retrieve [--crops N] [--rounds N]

Text-to-image retrieval with the bundled captioner (int8, the CPU default) over the held-out
inputs (39 photos whole plus seeded crops of each):

- quality: for every class EfficientNet-Lite0 (eager PyTorch) gives one of the whole photos, the
  query "a photo of an egyptian cat" (the model's own phrasing); a hit when the first image
  returned is one the classifier puts in that class (precision@1), and when any of the first 5 is;
- speed: one query over every input with an empty encoder cache (decode, encode, decoder pass)
  against the same query with the cache filled (decoder only), interleaved rounds, medians.

Writes benchmarks/results/retrieve-cpu.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.concepts import class_names, with_article
from export.encoder import load_pretrained
from export.evaluation import heldout_images
from export.preprocess import reference_pixels
from runtime import Captioner
from runtime.retrieve import MemoryCache, search

RESULTS = Path(__file__).parent / "results"


def timed_query(captioner: Captioner, cache_dir: Path, images: list[str], query: str) -> float:
    start = time.perf_counter()
    search(captioner, MemoryCache(captioner, cache_dir), images, [query])
    return (time.perf_counter() - start) * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retrieve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=5, help="crops per held-out photo (39 x (1 + crops) inputs)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved cold/warm rounds")
    args = parser.parse_args(argv)
    captioner, classifier = Captioner(provider="cpu"), load_pretrained()
    names = class_names()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images").mkdir()
        images = heldout_images(Path(tmp) / "images", crops=args.crops)
        spec = captioner.manifest.preprocess
        with torch.inference_mode():
            truth = np.array([int(classifier(reference_pixels(i, spec)[None]).argmax()) for i in images])
        whole = truth[:: args.crops + 1]  # each photo comes first, then its crops
        classes = list(dict.fromkeys(int(c) for c in whole))
        queries = {f"a photo of {with_article(names[c])}": c for c in classes}
        ranked, errors = search(captioner, MemoryCache(captioner, Path(tmp) / "quality"), images, list(queries))
        assert not errors, errors
        index = {image: i for i, image in enumerate(images)}
        first = [truth[index[ranked[q][0][0]]] == c for q, c in queries.items()]
        top5 = [any(truth[index[image]] == c for image, _ in ranked[q][:5]) for q, c in queries.items()]
        cold, warm = [], []
        for r in range(args.rounds):
            cache_dir = Path(tmp) / f"round{r}"
            cold.append(timed_query(captioner, cache_dir, images, "a photo of a dog"))
            warm.append(timed_query(captioner, cache_dir, images, "a photo of a dog"))
    result = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "images": len(images),
              "queries": len(queries), "precision_at_1": round(float(np.mean(first)), 4),
              "hit_at_5": round(float(np.mean(top5)), 4), "rounds": args.rounds,
              "ms_per_query_cold_cache": round(statistics.median(cold), 1),
              "ms_per_query_warm_cache": round(statistics.median(warm), 1),
              "speedup": round(statistics.median(c / w for c, w in zip(cold, warm)), 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "retrieve-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Text-to-image retrieval with the bundled captioner (int8), {result['images']} held-out inputs, "
             f"{result['machine']}.", "",
             f"Quality, {result['queries']} queries (one per EfficientNet class of a whole photo): the first image "
             f"is in the queried class for {result['precision_at_1']:.1%}, one of the first 5 for {result['hit_at_5']:.1%}.",
             "", "| one query over every image | ms | per image |", "|---|---|---|"]
    for label, key in (("empty encoder cache", "ms_per_query_cold_cache"), ("filled cache", "ms_per_query_warm_cache")):
        lines.append(f"| {label} | {result[key]} | {result[key] / result['images']:.2f} |")
    lines += ["", f"Filled cache: {result['speedup']}x faster ({args.rounds} interleaved rounds, medians)."]
    (RESULTS / "retrieve-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
