"""Shared packaging tools: trace a captioner into a model package (two ONNX graphs, a tokenizer,
a manifest), whichever model it is (the bundled one in export/bundled.py, the Hugging Face
families in export/hf/).

- vision.onnx: pixel_values [+ text_ids] -> the decoder's memory, every layer's keys and values,
  computed once per image (and question or task prompt)
- decoder.onnx: input_ids, position_ids, cache_lengths, logit_index, every layer's cache buffer
  [+ cross-attention memory] -> logits at logit_index + every layer's cache buffer with the new
  tokens written in (export.kv: in place when bound so); one graph serves prefill and decoding
  (no `If`, no zero-length tensors).
The memory is of one of two kinds (the manifest's `decoder.memory`): "cross", read by
cross-attention (ViT-GPT2, BLIP, Florence-2), or "prefix", keys and values that fill the cache's
first slots (GIT's image tokens). Graph inputs and outputs are named by role
(runtime.manifest.roles). Both graphs are checked with onnx.checker and against eager PyTorch in
ONNX Runtime at shapes other than the export examples, and by greedy decoding of sample images,
before anything is written to `out` (export.check says how agreement is judged).
"""

import json
import platform
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import torch
from torch import nn
from torch.export import Dim

from runtime.graphs import Graphs
from runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, Decoder, roles, sha256
from runtime.search import Cache, GenerationConfig, cached, capacity, chat_memory, greedy, prefix_logits, start

from .check import Agreement, ExportError, Tolerance, compare, compare_argmax
from .destination import install
from .kv import TRANSLATIONS
from .progress import Progress
from .reference import step_args, torch_graph_step

OPSET = 18  # lowest the dynamo exporter targets natively; widest TensorRT/Jetson support
DECODER_OPSET = 24  # the decoder step's TensorScatter (export.kv)
GREEDY_SAMPLES, GREEDY_TOKENS = 3, 16  # random images decoded greedily by both, without stopping at EOS


@dataclass(frozen=True)
class GraphShape:
    """What the tracer and the manifest need to know about a captioner's two graphs."""

    decoder: Decoder
    memory_tokens: int  # with text_positions: the memory's tokens beyond the text's (Florence-2's image tokens)
    image_size: tuple[int, int]
    # > 0: the vision graph also takes text_ids (batch, text <= this many tokens), and the memory
    # is as long as what the text makes it: BLIP VQA's question encoding, Florence-2's encoder
    # states over [image tokens; task prompt].
    text_positions: int = 0
    # > 0: the vision graph takes one photo's tiles (SmolVLM), at most this many, each giving
    # memory_tokens image features of the language model's `width`.
    tiles: int = 0
    width: int = 0
    # > 0: the vision graph takes photos at their own size, sides multiples of this, one feature per
    # grid_factor x grid_factor pixels (Qwen2-VL); image_size is then an example size.
    grid_factor: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """The features' grid (rows, cols) of an image_size photo, for a grid_factor tower; else (0, 0)."""
        f = self.grid_factor
        return (self.image_size[0] // f, self.image_size[1] // f) if f else (0, 0)

    def memory(self, outputs: tuple, ids: np.ndarray) -> tuple:
        """The decoder's memory from the vision graph's outputs for rows of ids: with the image grid
        an M-RoPE decoder reads (runtime.search.chat_memory)."""
        if self.decoder.rope != "mrope":
            return outputs
        return chat_memory(self.decoder, outputs[0][0], ids, self.grid)

    def dims(self, default_capacity: int) -> dict:
        """Ranges of the graphs' symbolic dims, each with the size TensorRT optimises for (`opt`:
        one image, one new token, the cache of the package's default run, the model's real
        memory with a short prompt). TensorRT profiles are built from these."""
        positions = self.decoder.max_positions
        slots = positions + (self.memory_tokens if self.decoder.memory == "prefix" else 0)
        prompt = min(8, self.text_positions)
        text = {"text": {"min": 1, "opt": prompt, "max": self.text_positions},
                "memory": {"min": 1, "opt": self.memory_tokens + prompt,
                           "max": self.memory_tokens + self.text_positions}} if self.text_positions else {}
        tiles = {"tiles": {"min": 1, "opt": self.tiles, "max": self.tiles}} if self.tiles else {}
        if self.grid_factor:  # a photo's sides: multiples of the factor, its area up to `positions` features
            f = self.grid_factor
            tiles |= {f"{f}*rows": {"min": f, "opt": self.image_size[0], "max": f * positions},
                      f"{f}*cols": {"min": f, "opt": self.image_size[1], "max": f * positions}}
        if self.decoder.memory == "embeddings":  # one image's features per row of the step
            tiles["features"] = {"min": 1, "opt": max(self.tiles, 1) * self.memory_tokens, "max": positions}
        return {"batch": {"min": 1, "opt": 1, "max": None}, "seq": {"min": 1, "opt": 1, "max": positions},
                "picked": {"min": 1, "opt": 1, "max": positions},
                "capacity": {"min": 1, "opt": min(default_capacity, slots), "max": slots}, **text, **tiles}

    def io(self) -> dict[str, tuple[list[str], list[str]]]:
        return roles(self.decoder, bool(self.text_positions))

    def vision_inputs(self, batch: int, gen: torch.Generator) -> list[torch.Tensor]:
        """Random vision-graph inputs: pixels, and 5 text tokens where the graph takes text."""
        pixels = torch.randn(batch, 3, *self.image_size, generator=gen)
        text = [torch.randint(self.decoder.vocab_size, (batch, 5), generator=gen)] if self.text_positions else []
        return [pixels, *text]


class VisionGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, text_ids=None):
        return self.model.vision(pixel_values, *([] if text_ids is None else [text_ids]))


