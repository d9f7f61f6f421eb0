"""python -m benchmarks.classify [--crops N] [--separate N]

Zero-shot recognition with the bundled captioner over the 1,000 ImageNet classes, each as the
caption the model itself would write ("a photo of an egyptian cat"): on the held-out photos whole
plus seeded crops (at least 200 real-photo inputs), how often the likeliest label is the
EfficientNet-Lite0 classifier's own top class (eager PyTorch), ranked by total and by per-token
log-likelihood. Speed: ms per image for the 1,000 labels in batched passes over one encoder pass,
against 1,000 separate `score` calls (measured on a few images, interleaved). int8 and fp32.

Writes benchmarks/results/classify-cpu.{json,md}.
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

RESULTS = Path(__file__).parent / "results"


def agreement(captioner: Captioner, images: list[str], labels: list[str], truth: np.ndarray) -> dict:
    top_sum, top_mean, ms = [], [], []
    scored_tokens = np.array([len(captioner.scored_sequence(t)) - len(captioner.prompting.prefix) for t in labels])
    for image in images:
        start = time.perf_counter()
        scores = np.array(captioner.score(image, labels))
        ms.append((time.perf_counter() - start) * 1000)
        per_token = scores / scored_tokens
        top_sum.append(int(scores.argmax()))
        top_mean.append(int(per_token.argmax()))
    return {"top1_agreement_sum": round(float(np.mean(np.array(top_sum) == truth)), 4),
            "top1_agreement_mean": round(float(np.mean(np.array(top_mean) == truth)), 4),
            "ms_per_image_batched": round(statistics.median(ms), 1)}


def separate_vs_batched(captioner: Captioner, images: list[str], labels: list[str]) -> dict:
    """Interleaved per image: all labels batched, then one `score` call per label."""
    batched, separate = [], []
    for image in images:
        start = time.perf_counter()
        captioner.score(image, labels)
        batched.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        for label in labels:
            captioner.score(image, [label])
        separate.append((time.perf_counter() - start) * 1000)
    return {"images": len(images), "ms_batched": round(statistics.median(batched), 1),
            "ms_separate": round(statistics.median(separate), 1),
            "speedup": round(statistics.median(s / b for s, b in zip(separate, batched)), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=5, help="crops per held-out photo (39 x (1 + crops) inputs)")
    parser.add_argument("--separate", type=int, default=3, help="images for the separate-calls comparison")
    args = parser.parse_args(argv)
    labels = [f"a photo of {with_article(name)}" for name in class_names()]
    classifier = load_pretrained()
    result = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores", "labels": len(labels)}
    with tempfile.TemporaryDirectory() as tmp:
        images = heldout_images(Path(tmp), crops=args.crops)
        result["images"] = len(images)
        for precision in ("int8", "fp32"):
            captioner = Captioner(provider="cpu", precision=precision, max_batch=64)
            spec = captioner.manifest.preprocess
            with torch.inference_mode():
                truth = np.array([int(classifier(reference_pixels(i, spec)[None]).argmax()) for i in images])
            result[precision] = {**agreement(captioner, images, labels, truth),
                                 "separate_calls": separate_vs_batched(captioner, images[: args.separate], labels)}
            print(precision, json.dumps(result[precision]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "classify-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Zero-shot classification with the bundled captioner, {result['labels']} ImageNet labels "
             f"(\"a photo of an egyptian cat\"), {result['images']} held-out inputs, {result['machine']}.", "",
             "| precision | top-1 = EfficientNet's (total log-lik.) | (per-token) | ms/image, 1,000 labels batched "
             "| ms/image, 1,000 separate calls | speed-up |", "|---|---|---|---|---|---|"]
    for precision in ("int8", "fp32"):
        r = result[precision]
        lines.append(f"| {precision} | {r['top1_agreement_sum']:.1%} | {r['top1_agreement_mean']:.1%} | "
                     f"{r['ms_per_image_batched']} | {r['separate_calls']['ms_separate']} | "
                     f"{r['separate_calls']['speedup']}x |")
    (RESULTS / "classify-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
