"""python -m benchmarks.parity --model PKG [--reference CKPT|HF_DIR] [IMAGE...] [--eval-set N] [--held-out]
                               [--question Q | --task TASK [--text TEXT]] [--json]

Runs eager PyTorch (for a Hugging Face package: transformers' own `generate` and image
processor) and the runtime side by side on the same images and prints:
- exact_caption_match: fraction of images whose tokens are identical, and its 95% Wilson
  interval (exact_caption_match_ci95): the count of images bounds what a rate can say;
- primary_concept_match: fraction whose captions name the same first ImageNet class (or
  none): what kind of differences remain where the wording differs;
- teacher_forced_top1: the reference's captions fed to the runtime's decoder graph
  in one pass; fraction of positions where both pick the same next token;
- max_abs_logit_diff: the largest |logit| difference over those positions;
- max_rel_logit_diff: the same relative to the largest |reference logit| of its caption
  (trained decoders have logits in the tens to hundreds: judge agreement by this one);
- nan_or_inf, cache_agreement (the package's own greedy tokens with and without the
  KV cache), size_mib per file: the fidelity report for reduced-precision packages.
A question-answering package is compared on `--question`, a Florence-2 package on `--task`
(its default task without one) and the task's `--text`, each side building the prompt its own
way (the runtime from the manifest, the reference with transformers' processor).
Without --reference the bundled model's checkpoint is found from what the manifest records.
"""

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from export import DEFAULT_CHECKPOINT, needs_extra
from export.check import ExportError
from export.concepts import primary_concept
from export.evaluation import evaluation_images, heldout_images
from runtime import Captioner, ImageError, PackageError, ProviderError
from runtime.cli import expand
from runtime.manifest import Manifest
from runtime.preprocess import load_pixels
from runtime.search import prefix_logits, take_rows


def load_reference(reference: Path | None, manifest: Manifest):
    """A Hugging Face folder, a training checkpoint, or (bundled model) the recorded checkpoint."""
    if reference is not None and (reference / "config.json").is_file():
        from export.hf import HFReference

        return HFReference(reference, manifest)
    from export.reference import Reference, checkpoint_for

    return Reference(reference or checkpoint_for(manifest, DEFAULT_CHECKPOINT.parent), manifest)


