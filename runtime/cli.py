"""What the command lines share, defined once: which package they open and how it runs, what they
ask it, how image folders expand, and the errors that are a usage error (exit 2)."""

import argparse
from pathlib import Path

from .engine import BUNDLED, Captioner
from .manifest import PackageError
from .providers import CHOICES, ProviderError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
# An unusable package or provider, or a bad option value: one line on stderr and exit 2.
USAGE_ERRORS = (PackageError, ProviderError, ValueError)


def add_model_options(parser: argparse.ArgumentParser, precision: bool = True,
                      threads: str = "ONNX Runtime intra-op threads") -> None:
    """--model, --precision (the bundled model's variant; not where a package path is the only
    choice, as for the service), --provider and --threads."""
    parser.add_argument("--model", type=Path, default=None, help="model package folder (default: the bundled model)")
    if precision:
        parser.add_argument("--precision", choices=sorted(BUNDLED), default=None,
                            help="variant of the bundled model (default: int8 on the CPU, fp32 on a GPU)")
    parser.add_argument("--provider", choices=CHOICES, default="auto")
    parser.add_argument("--threads", type=int, default=None, help=threads)


def add_asking_options(parser: argparse.ArgumentParser) -> None:
    """--question, --task and --text: what a package that takes text is asked of every image
    (Prompting.text_inputs says which a package takes)."""
    parser.add_argument("--question", default=None,
                        help="answer this question about each image instead of captioning it (VQA and chat models)")
    parser.add_argument("--task", default=None, help="the task, for models that do several (Florence-2: <CAPTION>, "
                                                     "<OD>, <OCR>, ...; default the model's first)")
    parser.add_argument("--text", default=None, help="the text a task takes (Florence-2's grounding and region tasks)")


def open_captioner(args: argparse.Namespace, **options) -> Captioner:
    """The package the model options name, opened as they say; `options` go to Captioner as they are."""
    return Captioner(args.model, provider=args.provider, threads=args.threads,
                     precision=getattr(args, "precision", None), **options)


def expand(paths: list[str]) -> list[str]:
    """A folder stands for the images directly inside it, sorted by name; a folder
    without any stays in the list, so that it is reported as a failed input."""
    out = []
    for p in paths:
        path = Path(p)
        found = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()) \
            if path.is_dir() else []
        out += found or [p]
    return out
