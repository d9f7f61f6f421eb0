"""python -m benchmarks.weight_only --model PKG --reference FP32_PKG [--photos N] [--max-tokens N] [--json OUT] [--label WORD]

The gate of a chat model's weight-only package (`python -m export quantize FP32_PKG --precision
int8|int4`): the package against the FP32 package it was made from, on the held-out photos
(export/heldout: nothing was built, trained or tuned on them), each asked QUESTIONS:
- same_answer: fraction of (photo, question) pairs whose greedy answers are identical, with its
  95% Wilson interval (what the number of pairs can tell);
- teacher_forced_top1: the FP32 answers fed to the package in one pass; fraction of answer
  positions (each answer token and its end) where both pick the same next token;
- max_rel_logit_diff: the largest |logit difference| over those positions relative to the
  largest |FP32 logit| of the same answer: agreement judged against the logits' own scale;
- min_fp32_margin_where_differ: FP32's top-1 minus top-2 logit at the positions that disagree,
  relative to the same scale (small: a near tie the package broke the other way);
- cache_agreement and batch_agreement: the package's answers with and without its KV cache, and
  three photos answered together against one by one.
Writes benchmarks/results/weight-only-<family>-<precision>[-vision-int8].{md,json}.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from export.evaluation import QUESTIONS as ASKED, heldout_images
from runtime import Captioner, PackageError
from runtime.search import cached, capacity, generate, prefix_logits

from .parity import wilson

RESULTS = Path(__file__).parent / "results"
QUESTIONS = (None, *ASKED)  # None: the package's own default question


def answer_and_logits(cap: Captioner, features: np.ndarray, grid: tuple[int, int], question: str | None,
                      forced: list[int] | None, max_new_tokens: int) -> tuple[list[int], np.ndarray | None]:
    """The package's greedy answer, and its logits along `forced` (an answer's tokens and its
    end: one row per position that predicts them), from the photo's features (its vision pass)."""
    cfg = cap.generation_config(max_new_tokens)
    prompt = cap.prompting.chat(question, [grid])
    memory = cap.chat_memory(features[None], prompt, grid)
    answer = generate(cached(cap.graphs.step), cap.graphs.start(memory, capacity(len(prompt), max_new_tokens)),
                      prompt[None], cap.eos, cfg)[0]
    if forced is None:
        return answer, None
    ids = np.array([[*prompt, *forced]], dtype=np.int64)
    logits = prefix_logits(cap.graphs.step, cap.graphs.start(memory, ids.shape[1]), ids)[0]
    return answer, logits[len(prompt) - 1:]


