"""python -m export {train,package,quantize,hf,random-hf} ... : the heavy side (torch, torchvision,
transformers, onnx)."""

import argparse
import sys
from pathlib import Path

from .train import DEFAULT_CHECKPOINT, TrainConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the concept decoder on generated data (deterministic)")
    tr.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    tr.add_argument("--steps", type=int, default=TrainConfig.steps)
    tr.add_argument("--seed", type=int, default=TrainConfig.seed)
    pk = sub.add_parser("package", help="export the trained captioner to an ONNX model package")
    pk.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    pk.add_argument("--out", type=Path, required=True)
    qz = sub.add_parser("quantize", help="a reduced-precision package from an fp32 one")
    qz.add_argument("src", type=Path, help="fp32 model package")
    qz.add_argument("--precision", choices=["int8", "fp16"], required=True)
    qz.add_argument("--out", type=Path, required=True)
    qz.add_argument("--calibration", type=int, default=96, help="int8: calibration images (default 96)")
    hf = sub.add_parser("hf", help="export a local Hugging Face captioner folder (VisionEncoderDecoder, BLIP)")
    hf.add_argument("src", type=Path, help="folder with config.json, weights, tokenizer, preprocessor_config.json")
    hf.add_argument("--out", type=Path, required=True)
    hf.add_argument("--prompt", default=None, help='BLIP text prefix, e.g. "a picture of" (as the pipeline takes it)')
    hf.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="fp32")
    rh = sub.add_parser("random-hf", help="build a random-weight Hugging Face captioner folder offline (tests, benchmarks)")
    rh.add_argument("out", type=Path)
    rh.add_argument("--encoder", choices=["vit", "deit", "swin", "blip"], default="vit")
    rh.add_argument("--decoder", choices=["gpt2", "bert"], default="gpt2")
    rh.add_argument("--size", choices=["tiny", "base"], default="tiny")
    args = parser.parse_args(argv)

    if args.command == "train":
        from .train import train

        train(TrainConfig(steps=args.steps, seed=args.seed), args.out)
    elif args.command == "package":
        from .onnx_export import export_package

        export_package(args.checkpoint, args.out)
    elif args.command == "quantize":
        from .quantize import quantize_package

        quantize_package(args.src, args.precision, args.out, args.calibration)
    elif args.command == "hf":
        from .hf import export_hf

        export_hf(args.src, args.out, args.prompt, args.precision)
    else:
        from .hf_random import build_blip, build_vision_encoder_decoder

        # Tiny models are conditioned for parity tests; base ones keep transformers' own init
        # (tied embeddings, std 0.02): captions run to the length limit, a fixed workload to time.
        conditioned = args.size == "tiny"
        if args.encoder == "blip":
            build_blip(args.out, args.size, conditioned)
        else:
            build_vision_encoder_decoder(args.out, args.encoder, args.decoder, args.size, conditioned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
