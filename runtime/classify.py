"""python -m runtime.classify IMAGE... --labels "a cat,a dog": zero-shot recognition with a
captioner. Each label (through --template) is scored as a caption of the image
(`Captioner.score`: all labels of an image in batched decoder passes over one encoder pass), and
the labels are ranked by a softmax over those log-likelihoods.

Exit status: 0 when every image was classified, 1 when any failed (the others are still
printed), 2 for usage errors (no labels, a label too long, bad model package or option).
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .cli import USAGE_ERRORS, add_model_options, expand, open_captioner
from .preprocess import ImageError


def read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    if labels is not None:
        found = labels.split(",")
    else:
        try:
            found = labels_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"cannot read {labels_file}: {e.strerror}") from None
    found = list(dict.fromkeys(label.strip() for label in found if label.strip()))
    if not found:
        raise ValueError("no labels given")
    return found


def ranked(scores: list[float], labels: list[str]) -> list[tuple[str, float, float]]:
    """(label, probability, log-likelihood), likeliest first; probabilities from a softmax."""
    x = np.array(scores)
    p = np.exp(x - x.max())
    p /= p.sum()
    return [(labels[i], float(p[i]), float(x[i])) for i in np.argsort(-x, kind="stable")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels")
    labels.add_argument("--labels-file", type=Path, help="one label per line")
    parser.add_argument("--template", default="{}", help='how a label becomes a caption, e.g. "a photo of {}"')
    parser.add_argument("--mean", action="store_true", help="rank by log-likelihood per token (long labels fare better)")
    parser.add_argument("--top", type=int, default=5, help="labels shown per image (default 5)")
    add_model_options(parser)
    parser.add_argument("--max-batch", type=int, default=64, help="labels per decoder pass (default 64)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="PIL")
    ort.set_default_logger_severity(4)
    try:
        if "{}" not in args.template:
            raise ValueError('--template must contain {} where the label goes')
        if args.top < 1:
            raise ValueError("--top must be at least 1")
        labels = read_labels(args.labels, args.labels_file)
        captioner = open_captioner(args, max_batch=args.max_batch)
        texts = [args.template.replace("{}", label) for label in labels]
        for text in texts:  # every label checked before any image is read
            captioner.scored_sequence(text)
    except USAGE_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for image in expand(args.images):
        try:
            top = ranked(captioner.score(image, texts, mean=args.mean), labels)[: args.top]
        except ImageError as e:
            failed += 1
            print(json.dumps({"image": image, "error": str(e)}) if args.json else f"error: {e}",
                  file=sys.stdout if args.json else sys.stderr, flush=True)
            continue
        if args.json:
            print(json.dumps({"image": image, "labels": [{"label": label, "probability": round(p, 4),
                                                          "logprob": round(lp, 4)} for label, p, lp in top]}), flush=True)
        else:
            print(f"{image}: " + ", ".join(f"{label} ({p:.2f})" for label, p, _ in top), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