def gate(model: Path, reference: Path, photos: list[str], max_new_tokens: int) -> dict:
    cap, ref = Captioner(model), Captioner(reference)
    if cap.manifest.prompting.chat is None:
        raise PackageError(f"{model} is not a chat model's package (its manifest's prompting has no chat)")
    if ref.manifest.data["precision"] != "fp32":
        raise PackageError(f"{reference} is a {ref.manifest.data['precision']} package; the reference is the FP32 one")
    pairs, agree, positions, worst_rel, margins = [], 0, 0, 0.0, []
    for photo in photos:
        tiles, grid = ref.chat_tiles(photo)
        theirs, ours = ref.chat_features(tiles), cap.chat_features(tiles)  # one vision pass each per photo
        for question in QUESTIONS:
            want, _ = answer_and_logits(ref, theirs, grid, question, None, max_new_tokens)
            forced = want[:max_new_tokens - 1]  # a capped answer never fed its last token back
            _, fp32 = answer_and_logits(ref, theirs, grid, question, forced, max_new_tokens)
            got, logits = answer_and_logits(cap, ours, grid, question, forced, max_new_tokens)
            scale = float(np.abs(fp32).max())
            differ = logits.argmax(-1) != fp32.argmax(-1)
            top2 = np.sort(fp32, -1)[:, -2:]
            margins += ((top2[:, 1] - top2[:, 0])[differ] / scale).tolist()
            agree, positions = agree + int((~differ).sum()), positions + len(differ)
            worst_rel = max(worst_rel, float(np.abs(logits - fp32).max()) / scale)
            pairs.append({"photo": Path(photo).name, "question": question or cap.manifest.prompting.chat["question"],
                          "same": got == want, "fp32": ref.decode(want), "package": cap.decode(got)})
    same = sum(p["same"] for p in pairs)
    three = photos[:3]
    batched = [c.tokens for c in cap.caption(three, max_new_tokens)]
    vision = cap.manifest.data["source"].get("quantization", {}).get("vision", {}).get("compute", "fp32")
    return {"package": str(model), "model": cap.manifest.data["source"]["model"],
            "precision": cap.manifest.data["precision"], "vision_compute": vision,
            "reference": str(reference),
            "photos": len(photos), "questions": [q or cap.manifest.prompting.chat["question"] for q in QUESTIONS],
            "max_new_tokens": max_new_tokens, "same_answer": same / len(pairs), "same_answer_ci95": wilson(same, len(pairs)),
            "teacher_forced_top1": agree / positions, "answer_positions": positions,
            "max_rel_logit_diff": worst_rel,
            "min_fp32_margin_where_differ": min(margins) if margins else None,
            "cache_agreement": float(np.mean([a.tokens == b.tokens for a, b in zip(
                cap.caption(three, max_new_tokens), cap.caption(three, max_new_tokens, cache=False))])),
            "batch_agreement": float(np.mean([a == cap.caption(p, max_new_tokens).tokens for a, p in zip(batched, three)])),
            "size_mib": {name: round(f["bytes"] / 2**20, 1) for name, f in cap.manifest.data["files"].items()},
            "fp32_size_mib": {name: round(f["bytes"] / 2**20, 1) for name, f in ref.manifest.data["files"].items()},
            "pairs": pairs}


def report(r: dict) -> str:
    size, fp32 = sum(r["size_mib"].values()), sum(r["fp32_size_mib"].values())
    margin = "-" if r["min_fp32_margin_where_differ"] is None else f"{r['min_fp32_margin_where_differ']:.4f}"
    return "\n".join([
        f"{r['precision'].upper()} package (vision {r['vision_compute']}) against its FP32 package: {r['photos']} held-out photos x "
        f"{len(r['questions'])} questions, greedy, at most {r['max_new_tokens']} tokens.", "",
        "| same answer (95% CI) | teacher-forced top-1 | max relative logit diff | smallest FP32 margin where they differ "
        "| cache = no cache | batch 3 = one by one | size MiB (FP32) |", "|---|---|---|---|---|---|---|",
        f"| {r['same_answer']:.1%} ({r['same_answer_ci95'][0]:.1%}-{r['same_answer_ci95'][1]:.1%}) "
        f"| {r['teacher_forced_top1']:.2%} of {r['answer_positions']} | {r['max_rel_logit_diff']:.4f} | {margin} "
        f"| {r['cache_agreement']:.0%} | {r['batch_agreement']:.0%} | {size:.0f} ({fp32:.0f}) |", ""]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.weight_only", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the int8 or int4 chat package")
    parser.add_argument("--reference", type=Path, required=True, help="the FP32 package it was quantized from")
    parser.add_argument("--photos", type=int, default=12, help="held-out photos, whole (default 12 of 39)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--label", default=None, help="a word for the results' file names: which model (e.g. distilled)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = gate(args.model, args.reference, heldout_images(Path(tmp), crops=0)[: args.photos], args.max_tokens)
    except PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table, payload = report(result), json.dumps(result, indent=2) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    family = result["model"].split()[0].removesuffix("ForConditionalGeneration").lower()  # not its " (parts)"
    name = "-".join(["weight-only", family, *([args.label] if args.label else []), result["precision"]])
    name += "-vision-int8" if result["vision_compute"] == "int8" else ""
    (RESULTS / f"{name}.md").write_text(table)
    (RESULTS / f"{name}.json").write_text(payload)
    if args.json:
        args.json.write_text(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
