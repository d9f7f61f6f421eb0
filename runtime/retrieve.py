"""python -m runtime.retrieve --query "a dog on a beach" FOLDER...: text-to-image retrieval with
a captioner. Each image is ranked by how likely the model finds the query as its caption,
log p(query | image) (`Captioner.score_memories`: `max_batch` images per decoder pass).

The encoder's output for each image file is cached on disk, keyed by the package (its
manifest's SHA-256, which pins every graph and preprocessing setting) and by the file's
content (SHA-256): later queries over the same folder, in this run or the next, only run the
decoder; a renamed file is still a hit, an edited one is encoded again.

Exit status: 0 when every image was searched, 1 when any failed (the others are still
ranked), 2 for usage errors (an empty or over-long query, no images, bad package or option).
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .cli import USAGE_ERRORS, add_model_options, expand, open_captioner
from .engine import Captioner
from .preprocess import ImageError


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgecap" / "memory"


class MemoryCache:
    """Memory K/V per image file (`Captioner.encode`), on disk under `folder`/<package>/<content>.npz.
    `encoded` counts the images this cache had to run the vision graph for."""

    def __init__(self, captioner: Captioner, folder: Path):
        self.captioner, self.encoded = captioner, 0
        self.folder = folder / captioner.manifest.digest

    def get(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """Raises ImageError for a file that is not a usable image."""
        try:
            entry = self.folder / f"{hashlib.sha256(Path(path).read_bytes()).hexdigest()}.npz"
        except OSError:
            entry = None  # unreadable: encode() raises the one-line error the caption CLI gives
        if entry is not None and entry.is_file():
            try:
                with np.load(entry) as saved:
                    return saved["key"], saved["value"]
            except (OSError, ValueError, KeyError):
                pass  # a damaged entry is encoded again and replaced
        key, value = self.captioner.encode(path)
        self.encoded += 1
        if entry is not None:
            self.save(entry, key, value)
        return key, value

    def save(self, entry: Path, key: np.ndarray, value: np.ndarray) -> None:
        """Write then rename, so that a reader never sees half an entry; a cache that cannot be
        written only costs speed."""
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=entry.parent, suffix=".tmp", delete=False) as f:
                np.savez(f, key=key, value=value)
            os.replace(f.name, entry)
        except OSError:
            pass


def search(captioner: Captioner, cache: MemoryCache, images: list[str], queries: list[str],
           mean: bool = False) -> tuple[dict[str, list[tuple[str, float]]], list[str]]:
    """({query: [(image, log-likelihood)], likeliest first}, one-line errors of the images that
    failed). Images are taken `max_batch` at a time: each is loaded (or encoded) once for
    all the queries."""
    if captioner.manifest.prompting.input == "encoder":
        raise ValueError("this model answers questions; it does not rank images by a caption")
    for query in queries:
        captioner.scored_sequence(query)  # refuse an empty or over-long query before any image
    scores, errors = {q: [] for q in queries}, []
    for start in range(0, len(images), captioner.max_batch):
        found, memories = [], []
        for image in images[start : start + captioner.max_batch]:
            try:
                memories.append(cache.get(image))
                found.append(image)
            except ImageError as e:
                errors.append(str(e))
        if not found:
            continue
        key, value = (np.concatenate(parts, axis=1) for parts in zip(*memories))
        for query in queries:
            scores[query] += zip(found, captioner.score_memories(key, value, query, mean))
    return {q: sorted(s, key=lambda item: -item[1]) for q, s in scores.items()}, errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime.retrieve", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", metavar="FOLDER|IMAGE", help="folders of images, or image files")
    parser.add_argument("--query", action="append", required=True, help="text to search for (repeat for several)")
    parser.add_argument("--top", type=int, default=5, help="images shown per query (default 5)")
    parser.add_argument("--mean", action="store_true", help="rank by log-likelihood per token")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"where encoder outputs are kept (default {default_cache()})")
    add_model_options(parser)
    parser.add_argument("--max-batch", type=int, default=8, help="images per decoder pass")
    parser.add_argument("--json", action="store_true", help="one JSON object per query")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="PIL")
    ort.set_default_logger_severity(4)
    images = expand(args.images)
    try:
        if args.top < 1:
            raise ValueError("--top must be at least 1")
        if not any(Path(p).is_file() for p in images):
            raise ValueError(f"no images in {' '.join(args.images)}")
        captioner = open_captioner(args, max_batch=args.max_batch)
        ranked, errors = search(captioner, MemoryCache(captioner, args.cache or default_cache()), images, args.query,
                                args.mean)
    except USAGE_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    for query, results in ranked.items():
        top = results[: args.top]
        if args.json:
            print(json.dumps({"query": query, "results": [{"image": i, "score": round(s, 4)} for i, s in top]}))
        else:
            print(f"{query}:")
            for image, score in top:
                print(f"  {score:9.3f}  {image}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
