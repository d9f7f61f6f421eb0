"""python -m benchmarks.int8_curve [--model PKG] [--budgets B ...]: INT8's size/fidelity curve.

For each FP32 budget (the fraction of the encoder's Conv/Gemm weights kept FP32, most sensitive
layers first; export.quantize.FP32_BUDGET is the shipped choice), quantizes the FP32 package and
measures the result on the held-out photos against eager PyTorch (benchmarks.parity), which no
quantization step reads. Writes benchmarks/results/int8-curve.{json,md}: the measurement the
CPU default's budget is chosen from.
"""

import argparse
import json
import tempfile
from pathlib import Path

from export.evaluation import heldout_images
from export.quantize import FP32_BUDGET, quantize_package
from runtime import DEFAULT_MODEL
from runtime.manifest import load_manifest

from .parity import run

RESULTS = Path(__file__).parent / "results"


def package_bytes(package: Path) -> int:
    return sum(f["bytes"] for f in load_manifest(package).data["files"].values())


def point(model: Path, budget: float, images: list[str], work: Path) -> dict:
    out = work / f"int8-{budget}"
    quantize_package(model, "int8", out, fp32_budget=budget)
    result = run(out, None, images)
    vision = load_manifest(out).data["source"]["quantization"]["vision"]
    return {"fp32_budget": budget, "size_mib": round(package_bytes(out) / 2**20, 2),
            "size_fraction": round(package_bytes(out) / package_bytes(model), 4),
            "fp32_layers": len(vision["fp32_layers"]), "int8_layers": vision["int8_layers"],
            **{k: result[k] for k in ("images", "exact_caption_match", "exact_caption_match_ci95",
                                      "primary_concept_match", "teacher_forced_top1", "cache_agreement")}}


def table(points: list[dict]) -> str:
    rows = ["| FP32 budget | size | layers FP32 | identical captions (95% CI) | same primary concept | "
            "teacher-forced top-1 | cache = no cache |", "|---|---|---|---|---|---|---|"]
    for p in points:
        low, high = p["exact_caption_match_ci95"]
        shipped = " (shipped)" if p["fp32_budget"] == FP32_BUDGET else ""
        rows.append(f"| {p['fp32_budget']:g}{shipped} | {p['size_mib']} MiB ({p['size_fraction']:.0%}) | "
                    f"{p['fp32_layers']} of {p['fp32_layers'] + p['int8_layers']} | {p['exact_caption_match']:.1%} "
                    f"({low:.1%}-{high:.1%}) | {p['primary_concept_match']:.1%} | {p['teacher_forced_top1']:.2%} | "
                    f"{p['cache_agreement']:.0%} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="FP32 package (default: the bundled one)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.08, 0.16, 0.32, 0.5, 1.0])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        images = heldout_images(Path(tmp))
        points = []
        for budget in args.budgets:
            points.append(point(args.model, budget, images, Path(tmp)))
            print(json.dumps(points[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8-curve.json").write_text(json.dumps({"held_out_inputs": len(images), "points": points}, indent=1) + "\n")
    (RESULTS / "int8-curve.md").write_text(f"INT8 size/fidelity on the {len(images)} held-out inputs, against "
                                           f"FP32 eager PyTorch (`python -m benchmarks.int8_curve`).\n\n" + table(points))
    print(table(points))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