class DecoderStepGraph(nn.Module):
    """The step with its memory inputs as one list in role order (cross-attention keys then values,
    or image features and their index), or none (a prefix memory: left out of the example inputs,
    not passed empty, which would unname the dims)."""

    def __init__(self, model: nn.Module, decoder: Decoder):
        super().__init__()
        self.model, self.decoder = model, decoder

    def forward(self, input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values, memory=()):
        return self.model.step(input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values,
                               *step_args(self.decoder, dict(enumerate(memory))))


def export_graph(module, args, names, dynamic_shapes, path: Path) -> None:
    inputs, outputs = names
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_shapes=dynamic_shapes, opset_version=OPSET, dynamo=True,
                      external_data=True, verbose=False, custom_translation_table=TRANSLATIONS)
    # The rewrites touch nodes, not weights: the weights stay in the exporter's data file, unread (a
    # protobuf holds at most 2 GB, and a 3B model's decoder is 4 GB; the version converter serializes it).
    model = onnx.load(str(path), load_external_data=False)
    rewritten = gelu_in_fusable_order(model)
    if any(n.op_type in NEWER_OPS for n in model.graph.node):
        model, rewritten = to_decoder_opset(model), True
    if rewritten:
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


NEWER_OPS = ("TensorScatter", "RMSNormalization", "RotaryEmbedding")  # export.kv's, beyond opset 18


