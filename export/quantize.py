"""Reduced-precision model packages from an FP32 one: same layout, own manifest.

fp16: both graphs converted with onnxruntime's float16 tool, inputs and outputs kept
FP32 (the runtime and the KV cache stay FP32), and LayerNormalization, Softmax and
TopK kept in FP32 so that nothing overflows. Runs on CPU; made for CUDA/TensorRT.
(INT8 is measured but not shipped: see the README's "Quantization" section.)
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import convert_float_to_float16

from runtime.manifest import GRAPHS, MANIFEST, load_manifest, sha256

from .onnx_export import graph_io
from .progress import Progress

FP32_OPS = ["LayerNormalization", "Softmax", "TopK"]


def topological_sort(graph: onnx.GraphProto) -> None:
    """The float16 tool appends its input casts at the end; ONNX wants producers first."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            raise SystemExit("error: the converted graph has a cycle or a dangling input")
        for n in runnable:
            ready.update(n.output)
        ordered += runnable
        pending = [n for n in pending if n not in runnable]
    graph.ClearField("node")
    graph.node.extend(ordered)


def to_fp16(src: Path, dst: Path) -> None:
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=FP32_OPS)
    topological_sort(model.graph)
    del model.graph.value_info[:]  # stale FP32 annotations the tool leaves on converted tensors
    onnx.save(model, str(dst))  # small enough for one file: no external data
    onnx.checker.check_model(str(dst), full_check=True)


def check_finite(folder: Path, manifest: dict) -> None:
    """Random images through both graphs, prefill and one cached step: no NaN or Inf."""
    vision = ort.InferenceSession(str(folder / manifest["graphs"]["vision"]["file"]), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(folder / manifest["graphs"]["decoder"]["file"]), providers=["CPUExecutionProvider"])
    names = [i["name"] for i in manifest["graphs"]["decoder"]["inputs"]]
    pixels = np.random.default_rng(0).uniform(-1, 1, (3, 3, 224, 224)).astype(np.float32)
    cross = vision.run(None, {"pixel_values": pixels})
    layers, n, heads, _, dim = cross[0].shape
    empty = np.zeros((layers, n, heads, 0, dim), np.float32)
    ids = np.tile(np.array(manifest["generation"]["prompt_ids"], np.int64), (n, 1))
    logits, key, value = decoder.run(None, dict(zip(names, (ids, empty, empty, *cross))))
    logits2, _, _ = decoder.run(None, dict(zip(names, (ids, key, value, *cross))))
    for what, array in (("cross K/V", cross[0]), ("prefill logits", logits), ("step logits", logits2)):
        if not np.isfinite(array).all():
            raise SystemExit(f"error: FP16 {what} contain NaN or Inf")


def quantize_package(src: Path, precision: str, out: Path) -> None:
    manifest = load_manifest(src).data
    if manifest["precision"] != "fp32":
        raise SystemExit(f"error: {src} is a {manifest['precision']} package; start from an fp32 one")
    progress = Progress(f"quantize {precision}", len(GRAPHS) + 1, every_s=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, role in enumerate(GRAPHS, 1):
            name = manifest["graphs"][role]["file"]
            to_fp16(src / name, folder / name)
            progress.update(i, f"{name} converted and checked")
        check_finite(folder, manifest)
        tokenizer = manifest["tokenizer"]["file"]
        shutil.copy(src / tokenizer, folder / tokenizer)
        files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())}
        new = {**manifest, "precision": precision, "files": files,
               "graphs": {role: graph_io(folder / manifest["graphs"][role]["file"]) for role in GRAPHS},
               "source": {**manifest["source"], "quantization": {
                   "from_package": manifest.get("name"), "from_files": manifest["files"],
                   "method": "onnxruntime.transformers.float16.convert_float_to_float16",
                   "keep_io_types": True, "fp32_ops": FP32_OPS}}}
        (folder / MANIFEST).write_text(json.dumps(new, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(folder, out)
        out.chmod(0o755)
    progress.update(len(GRAPHS) + 1, "written")
    before = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    after = sum(f["bytes"] for f in files.values()) / 2**20
    print(f"quantized {src} -> {out}: {precision}, {after:.1f} MiB ({after / before:.0%} of {before:.1f} MiB), "
          f"no NaN/Inf, in {progress.elapsed()}")