def teacher_forced(captioner: Captioner, ref, pixels: np.ndarray, images: list, tokens: list[list[int]], asked: dict):
    """Top-1 agreement, max |logit diff| and max |logit diff| / max |reference logit| along
    the reference's own captions."""
    agree, total, worst, worst_rel = 0, 0, 0.0, 0.0
    prompt, inputs = captioner.prompting.ask(**asked)
    outputs = captioner.graphs.encode(pixels, *(np.tile(x, (len(pixels), 1)) for x in inputs))
    ref_pixels = ref.pixels(images)
    for i, seq in enumerate(tokens):
        # A caption that ran to the length limit never fed its last token back: the decoder has
        # no position for it.
        ids = np.array([[*prompt, *seq]], dtype=np.int64)[:, : captioner.manifest.max_positions]
        one = tuple([take_rows(x, np.array([i])) for x in layers] for layers in outputs)
        ort_logits = prefix_logits(captioner.graphs.step, captioner.graphs.start(one, ids.shape[1]), ids)
        # Florence2Processor lays a task's prompt out with its image; the bundled model is asked nothing.
        ref_logits = ref.logits(ref_pixels[i : i + 1], ids, **({**asked, "images": images[i : i + 1]} if asked else {}))
        agree += int((ort_logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        total += ids.shape[1]
        diff = float(np.abs(ort_logits - ref_logits).max())  # NaN makes it NaN: reported
        worst, worst_rel = max(worst, diff), max(worst_rel, diff / float(np.abs(ref_logits).max()))
    return agree / total, worst, worst_rel


def wilson(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a rate measured on n independent images: what n can tell
    (12 images at 100% only say >= 76%; 200 images at 97.5% say 94.3% to 98.9%)."""
    p, z2 = successes / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [round(max(0.0, float(centre - half)), 4), round(min(1.0, float(centre + half)), 4)]


def run(model: Path, reference: Path | None, images: list[str], num_beams: int = 1, max_new_tokens: int | None = None,
        question: str | None = None, task: str | None = None, text: str | None = None):
    captioner = Captioner(model)
    manifest = captioner.manifest.data
    cfg = captioner.generation_config(max_new_tokens, num_beams, question=question, task=task, text=text)
    if captioner.manifest.prompting.tasks is not None:
        task = task or captioner.manifest.prompting.tasks["default"]  # the reference has no default of its own
    asked = {k: v for k, v in {"question": question, "task": task, "text": text}.items() if v is not None}
    ref = load_reference(reference, captioner.manifest)
    usable, pixels = [], []
    for image in images:
        try:
            pixels.append(load_pixels(image, captioner.manifest.preprocess))
            usable.append(image)
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
    if not usable:
        raise ValueError("no usable images")
    pixels = np.stack(pixels)
    ours = [t for i in range(len(usable)) for t in captioner.generate(pixels[i : i + 1], cfg, **asked)]
    without_cache = captioner.generate(pixels, replace(cfg, num_beams=1), cache=False, **asked)
    with_cache = captioner.generate(pixels, replace(cfg, num_beams=1), **asked)
    theirs = [t for img in usable for t in ref.generate([img], cfg, **asked)]
    top1, diff, rel = teacher_forced(captioner, ref, pixels, usable, theirs, asked)
    # Both sides' tokens in the package's own words: Florence-2's <loc_N> boxes are part of its text.
    mismatches = [{"image": str(img), "runtime": captioner.decode(a), "reference": captioner.decode(b)}
                  for img, a, b in zip(usable, ours, theirs, strict=True) if a != b]
    same_concept = len(usable) - sum(primary_concept(m["runtime"]) != primary_concept(m["reference"]) for m in mismatches)
    return {
        "images": len(usable),
        "exact_caption_match": 1 - len(mismatches) / len(usable),
        "exact_caption_match_ci95": wilson(len(usable) - len(mismatches), len(usable)),
        "primary_concept_match": same_concept / len(usable),
        "primary_concept_match_ci95": wilson(same_concept, len(usable)),
        "teacher_forced_top1": top1,
        "max_abs_logit_diff": diff,
        "max_rel_logit_diff": rel,
        "nan_or_inf": not np.isfinite(diff),
        "cache_agreement": float(np.mean([a == b for a, b in zip(with_cache, without_cache, strict=True)])),
        "size_mib": {name: round(f["bytes"] / 2**20, 2) for name, f in manifest["files"].items()},
        "num_beams": cfg.num_beams,
        **asked,
        "precision": manifest["precision"],
        "mismatches": mismatches,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE")
    parser.add_argument("--eval-set", type=int, default=0, metavar="N",
                        help="add N standard fidelity images (photo crops and generated ones)")
    parser.add_argument("--held-out", action="store_true",
                        help="add the held-out set: real photos quantization never saw, whole and in crops "
                             "(export/heldout)")
    parser.add_argument("--model", type=Path, required=True, help="model package folder")
    parser.add_argument("--reference", type=Path, default=None,
                        help="training checkpoint (.pt), or the Hugging Face folder the package was exported from")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--question", default=None, help="for a question-answering package: the question asked")
    parser.add_argument("--task", default=None, help="for a Florence-2 package: the task (its default if not given)")
    parser.add_argument("--text", default=None, help="the text a task such as <CAPTION_TO_PHRASE_GROUNDING> takes")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.images and not args.eval_set and not args.held_out:
        parser.error("give images, --eval-set N or --held-out")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            images = expand(args.images) + evaluation_images(args.eval_set, Path(tmp))
            images += heldout_images(Path(tmp)) if args.held_out else []
            result = run(args.model, args.reference, images, args.beams, args.max_tokens,
                         args.question, args.task, args.text)
        except (PackageError, ProviderError, ExportError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2 if isinstance(e, (PackageError, ProviderError, ValueError)) else 1
        except ModuleNotFoundError as e:
            print(f"error: {needs_extra(e, 'python -m benchmarks.parity', 'dev')}", file=sys.stderr)
            return 1
        result["mismatches"] = [{**m, "image": Path(m["image"]).name} if m["image"].startswith(tmp) else m
                                for m in result["mismatches"]]
    if args.json:
        print(json.dumps(result))
    else:
        low, high = result["exact_caption_match_ci95"]
        print(f"images {result['images']}  exact caption match {result['exact_caption_match']:.1%} "
              f"(95% CI {low:.1%}-{high:.1%})  same primary concept {result['primary_concept_match']:.1%}  "
              f"teacher-forced top-1 {result['teacher_forced_top1']:.2%}  "
              f"max |logit diff| {result['max_abs_logit_diff']:.2e} (relative {result['max_rel_logit_diff']:.1e})  cache agreement {result['cache_agreement']:.1%}  "
              f"NaN/Inf {result['nan_or_inf']}  {result['precision']} {sum(result['size_mib'].values()):.1f} MiB  "
              f"(beams {result['num_beams']}{''.join(f', {k} {result[k]!r}' for k in ('question', 'task', 'text') if k in result)})")
        for m in result["mismatches"]:
            print(f"  {m['image']}: runtime {m['runtime']!r} vs reference {m['reference']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