def to_decoder_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exported step (opset 18, where export.kv's ops are not yet defined) converted to opset 24
    by onnx's version converter, those ops held aside under a placeholder domain meanwhile."""
    for node in model.graph.node:
        if node.op_type in NEWER_OPS:
            node.domain = "edgecap.placeholder"
    model.opset_import.append(onnx.helper.make_opsetid("edgecap.placeholder", 1))
    model = onnx.version_converter.convert_version(model, DECODER_OPSET)
    for node in model.graph.node:
        if node.domain == "edgecap.placeholder":
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != "edgecap.placeholder"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def gelu_in_fusable_order(model: onnx.ModelProto) -> int:
    """x * (0.5 * (1 + erf(x / sqrt 2))), as the exporter writes GELU, -> (x * (1 + erf(..))) * 0.5:
    the same bits (a product with 0.5 is exact), in the order ONNX Runtime's GeluFusion knows,
    so that each GELU and the bias before it run as one BiasGelu kernel (DaViT at 768 px: 30
    GELUs, 5 elementwise passes each over up to 36864 x 512 values). Returns how many."""
    halves = {n.output[0] for n in model.graph.node
              if n.op_type == "Constant" and onnx.numpy_helper.to_array(n.attribute[0].t).tolist() == 0.5}
    halves |= {i.name for i in model.graph.initializer if not i.dims and i.data_location != onnx.TensorProto.EXTERNAL
               and onnx.numpy_helper.to_array(i).tolist() == 0.5}
    producer = {o: n for n in model.graph.node for o in n.output}
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def only_user(name: str, op: str):
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    rewritten = 0
    for erf in (n for n in model.graph.node if n.op_type == "Erf"):
        add = only_user(erf.output[0], "Add")
        half = add and only_user(add.output[0], "Mul")
        outer = half and only_user(half.output[0], "Mul")
        div = producer.get(erf.input[0])
        if not outer or div is None or div.op_type != "Div":
            continue
        constant = [i for i in half.input if i != add.output[0]]
        x = [i for i in outer.input if i != half.output[0]]
        if constant != [c for c in constant if c in halves] or len(constant) != 1 or x != [div.input[0]]:
            continue
        half.ClearField("input")
        half.input.extend([x[0], add.output[0]])
        outer.ClearField("input")
        outer.input.extend([half.output[0], constant[0]])
        rewritten += 1
    return rewritten


def graph_io(path: Path) -> dict:
    """Input/output names, dtypes and shapes (symbolic dims as names) from the graph itself."""
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [{"name": v.name,
                 "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values]

    return {"file": path.name, "inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def eager_outputs(model: nn.Module, inputs: list[torch.Tensor]) -> tuple[list, list]:
    with torch.inference_mode():
        return tuple([t.numpy() for t in layers] for layers in model.vision(*inputs))


def check_greedy(model: nn.Module, graphs: Graphs, shape: GraphShape, prompt: list[int], tol: Tolerance,
                 seen: Agreement) -> None:
    """Greedy decoding of random images through the graphs and through eager PyTorch gives the
    same tokens; where a row diverges, the reference must have scored the two picks within the
    tolerance (a tie), else the export is refused."""
    inputs = shape.vision_inputs(GREEDY_SAMPLES, torch.Generator().manual_seed(2))
    outputs = eager_outputs(model, inputs)
    ids = np.array(prompt, np.int64)
    cfg = GenerationConfig(max_new_tokens=min(GREEDY_TOKENS, shape.decoder.max_positions - len(prompt) + 1))
    eager_step, no_eos, slots = torch_graph_step(model, shape.decoder), -1, capacity(len(prompt), cfg.max_new_tokens)
    prompts = np.tile(ids, (GREEDY_SAMPLES, 1))
    ours = greedy(cached(graphs.step), graphs.start(shape.memory(graphs.encode(*(t.numpy() for t in inputs)), prompts), slots),
                  prompts, no_eos, cfg)
    outputs = shape.memory(outputs, prompts)
    theirs = greedy(cached(eager_step), start(shape.decoder, outputs, slots), prompts, no_eos, cfg)
    for row, (got, want) in enumerate(zip(ours, theirs, strict=True)):
        if got == want:
            continue
        t = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        fed = np.array([[*prompt, *want[:t]]])
        one = tuple([x[row : row + 1] for x in layers] for layers in outputs)
        logits = prefix_logits(eager_step, start(shape.decoder, one, fed.shape[1]), fed)[0, -1]
        margin = float(logits[want[t]] - logits[got[t]])
        if not margin <= tol.bound(float(np.abs(logits).max())):
            raise ExportError(f"greedy decoding of sample image {row}: token {t} is {got[t]} in ONNX Runtime and "
                              f"{want[t]} in eager PyTorch, which leads by {margin:.2e}")
    seen.greedy_tokens += sum(map(len, theirs))


def validate(model: nn.Module, shape: GraphShape, folder: Path, progress: Progress, tol: Tolerance,
             prompt: list[int]) -> Agreement:
    """ONNX Runtime vs eager at batch sizes and lengths the exporter never saw: every output
    within `tol`, the next token at every position, then greedy decoding of sample images."""
    graphs = Graphs.open(folder / "vision.onnx", folder / "decoder.onnx", shape.decoder)
    gen, rng = torch.Generator().manual_seed(1), np.random.default_rng(1)
    seen, d, eager_step = Agreement(), shape.decoder, torch_graph_step(model, shape.decoder)
    roles_ = shape.io()
    for batch in (1, 3):
        inputs = shape.vision_inputs(batch, gen)
        outputs = eager_outputs(model, inputs)
        got = graphs.encode(*(t.numpy() for t in inputs))
        compare(f"vision graph at batch {batch}", roles_["vision"][1], [x for layers in got for x in layers],
                [x for layers in outputs for x in layers], tol, seen)
        # Rows of different lengths (the batch's last row one slot behind), capacities beyond what is
        # written: slots not yet written hold noise, which must stay masked.
        for past, seq, slots in ((0, 1, 1), (0, 7, 9), (5, 1, 6), (11, 3, 17)):
            lengths = np.full(batch, past) - (np.arange(batch) == batch - 1) * (past > 0) * (batch > 1)
            ids = rng.integers(d.vocab_size, size=(batch, seq))
            if d.memory == "embeddings":  # placeholders that take image features, where a prompt starts
                ids[:, 1 : min(seq - 1, 1 + shape.memory_tokens)] = d.image_token
            positions = lengths[:, None] + np.arange(seq)
            memory = () if d.memory == "prefix" else shape.memory(outputs, ids)
            index = np.tile(np.arange(seq), (batch, 1))
            noise = [rng.standard_normal((batch, d.kv_heads, slots, d.head_dim)).astype(np.float32) for _ in range(2 * d.layers)]
            eager, ours = (Cache([x.copy() for x in noise[: d.layers]], [x.copy() for x in noise[d.layers :]], lengths,
                                 np.zeros(batch, np.int64)) for _ in range(2))
            want = [eager_step(ids, positions, eager, memory, index), *eager.keys, *eager.values]
            got = [graphs.step(ids, positions, ours, memory, index), *ours.keys, *ours.values]
            what = f"decoder step graph at batch {batch}, past {past}, length {seq}"
            compare(what, roles_["decoder"][1], got, want, tol, seen)
            compare_argmax(what, got[0], want[0], tol, seen)
        progress.update(batch, seen.summary())
    check_greedy(model, graphs, shape, prompt, tol, seen)
    progress.update(3, f"{seen.greedy_tokens} greedy tokens identical")
    return seen


def trace(model: nn.Module, shape: GraphShape, folder: Path, progress: Progress, tol: Tolerance,
          prompt: list[int]) -> Agreement:
    """Both graphs into `folder`, checked by onnx.checker and against eager in ONNX Runtime.
    `model` has `vision(pixels[, text_ids]) -> per-layer (keys, values)` and `step(...)` as in
    export.hf.decoders; `prompt` starts the greedy check as it starts every caption."""
    d, io = shape.decoder, shape.io()
    batch = Dim("batch", min=1, max=1024)
    text = Dim("text", min=1, max=shape.text_positions) if shape.text_positions else None
    images = Dim("tiles", min=1, max=shape.tiles) if shape.tiles else batch
    sides = {}
    if shape.grid_factor:  # a photo at its own size: sides multiples of the factor
        sides = {2: shape.grid_factor * Dim("rows", min=1, max=d.max_positions),
                 3: shape.grid_factor * Dim("cols", min=1, max=d.max_positions)}
    vision_dims = {"pixel_values": {0: images, **sides}, **({"text_ids": {0: batch, 1: text}} if text else {})}
    export_graph(VisionGraph(model).eval(), tuple(shape.vision_inputs(2, torch.Generator())), io["vision"], vision_dims,
                 folder / "vision.onnx")
    progress.update(1, "vision graph traced and checked")
    # Example sizes >= 2 everywhere and distinct, or the exporter specialises the dims.
    positions = d.max_positions
    slots = Dim("capacity", min=1, max=positions + (shape.memory_tokens if d.memory == "prefix" else 0))
    seq, picked = Dim("seq", min=1, max=positions), Dim("picked", min=1, max=positions)
    cache = [torch.randn(2, d.kv_heads, 7, d.head_dim) for _ in range(2 * d.layers)]
    if d.memory == "cross":
        memory = [torch.randn(2, d.heads, 4 if text else shape.memory_tokens, d.head_dim) for _ in range(2 * d.layers)]
        memory_dims = [{0: batch, **({2: Dim("memory", min=1, max=shape.memory_tokens + shape.text_positions)}
                                     if text else {})}] * len(memory)
    elif d.memory == "embeddings":
        memory = [torch.randn(2, 4, shape.width), torch.tensor([[-1, 0, 1], [0, 1, -1]])]
        memory_dims = [{0: batch, 1: Dim("features", min=1, max=positions)}, {0: batch, 1: seq}]
        if d.rope == "mrope":  # (first image token, rows, cols)
            memory, memory_dims = [*memory, torch.tensor([[1, 2, 2], [0, 2, 3]])], [*memory_dims, {0: batch}]
    else:
        memory, memory_dims = [], []
    example = (torch.zeros(2, 3, dtype=torch.int64), torch.tensor([[2, 3, 4], [2, 3, 4]]), torch.tensor([2, 2]),
               torch.tensor([[0, 2], [1, 2]]), cache[: d.layers], cache[d.layers :], *([memory] if memory else []))
    dynamic = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}, "cache_lengths": {0: batch},
               "logit_index": {0: batch, 1: picked}, "past_keys": [{0: batch, 2: slots}] * d.layers,
               "past_values": [{0: batch, 2: slots}] * d.layers, **({"memory": memory_dims} if memory else {})}
    export_graph(DecoderStepGraph(model, d).eval(), example, io["decoder"], dynamic, folder / "decoder.onnx")
    progress.update(2, "decoder step graph traced and checked")
    seen = validate(model, shape, folder, Progress("validate", 3, every_s=0), tol, prompt)
    progress.update(3, f"ONNX Runtime matches eager PyTorch ({seen.summary()}, {seen.argmax_rows} next tokens "
                       f"and {seen.greedy_tokens} greedy tokens agree)")
    return seen


def write_package(folder: Path, out: Path, manifest: dict) -> dict:
    """Complete the manifest from what is in `folder` (files, graph signatures), write it,
    and put the finished package at `out` (export.destination)."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "files": {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())},
                "graphs": {"vision": graph_io(folder / "vision.onnx"), "decoder": graph_io(folder / "decoder.onnx")}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    install(folder, out)
    return manifest


def versions() -> dict:
    names = ["torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "tokenizers", "numpy", "pillow"]
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def report(out: Path, manifest: dict, seen: Agreement, progress: Progress) -> str:
    """The one-line summary an export returns (the entry point prints it)."""
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    return (f"exported {out}: {len(manifest['files'])} files, {size:.1f} MiB, opset {OPSET}, "
            f"ONNX Runtime vs eager {seen.summary()}, in {progress.elapsed()}")
