"""python -m export {train,package,quantize,hf,random-hf,distill} ... : the heavy side (torch, torchvision,
transformers, onnx)."""

import argparse
import sys
from pathlib import Path

from . import DEFAULT_CHECKPOINT, needs_extra
from .check import ExportError, Tolerance
from .destination import UsageError, check_out

# Only argument parsing happens before a command runs: torch and transformers are imported by
# the command that needs them, so --help is instant and a runtime-only install gets one line.


def add_tolerance(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rtol", type=float, default=Tolerance.rtol,
                        help="self-check: allowed difference relative to each output's largest |value| "
                             f"(default {Tolerance.rtol:g})")
    parser.add_argument("--atol", type=float, default=Tolerance.atol,
                        help=f"self-check: allowed absolute difference on top (default {Tolerance.atol:g})")


def add_vision_compute(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vision-compute", choices=["fp32", "int8"], default="fp32",
                        help="int8: the vision graph's MatMuls compute in int8, activations quantized per token "
                             "(faster on CPUs with int8 dot products, at a fidelity cost the calibration agreement "
                             "and benchmarks.parity measure); fp32 (default): int8 weights for size only")


def run(args) -> str:
    """The command's work; returns its summary. Heavy modules are imported per command."""
    if args.command == "train":
        from .train import TrainConfig, train

        given = {"steps": args.steps, "seed": args.seed}
        summary = train(TrainConfig(**{k: v for k, v in given.items() if v is not None}), args.out)
        return (f"trained {summary['steps']} steps: loss {summary['final_loss']:.4f}, held-out exact caption match "
                f"{summary['heldout_exact_match']:.1%} ({summary['heldout']} unseen distributions) -> {args.out}")
    if args.command == "distill":
        from runtime.cli import IMAGE_SUFFIXES

        from .distill import DistillConfig, distill
        from .progress import Progress

        if not args.photos.is_dir():
            raise UsageError(f"--photos {args.photos}: not a folder")
        photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        cfg = DistillConfig(**({"steps": args.steps} if args.steps else {}))
        s = distill(args.src, photos, cfg, Progress("distill", cfg.steps))
        return (f"distilled {s['steps']} steps on {s['photos']} photos ({s['answers']} answers): "
                f"loss {s['final_loss']:.4f}, teacher-forced top-1 {s['teacher_forced_top1']:.1%} "
                f"on {s['evaluated']} answers -> {args.src}")
    if args.command == "package":
        from .bundled import export_package

        return export_package(args.checkpoint, args.out, Tolerance(args.rtol, args.atol))
    if args.command == "quantize":
        from .quantize import quantize_package

        budget = {} if args.fp32_budget is None else {"fp32_budget": args.fp32_budget}
        return quantize_package(args.src, args.precision, args.out, args.calibration, **budget,
                                vision_compute=args.vision_compute)
    if args.command == "hf":
        from .hf import export_hf

        return export_hf(args.src, args.out, args.prompt, args.precision, Tolerance(args.rtol, args.atol),
                         args.vision_compute)
    from .hf.blip import build_blip
    from .hf.fastvlm import build_fastvlm
    from .hf.florence2 import build_florence2
    from .hf.git import build_git
    from .hf.qwen2_5_vl import build_qwen2_5_vl
    from .hf.smolvlm import build_smolvlm
    from .hf.vision_encoder_decoder import build_vision_encoder_decoder

    # Tiny models are conditioned for parity tests; base ones keep transformers' own init
    # (tied embeddings, std 0.02): captions run to the length limit, a fixed workload to time.
    conditioned = args.size == "tiny"
    sizes = {"smolvlm": ("tiny", "small", "256m", "500m"), "fastvlm": ("tiny", "0.5b"),
             "qwen2_5_vl": ("tiny", "3b")}.get(args.encoder, ("tiny", "base"))
    if args.size not in sizes:
        raise UsageError(f"--size {args.size} is not a size of {args.encoder}: it has {', '.join(sizes)}")
    chat = {"smolvlm": build_smolvlm, "fastvlm": build_fastvlm, "qwen2_5_vl": build_qwen2_5_vl}
    if args.encoder in chat:
        build = chat[args.encoder]
        return str(build(args.out, args.size, conditioned, realistic=args.realistic))
    if args.encoder in ("git", "florence2"):
        if args.realistic:
            raise ExportError("--realistic is for the vit, deit, swin, blip, blip-vqa, smolvlm, fastvlm and qwen2_5_vl "
                              "families")
        return str((build_git if args.encoder == "git" else build_florence2)(args.out, args.size, conditioned))
    if args.encoder in ("blip", "blip-vqa"):
        return str(build_blip(args.out, args.size, conditioned, realistic=args.realistic, vqa=args.encoder == "blip-vqa"))
    return str(build_vision_encoder_decoder(args.out, args.encoder, args.decoder, args.size, conditioned,
                                            realistic=args.realistic))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the concept decoder on generated data (deterministic)")
    tr.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    tr.add_argument("--steps", type=int, default=None, help="default: export.train.TrainConfig.steps")
    tr.add_argument("--seed", type=int, default=None, help="default: export.train.TrainConfig.seed")
    pk = sub.add_parser("package", help="export the trained captioner to an ONNX model package")
    pk.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    pk.add_argument("--out", type=Path, required=True)
    add_tolerance(pk)
    qz = sub.add_parser("quantize", help="a reduced-precision package from an fp32 one")
    qz.add_argument("src", type=Path, help="fp32 model package")
    qz.add_argument("--precision", choices=["int8", "int4", "fp16"], required=True,
                    help="int4: 4-bit weights for the decoder (blocks of 32), int8 for the rest")
    qz.add_argument("--out", type=Path, required=True)
    qz.add_argument("--calibration", type=int, default=96, help="int8: calibration images (default 96)")
    qz.add_argument("--fp32-budget", type=float, default=None,
                    help="int8: fraction of the encoder's Conv/Gemm weights kept FP32, most sensitive layers first "
                         "(default: export.quantize.FP32_BUDGET; more is larger on disk and closer to FP32)")
    add_vision_compute(qz)
    hf = sub.add_parser("hf", help="export a local Hugging Face captioner folder (VisionEncoderDecoder, BLIP, "
                                   "BLIP VQA, GIT, Florence-2, SmolVLM, FastVLM, Qwen2.5-VL)")
    hf.add_argument("src", type=Path, help="folder with config.json, weights, tokenizer, preprocessor_config.json")
    hf.add_argument("--out", type=Path, required=True)
    hf.add_argument("--prompt", default=None, help='BLIP text prefix, e.g. "a picture of" (as the pipeline takes it)')
    hf.add_argument("--precision", choices=["fp32", "int8", "int4", "fp16"], default="fp32")
    add_vision_compute(hf)
    add_tolerance(hf)
    rh = sub.add_parser("random-hf", help="build a random-weight Hugging Face captioner folder offline (tests, benchmarks)")
    rh.add_argument("out", type=Path)
    rh.add_argument("--encoder", choices=["vit", "deit", "swin", "blip", "blip-vqa", "git", "florence2", "smolvlm",
                                          "fastvlm", "qwen2_5_vl"],
                    default="vit", help="the vision encoder of a VisionEncoderDecoderModel, or a whole family "
                                        "(blip, blip-vqa, git, florence2, smolvlm, fastvlm, qwen2_5_vl)")
    rh.add_argument("--decoder", choices=["gpt2", "bert"], default="gpt2")
    rh.add_argument("--size", choices=["tiny", "small", "base", "256m", "500m", "0.5b", "3b"], default="tiny",
                    help="base: the family's base checkpoint's architecture; small: SmolVLM-256M's language-model "
                         "widths at 3 layers, to train with `distill`; 256m, 500m: SmolVLM-256M / -500M's; "
                         "0.5b: FastVLM-0.5B's; 3b: Qwen2.5-VL-3B's widths, heads and vocabulary with 8 vision "
                         "blocks and 6 language-model layers")
    rh.add_argument("--realistic", action="store_true",
                    help="a trained checkpoint's magnitudes: logits in the tens to hundreds, two residual "
                                         "dimensions at +-400")
    ds = sub.add_parser("distill", help="train a random-weight chat folder (random-hf) on the bundled captioner's "
                                        "answers about photos: trained weights for the weight-only gate")
    ds.add_argument("src", type=Path, help="a SmolVLM, FastVLM or Qwen2.5-VL folder, trained in place")
    ds.add_argument("--photos", type=Path, required=True,
                    help="a folder of training photos (e.g. python -m benchmarks.gcompris's), never the held-out set")
    ds.add_argument("--steps", type=int, default=None, help="default: export.distill.DistillConfig.steps")
    args = parser.parse_args(argv)

    try:
        if args.command in ("package", "quantize", "hf"):
            check_out(args.out)  # before any work: a folder that is not ours is never replaced
        print(run(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        print(f"error: {needs_extra(e, 'python -m export', 'export')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
