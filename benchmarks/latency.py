"""python -m benchmarks.latency [--model PKG] [--hf DIR [--peer-python PY]] [--florence2 DIR] [--chat DIR [--packages DIR] [--llama-mtmd BIN --gguf MMPROJ MODEL...]] [--quick] [--json OUT]

Engines side by side in one process: each scenario's rounds interleave the variants
(A B C A B C ...) after a warm-up, and the report gives medians and p90 over rounds.

- The bundled model: eager PyTorch (its own KV cache, inference_mode) vs the runtime,
  at batch 1 and 8, greedy and beam 4, 2 threads and 1.
- With --hf DIR (a Hugging Face captioner folder, e.g. `python -m export random-hf DIR
  --size base` for the vit-gpt2-image-captioning architecture): transformers' own
  processor + `generate`, the runtime on `python -m export hf DIR`, and optimum-onnx's
  ORTModelForVision2Seq run by --peer-python (a venv holding optimum-onnx, which pins
  transformers < 4.58) as a worker process that times its own calls the same way.
- With --chat DIR (alone; an LLM-based model's folder): transformers' processor + `generate` vs the
  runtime FP32, INT8 and INT4, one photo and its default question, every answer --max-tokens long
  (EOS off), and whole processes; with --llama-mtmd BIN --gguf MMPROJ MODEL..., llama.cpp's
  llama-mtmd-cli on the same folder converted to GGUF (benchmarks.gguf_peer), as a peer. Into
  latency-chat-<model_type>-cpu.*.
- With --florence2 DIR (alone): transformers' Florence-2 processor + `generate` vs the runtime FP32
  and INT8 (`--vision-compute int8`), <CAPTION> and <OD>, greedy and beam 3, and whole processes'
  cold start and peak RSS, into latency-florence2-cpu.*.
- The floor: weight bytes read per decode step over the memory bandwidth measured in
  the same run, and each variant's ms/token as a multiple of it.
- Whole processes: cold start of `python -m runtime.caption` and peak RSS, runtime vs eager.

Writes benchmarks/results/latency-cpu.{md,json,png} (not with --quick, which is a smoke run).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

RESULTS = Path(__file__).parent / "results"
SAMPLES = Path(__file__).parent.parent / "runtime" / "samples"
ROOT = Path(__file__).parent.parent


@dataclass
class Variant:
    """How one engine captions: `caption(images) -> token lists`; `vision(images)` is the
    image side alone (preprocessing + encoder) and `first_token(images)` adds the prefill."""

    caption: Callable
    vision: Callable | None = None
    first_token: Callable | None = None
    weight_bytes: int | None = None  # decoder weights read per step, for the floor
    clock: "StepClock | None" = None  # marks each decoder step of `caption`


class StepClock:
    """The start and end of each decoder step of an answer, marked from inside the engine (a wrapper
    on the runtime's step; hooks on a torch model's language model and output head). Decode ms per
    token is the time from the first step's end (the first token) to the last's over the steps
    between, and the first step's own time is the prompt's prefill (with whatever an engine runs
    inside its first step: GIT's image encoder), inside one answer: subtracting a separately timed
    first token, or vision, would carry the vision's run-to-run spread, which for a 16 s vision
    tower is more than a 10 ms step (measured: +-10 ms per token) or a 1 s prefill."""

    def __init__(self):
        self.starts: list[float] = []
        self.ends: list[float] = []

    def start(self, *_):
        self.starts.append(time.perf_counter())

    def end(self, *_):
        self.ends.append(time.perf_counter())

    def around(self, step: Callable) -> Callable:
        def timed_step(*args, **kwargs):
            self.start()
            out = step(*args, **kwargs)
            self.end()
            return out
        return timed_step

    def read(self) -> tuple[float | None, float | None]:
        """(the first step's ms, ms per later step) of the answer since the last read, or None."""
        (starts, ends), self.starts, self.ends = (self.starts, self.ends), [], []
        first = (ends[0] - starts[0]) * 1000 if starts and ends else None
        return first, (ends[-1] - ends[0]) * 1000 / (len(ends) - 1) if len(ends) > 1 else None


_CLOCKS: dict[int, StepClock] = {}


def step_clock(engine) -> StepClock:
    """An engine's one clock (scenarios share engines), on what runs once per decoder step: a runtime
    Captioner's graph step, an eager Reference's step, a transformers model's language model (its
    start) and output head (its end)."""
    if id(engine) not in _CLOCKS:
        clock = _CLOCKS[id(engine)] = StepClock()
        if hasattr(engine, "graphs"):
            engine.graphs.step = clock.around(engine.graphs.step)
        elif hasattr(engine, "graph_step"):
            engine.graph_step = clock.around(engine.graph_step)
        else:  # BLIP keeps its output head in its text decoder
            model = engine.model
            model.get_decoder().register_forward_pre_hook(clock.start)
            (model.get_output_embeddings() or model.text_decoder.get_output_embeddings()).register_forward_hook(clock.end)
    return _CLOCKS[id(engine)]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - start) * 1000, out


def summary(values) -> dict:
    return {"median": round(statistics.median(values), 3), "p90": round(float(np.percentile(values, 90)), 3)}


def measure(variants: dict[str, Variant], batches: list[list], rounds: int) -> dict:
    """Per variant: ms per caption (per batch / batch size), ms per generated token (every
    step is a graph run, EOS included), vision ms, time to first token, the first decoder step's
    ms and decode ms per token (StepClock: inside each answer, where the engine's steps can be
    marked), images/s."""
    samples = {name: {"caption_ms": [], "ms_per_token": [], "vision_ms": [], "first_token_ms": [],
                      "first_step_ms": [], "decode_ms_per_token": [], "images_s": []} for name in variants}
    same = dict.fromkeys(variants, 0)
    for v in variants.values():  # warm-up: allocations, thread pools, lazy init
        v.caption(batches[0])
    for _ in range(rounds):
        for batch in batches:
            first = None
            for name, v in variants.items():
                s = samples[name]
                if v.clock:
                    v.clock.read()  # forgets the warm-up's and the other timings' steps
                ms, tokens = timed(v.caption, batch)
                first_step, decode = v.clock.read() if v.clock else (None, None)
                first = tokens if first is None else first
                same[name] += tokens == first
                s["caption_ms"].append(ms / len(batch))
                s["images_s"].append(1000 * len(batch) / ms)
                s["ms_per_token"].append(ms / max(len(t) + 1 for t in tokens))
                if v.vision:
                    s["vision_ms"].append(timed(v.vision, batch)[0])
                if v.first_token:
                    s["first_token_ms"].append(timed(v.first_token, batch)[0])
                if first_step is not None:
                    s["first_step_ms"].append(first_step)
                if decode is not None:
                    s["decode_ms_per_token"].append(decode)
    return {name: {k: summary(vals) for k, vals in s.items() if vals}
            | {"same_tokens_as_first": same[name] / (rounds * len(batches))} for name, s in samples.items()}


def read_bandwidth_gb_s(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Read-only bandwidth at the run's thread count: bytes read per second by `threads` threads each
    taking a part's dot product with itself (BLAS's vectorised sdot, one pass; numpy releases the
    GIL), best of `repeats`. A decode step only reads its weights, so this is its floor. np.sum, the
    probe before, is slower than the memory on some CPUs (an EPYC: 40.6 GB/s against sdot's 51.4,
    and Qwen2.5-VL's INT8 step read its weights at 51): the floor it gave was not one. A copy's
    bytes read + written is another quantity."""
    from concurrent.futures import ThreadPoolExecutor

    parts = np.array_split(np.ones(mib << 18, dtype=np.float32), threads)
    with ThreadPoolExecutor(threads) as pool:
        best = min(timed(lambda: list(pool.map(lambda p: np.dot(p, p), parts)))[0] for _ in range(repeats))
    return sum(p.nbytes for p in parts) / best / 1e6


def decoder_weight_bytes(package: Path) -> int:
    """The weight bytes a decoder step reads: its graph's initializers, less those only gathered
    from, an embedding table and its scales, of which a step reads a row per token (Qwen2.5-VL's
    151,936-row table is a quarter of its INT4 decoder file); a head tied to its table reads it whole."""
    import onnx

    manifest = json.loads((package / "manifest.json").read_text())
    model = onnx.load(str(package / manifest["graphs"]["decoder"]["file"]), load_external_data=False)
    gathered = {}  # per initializer: whether each read is a gather's of rows (not of its indices)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            gathered.setdefault(name, set()).add(node.op_type in ("Gather", "GatherBlockQuantized") and i != 1)
    return sum(tensor_bytes(t) for t in model.graph.initializer if False in gathered.get(t.name, ()))


def tensor_bytes(tensor) -> int:
    """An initializer's stored bytes, in its graph file or in external data."""
    external = {e.key: e.value for e in tensor.external_data}
    if "length" in external:
        return int(external["length"])
    import onnx

    return len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes


def in_torch(fn: Callable, threads: int) -> Callable:
    """An eager call under inference_mode with `threads` intra-op threads (torch's pool is
    process-wide, and the scenarios differ in threads: set per call)."""
    import torch

    def run(batch):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return fn(batch)

    return run


def runtime_variant(cap, beams: int, task: str | None = None, max_new_tokens: int | None = None) -> Variant:
    """The runtime's captions; `vision` is everything before the first decoder step (with a
    task, Florence-2's text encoder over [image; prompt] included)."""
    from runtime.preprocess import load_pixels
    from runtime.search import cached, prefill

    def encode(batch):
        pixels = np.stack([load_pixels(i, cap.manifest.preprocess) for i in batch])
        return cap.graphs.encode(pixels, *(np.tile(x, (len(batch), 1)) for x in cap.prompting.ask(task=task)[1]))

    def first_token(batch):
        state = cap.graphs.start(encode(batch), len(cap.prompting.prefix))
        return prefill(cached(cap.graphs.step), state, np.tile(cap.prompting.prefix, (len(batch), 1)))

    return Variant(lambda b: [c.tokens for c in cap.caption(b, num_beams=beams, batch_size=8, task=task,
                                                            max_new_tokens=max_new_tokens)],
                   encode, first_token, decoder_weight_bytes(cap.manifest.root), step_clock(cap))


def bundled_scenarios(args, threads: int) -> dict:
    """Eager PyTorch vs the runtime on the bundled model: {scenario: (variants, batches)}."""

    from export.reference import Reference, checkpoint_for
    from export import DEFAULT_CHECKPOINT
    from runtime import DEFAULT_MODEL, Captioner
    from runtime.engine import BUNDLED
    from runtime.search import cached, prefill

    package = args.model or DEFAULT_MODEL
    captioners = {n: Captioner(package, provider="cpu", threads=n) for n in sorted({1, threads})}
    # The INT8 variant beside FP32 when the bundled model is measured.
    int8 = {n: Captioner(BUNDLED["int8"], provider="cpu", threads=n) for n in captioners} if args.model is None else {}
    first = next(iter(captioners.values()))
    ref = Reference(checkpoint_for(first.manifest, DEFAULT_CHECKPOINT.parent), first.manifest)
    images = sorted(SAMPLES.glob("*.jpg"))

    def variants(n_threads: int, beams: int) -> dict[str, Variant]:
        cap = captioners[n_threads]
        cfg = cap.generation_config(num_beams=beams)

        def eager(fn):
            return in_torch(fn, n_threads)

        def eager_first(batch):
            state = ref.start(ref.pixels(batch), len(ref.prompt))
            return prefill(cached(ref.graph_step), state, np.tile(ref.prompt, (len(batch), 1)))

        out = {"eager PyTorch": Variant(eager(lambda b: ref.generate(b, cfg)), eager(lambda b: ref.cross(ref.pixels(b))),
                                        eager(eager_first), decoder_weight_bytes(package), step_clock(ref)),
               "runtime FP32": runtime_variant(cap, beams)}
        if int8:
            out["runtime INT8"] = runtime_variant(int8[n_threads], beams)
        return out

    eight = (images * 4)[:8]
    scenarios = {f"bundled model, batch 1, greedy, {threads} threads": (variants(threads, 1), [[i] for i in images])}
    if not args.quick:
        scenarios |= {f"bundled model, batch 1, beam 4, {threads} threads": (variants(threads, 4), [[i] for i in images]),
                      f"bundled model, batch 8, greedy, {threads} threads": (variants(threads, 1), [eight]),
                      "bundled model, batch 1, greedy, 1 thread": (variants(1, 1), [[i] for i in images])}
    return scenarios


class Peer:
    """optimum-onnx in its own interpreter (benchmarks/peer_optimum.py), driven over a pipe:
    one JSON line per caption call (the round trip adds about 0.1 ms to calls of ~1 s); the ends of
    its decoder steps, on the clock this process reads, go to `clock`."""

    def __init__(self, python: str, folder: Path, cache: Path, threads: int):
        self.proc = subprocess.Popen([python, str(Path(__file__).parent / "peer_optimum.py"), str(folder), str(cache),
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self.proc.stdout.readline())
        self.version, self.clock = ready["optimum"], StepClock()

    def caption(self, batch, max_new_tokens: int, num_beams: int) -> list[list[int]]:
        self.proc.stdin.write(json.dumps({"images": [str(i) for i in batch], "max_new_tokens": max_new_tokens,
                                          "num_beams": num_beams}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        self.clock.ends += reply["marks"]
        return reply["tokens"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def hf_scenarios(args, threads: int, work: Path) -> tuple[dict, dict]:
    """transformers generate vs the runtime (vs optimum) on a Hugging Face folder."""

    from export.hf import HFReference, export_hf
    from export.quantize import quantize_package
    from runtime import Captioner
    from runtime.search import GenerationConfig

    package = work / "package"
    export_hf(args.hf, package)  # returns its summary; progress goes to stderr
    quantize_package(package, "int8", work / "int8", calibration=16)
    cap = Captioner(package, provider="cpu", threads=threads)
    cap_int8 = Captioner(work / "int8", provider="cpu", threads=threads)
    ref = HFReference(args.hf, cap.manifest)
    images = sorted(SAMPLES.glob("*.jpg"))
    peer = Peer(args.peer_python, args.hf, work / "optimum", threads) if args.peer_python else None
    notes = {"hf_folder": str(args.hf), "optimum": peer.version if peer else "not run (no --peer-python)"}
    scenarios = {}
    weights = decoder_weight_bytes(package)

    def eager(fn):
        return in_torch(fn, threads)

    encoder = ref.model.vision_model if ref.family.MODEL_TYPE == "blip" else ref.model.encoder

    def eager_vision(batch):
        return encoder(pixel_values=ref.pixels(batch))

    for beams in (1, 4):
        cfg = GenerationConfig(max_new_tokens=cap.defaults.max_new_tokens, num_beams=beams)
        first = replace(cfg, max_new_tokens=1)  # transformers: image processor, encoder, one decoder step
        variants = {"transformers generate": Variant(eager(lambda b, cfg=cfg: ref.generate(b, cfg)), eager(eager_vision),
                                                     eager(lambda b, first=first: ref.generate(b, first)), weights,
                                                     step_clock(ref)),
                    "runtime FP32": runtime_variant(cap, beams), "runtime INT8": runtime_variant(cap_int8, beams)}
        if peer:
            variants["optimum ORTModelForVision2Seq"] = Variant(
                lambda b, cfg=cfg: peer.caption(b, cfg.max_new_tokens, cfg.num_beams),
                first_token=lambda b, beams=beams: peer.caption(b, 1, beams), weight_bytes=weights, clock=peer.clock)
        scenarios[f"{args.hf.name}, batch 1, {'greedy' if beams == 1 else 'beam 4'}, {threads} threads"] = (
            variants, [[i] for i in images])
    notes["peer"] = peer
    return scenarios, notes


def text_encoder_ms(ref, packages: dict[str, Path], image: Path, task: str, threads: int, repeats: int = 5) -> dict:
    """Florence-2's BART encoder over [image tokens; the task's prompt], a part of the vision
    column: transformers' module eager vs the runtime's vision graph cut at the concatenation of
    image and prompt (onnx.utils.Extractor; the cut keeps the decoder's cross-attention K/V
    projections, which transformers runs in its first decoder step). Median ms of `repeats`."""
    import onnx
    import onnxruntime as ort
    import torch

    from runtime.graphs import session_options

    model, text_ids = ref.model.model, ref.ask(task=task, images=[image])[1][0]
    with torch.inference_mode():
        embeds = torch.cat([model.get_image_features(ref.pixels([image])).pooler_output,
                            model.get_input_embeddings()(text_ids)], dim=1)
    encoder = in_torch(lambda x: model.language_model.encoder(inputs_embeds=x), threads)
    out = {"transformers generate": statistics.median(timed(encoder, embeds)[0] for _ in range(repeats))}
    for name, package in packages.items():
        manifest = json.loads((package / "manifest.json").read_text())
        vision = package / manifest["graphs"]["vision"]["file"]
        graph = onnx.load(str(vision))
        # The exporter names each node's module path: the torch.cat in ImageAndPrompt.forward itself.
        cat = next(n for n in graph.graph.node if n.op_type == "Concat" and any(
            m.key == "namespace" and "ImageAndPrompt/cat" in m.value for m in n.metadata_props))
        # The prompt's ids stay an input: the encoder's mask is built from them.
        cut = onnx.utils.Extractor(graph).extract_model(
            [cat.output[0], graph.graph.input[1].name], [o.name for o in graph.graph.output])
        # The Extractor's shape inference fixed the sizes the exporter traced at: free them again.
        del cut.graph.value_info[:]
        for i, dim in enumerate(cut.graph.input[0].type.tensor_type.shape.dim):
            dim.dim_param = f"d{i}"
        session = ort.InferenceSession(cut.SerializeToString(), session_options(manifest["precision"], threads),
                                       providers=["CPUExecutionProvider"])
        feed = {cat.output[0]: embeds.numpy(), graph.graph.input[1].name: text_ids.numpy()}
        session.run(None, feed)
        out[name] = statistics.median(timed(session.run, None, feed)[0] for _ in range(repeats))
    return {k: round(v, 1) for k, v in out.items()}


CAPACITIES = [40, 64, 128, 256, 512, 1024]  # 40: what 40 tokens fill; 1024: Florence-2's max_length 1025


def capacity_sweep(cap, image: Path, task: str, capacities: list[int], tokens: int, rounds: int) -> dict:
    """ms per decode step over the same `tokens` tokens of one image with caches of each capacity
    reserved, greedy and beam 3 (the beam reorder timed on its own), capacities interleaved in each
    round, medians. The cache costs nothing if the columns are flat."""
    from runtime.preprocess import load_pixels
    from runtime.search import Cache, beam_search, cached, greedy

    reorders: list[float] = []

    class Timed(Cache):
        def reorder(self, parents):
            ms, out = timed(super().reorder, parents)
            reorders.append(ms)
            return out

    prompt, inputs = cap.prompting.ask(task=task)
    memory = cap.graphs.encode(load_pixels(image, cap.manifest.preprocess)[None], *(x[None] for x in inputs))
    eos, step, samples, first, calls = cap.manifest.tokenizer.eos_ids, cached(cap.graphs.step), {}, {}, []

    def counted(state, ids):
        calls.append(ids.shape)
        return step(state, ids)

    for _ in range(rounds + 1):  # the first round warms up
        for slots in capacities:
            for beams, search in ((1, greedy), (3, beam_search)):
                cfg = cap.generation_config(num_beams=beams, max_new_tokens=tokens, task=task)
                state = cap.graphs.start(memory, slots)
                state = state._replace(cache=Timed(**vars(state.cache)))
                reorders.clear()
                calls.clear()
                ms, out = timed(search, counted, state, prompt[None], eos, cfg)
                first.setdefault(beams, out)
                sample = samples.setdefault((slots, beams), {"step_ms": [], "reorder_ms": [], "same": []})
                sample["step_ms"].append(ms / len(calls))
                sample["reorder_ms"].append(sum(reorders) / len(calls))
                sample["same"].append(out == first[beams])
    return {f"capacity {slots}, {'greedy' if beams == 1 else 'beam 3'}": {
                "step_ms": round(statistics.median(s["step_ms"][1:]), 2),
                "reorder_ms": round(statistics.median(s["reorder_ms"][1:]), 3), "same_tokens": all(s["same"])}
            for (slots, beams), s in samples.items()}


def florence2_scenarios(args, threads: int, work: Path) -> tuple[dict, dict]:
    """transformers' processor + generate vs the runtime FP32 and INT8 (its vision MatMuls computing
    in int8) on a Florence-2 folder, <CAPTION> and <OD>, greedy and the checkpoint's beam 3,
    `--max-tokens` each (the random weights never stop early); whole processes once per engine."""
    import torch

    from export.hf import HFReference, export_hf
    from export.hf.florence2 import ImageAndPrompt
    from export.quantize import quantize_package
    from runtime import Captioner

    package, int8 = work / "package", work / "int8"
    start = time.perf_counter()
    export_hf(args.florence2, package)
    notes = {"florence2_folder": str(args.florence2), "export_s": round(time.perf_counter() - start, 1)}
    start = time.perf_counter()
    quantize_package(package, "int8", int8, calibration=8, vision_compute="int8")
    notes["quantize_int8_s"] = round(time.perf_counter() - start, 1)
    notes |= {f"{name}_package_mib": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)
              for name, folder in (("fp32", package), ("int8", int8))}
    cap, cap_int8 = (Captioner(p, provider="cpu", threads=threads) for p in (package, int8))
    notes["int8_vision"] = {k: cap_int8.manifest.data["source"]["quantization"]["vision"][k]
                            for k in ("calibration_agreement", "calibration_tokens", "int8_compute_matmuls")}
    ref = HFReference(args.florence2, cap.manifest)
    images, weights, scenarios = sorted(SAMPLES.glob("*.jpg")), decoder_weight_bytes(package), {}
    encoder = ImageAndPrompt(ref.model)
    for task in ("<CAPTION>", "<OD>"):
        text_ids = ref.ask(task=task, images=images[:1])[1][0]

        def eager_vision(batch, text_ids=text_ids):  # what generate computes before its first decoder step
            return encoder(ref.pixels(batch), text_ids.repeat(len(batch), 1))

        for beams in (1, 3):
            defaults = cap.generation_config(num_beams=beams, max_new_tokens=args.max_tokens, task=task)
            cfg, first = defaults, replace(defaults, max_new_tokens=1)
            variants = {"transformers generate": Variant(
                            in_torch(lambda b, cfg=cfg, task=task: ref.generate(b, cfg, task=task), threads),
                            in_torch(eager_vision, threads),
                            in_torch(lambda b, first=first, task=task: ref.generate(b, first, task=task), threads),
                            weights, step_clock(ref)),
                        "runtime FP32": runtime_variant(cap, beams, task, args.max_tokens),
                        "runtime INT8": runtime_variant(cap_int8, beams, task, args.max_tokens)}
            scenarios[f"Florence-2, {task}, batch 1, {'greedy' if beams == 1 else 'beam 3'}, at most "
                      f"{cfg.max_new_tokens} tokens, {threads} threads"] = (
                variants, [[i] for i in images])
    torch.set_num_threads(threads)
    notes["text_encoder_ms"] = text_encoder_ms(ref, {"runtime FP32": package, "runtime INT8": int8}, images[0],
                                               "<CAPTION>", threads)
    # Whole processes: one <CAPTION> at the checkpoint's settings (beam 3), as a user starts it.
    cfg = json.dumps(asdict(cap.generation_config(max_new_tokens=args.max_tokens, task="<CAPTION>")))
    limit = [] if args.max_tokens is None else ["--max-tokens", args.max_tokens]
    caption = ["--task", "<CAPTION>", *limit, "--threads", threads, images[0]]
    runs = {"transformers generate": lambda: process_run(HF_PROCESS, args.florence2, package, images[0], "<CAPTION>", cfg),
            "runtime FP32": lambda: process_run(RUNTIME_PROCESS, "--model", package, *caption),
            "runtime INT8": lambda: process_run(RUNTIME_PROCESS, "--model", int8, *caption)}
    measured = {name: [run() for _ in range(2)] for name, run in runs.items()}
    notes["processes"] = {name: {"cold_start_s": round(statistics.median(t for t, _ in m), 2),
                                 "peak_rss_mib": round(max(r for _, r in m), 1)} for name, m in measured.items()}
    notes["capacity_sweep"] = capacity_sweep(cap, images[0], "<CAPTION>", CAPACITIES, 40, args.rounds)
    return scenarios, notes


def chat_variant(cap, max_new_tokens: int) -> Variant:
    """A chat model's answers to its default question; `vision` is one photo (its tiles) through the
    vision graph, `first_token` adds the prompt's prefill (tiles, layout, chat template and all)."""
    from runtime.search import cached, capacity, prefill

    def encode(batch):
        return [cap.chat_features(cap.chat_tiles(i)[0]) for i in batch]

    def first_token(batch):
        cfg = cap.generation_config(max_new_tokens)
        prompt, features, grid = cap.chat_input(batch[0], None, cfg)
        state = cap.graphs.start(cap.chat_memory(features[None], prompt, grid), capacity(len(prompt), max_new_tokens))
        return prefill(cached(cap.graphs.step), state, prompt[None])

    return Variant(lambda b: [c.tokens for c in cap.caption(b, max_new_tokens=max_new_tokens)], encode, first_token,
                   decoder_weight_bytes(cap.manifest.root), step_clock(cap))


def chat_scenarios(args, threads: int, work: Path) -> tuple[dict, dict]:
    """transformers' processor + generate vs the runtime FP32, INT8 and INT4 on an LLM-based model's
    folder (e.g. `python -m export random-hf DIR --encoder smolvlm --size 256m`): one photo, its
    default question, `--max-tokens` new tokens (32 by default), greedy; and whole processes."""
    from export.hf import HFReference, export_hf
    from export.quantize import quantize_package
    from runtime import Captioner

    made, tokens, start = args.packages or work, args.max_tokens or 32, time.perf_counter()
    package = made / "fp32"
    if args.packages is None:
        export_hf(args.chat, package)
        for precision in ("int8", "int4"):
            quantize_package(package, precision, work / precision)
    notes = {"chat_folder": str(args.chat), "new_tokens": tokens,
             **({} if args.packages else {"export_and_quantize_s": round(time.perf_counter() - start, 1)})}
    # With --packages, an INT4 package whose vision MatMuls compute in int8 joins where it is there.
    variants_dirs = {name.upper(): made / name for name in ("fp32", "int8", "int4", "int4-vision-int8")
                     if name != "int4-vision-int8" or (made / name).is_dir()}
    caps = {name: Captioner(folder, provider="cpu", threads=threads) for name, folder in variants_dirs.items()}
    notes |= {f"{name.lower()}_package_mib": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)
              for name, folder in variants_dirs.items()}
    cap = caps["FP32"]
    ref = HFReference(args.chat, cap.manifest)
    # A random model's answers end wherever its EOS happens to fall; a step's cost wants every answer
    # `tokens` long, so every engine here runs with the EOS off (the processes below too).
    for c in caps.values():
        c.eos = NO_EOS
    ref.eos, ref.model.generation_config.eos_token_id = NO_EOS.tolist(), None
    image = SAMPLES / "chelsea.jpg"
    _, (rows, cols) = cap.chat_tiles(image)
    prompt = cap.prompting.chat(None, [(rows, cols)])
    d = cap.manifest.decoder
    # The cache a mid-answer step reads, FP32: what the floor adds to the weights.
    kind = cap.manifest.preprocess.kind  # what rows x cols count: SmolVLM's tiles, Qwen2-VL's features
    seen = {"tiles": f"{rows}x{cols} tiles + 1", "grid": f"{rows}x{cols} features"}.get(kind, "one image")
    notes |= {"tiles": seen, "prompt_tokens": len(prompt),
              "cache_mib_mid_answer": round(2 * d.layers * d.kv_heads * d.head_dim * 4 * (len(prompt) + tokens // 2) / 2**20, 1)}
    cfg = cap.generation_config(max_new_tokens=tokens)
    first = replace(cfg, max_new_tokens=1)

    def hf_vision(batch):  # the processor and the vision tower, as generate runs them before its first step
        from runtime.preprocess import upright

        inputs = ref.family.reference_inputs(args.chat, [upright(i) for i in batch], cap.manifest.prompting.chat["question"])
        grid = {"image_grid_thw": inputs.image_grid_thw} if "image_grid_thw" in inputs else {}  # Qwen2-VL's
        return ref.model.model.get_image_features(pixel_values=inputs.pixel_values, **grid)

    variants = {"transformers generate": Variant(in_torch(lambda b: ref.generate(b, cfg), threads), in_torch(hf_vision, threads),
                                                 in_torch(lambda b: ref.generate(b, first), threads),
                                                 decoder_weight_bytes(package), step_clock(ref)),
                **{f"runtime {name}": chat_variant(c, tokens) for name, c in caps.items()}}
    scenarios = {f"{args.chat.name}, one photo ({seen}, {len(prompt)}-token prompt), {tokens} tokens, "
                 f"greedy, {threads} threads": (variants, [[image]])}
    runs = {"transformers generate": lambda: process_run(HF_CHAT_PROCESS, args.chat, package, image, tokens),
            **{f"runtime {name}": (lambda folder=folder: process_run(CHAT_PROCESS, folder, image, tokens, threads))
               for name, folder in variants_dirs.items()}}
    measured = {name: [run() for _ in range(2)] for name, run in runs.items()}
    notes["processes"] = {name: {"cold_start_s": round(statistics.median(t for t, _ in m), 2),
                                 "peak_rss_mib": round(max(r for _, r in m), 1)} for name, m in measured.items()}
    if args.llama_mtmd:
        notes["llama_cpp"] = llama_cpp_runs(args.llama_mtmd, args.gguf, image, cap.manifest.prompting.chat["question"], tokens,
                                            threads, args.rounds)
    return scenarios, notes


NO_EOS = np.array([-1])  # an id no model emits


def llama_cpp_runs(cli: Path, ggufs: list[Path], image: Path, question: str, tokens: int, threads: int,
                   rounds: int) -> dict:
    """llama.cpp's `llama-mtmd-cli` as its users run it, one fresh process per answer (greedy, EOS
    ignored, `tokens` new tokens), `ggufs` = [mmproj, language model, ...] converted from the same
    folder: per language model, medians over `rounds` interleaved runs of the timings its own log
    gives (vision: the mtmd encodings; prefill: prompt eval less those; decode ms per token: eval
    time per run), the wall time and the peak RSS (GNU time's)."""
    import re

    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True).stderr.strip().splitlines()[0]
    mmproj, *models = ggufs
    samples = {m.name: [] for m in models}
    for _ in range(rounds):
        for m in models:
            start = time.perf_counter()
            r = subprocess.run(["/usr/bin/time", "-f", "PEAK_KIB %M", str(cli), "-m", str(m), "--mmproj", str(mmproj),
                                "--image", str(image), "-p", question, "-n", str(tokens), "--temp", "0", "--ignore-eos",
                                "-t", str(threads), "-lv", "4"], capture_output=True, text=True, timeout=600)
            wall = time.perf_counter() - start
            if r.returncode != 0:
                raise SystemExit(f"error: llama-mtmd-cli failed: {r.stderr.strip().splitlines()[-1:]}")
            log = r.stderr
            vision = sum(float(ms) for ms in re.findall(r"mtmd batch encoding done in (\d+) ms", log))
            prompt_ms, prompt_tokens = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log).groups()
            eval_ms, runs = re.search(r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs", log).groups()
            samples[m.name].append({"wall_s": wall, "vision_ms": vision, "prompt_tokens": int(prompt_tokens),
                                    "prefill_ms": float(prompt_ms) - vision, "decode_ms_per_token": float(eval_ms) / int(runs),
                                    "peak_rss_mib": int(log.split("PEAK_KIB")[-1].split()[0]) / 1024})
    return {"version": version, "threads": threads, "rounds": rounds,
            "gguf_mib": {p.name: round(p.stat().st_size / 2**20, 1) for p in ggufs},
            "results": {name: {k: round(statistics.median(s[k] for s in runs), 2) for k in runs[0]}
                        for name, runs in samples.items()}}


RUNTIME_PROCESS = """
import sys
from runtime.caption import main
if main(sys.argv[1:]):
    sys.exit("the caption command failed")
"""
EAGER_PROCESS = """
import sys
from export.reference import Reference, checkpoint_for
from export import DEFAULT_CHECKPOINT
from runtime.manifest import load_manifest
from runtime import DEFAULT_MODEL
from runtime.search import GenerationConfig
manifest = load_manifest(DEFAULT_MODEL)
ref = Reference(checkpoint_for(manifest, DEFAULT_CHECKPOINT.parent), manifest)
print(ref.decode(ref.generate([sys.argv[1]], GenerationConfig(manifest.generation.max_new_tokens))[0]))
"""
# transformers' own processor and generate on a Hugging Face folder: folder, package, image, task and
# the generation settings as JSON.
HF_PROCESS = """
import json, sys
from export.hf import HFReference
from runtime.manifest import load_manifest
from runtime.search import GenerationConfig
ref = HFReference(sys.argv[1], load_manifest(sys.argv[2]))
print(ref.generate([sys.argv[3]], GenerationConfig(**json.loads(sys.argv[5])), task=sys.argv[4]))
"""
# A chat model's one answer, its EOS off (see chat_scenarios): transformers on its folder (folder,
# package, image, new tokens), and the runtime on a package (package, image, new tokens, threads).
HF_CHAT_PROCESS = """
import sys
from export.hf import HFReference
from runtime.manifest import load_manifest
from runtime.search import GenerationConfig
ref = HFReference(sys.argv[1], load_manifest(sys.argv[2]))
ref.eos, ref.model.generation_config.eos_token_id = [-1], None
print(ref.generate([sys.argv[3]], GenerationConfig(int(sys.argv[4]))))
"""
CHAT_PROCESS = """
import sys
import numpy as np
from runtime import Captioner
cap = Captioner(sys.argv[1], provider="cpu", threads=int(sys.argv[4]))
cap.eos = np.array([-1])
print(cap.caption([sys.argv[2]], max_new_tokens=int(sys.argv[3]))[0].text)
"""
# The child's own peak: VmHWM belongs to the exec'd address space. (ru_maxrss from wait4
# would count the benchmark's own pages, torch included, from before the child's exec.)
PEAK_RSS = """
print("VmHWM", next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1], file=sys.stderr)
"""


def process_run(code: str, *args) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a fresh `python -c code args...`, as a user starts it."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code + PEAK_RSS, *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"error: a benchmark process failed: {r.stderr.strip().splitlines()[-1:]}")
    return seconds, int(r.stderr.split("VmHWM")[-1].split()[0]) / 1024  # KiB -> MiB


def process_costs(image: Path, runs: int) -> dict:
    """Whole processes: wall time of `python -m runtime.caption` (imports, session creation, one
    caption) and peak RSS, runtime vs eager PyTorch."""
    runtime = [process_run(RUNTIME_PROCESS, image) for _ in range(runs)]
    eager = [process_run(EAGER_PROCESS, image) for _ in range(runs)]
    return {"runtime_cold_start_s": round(statistics.median(t for t, _ in runtime), 3),
            "eager_cold_start_s": round(statistics.median(t for t, _ in eager), 3),
            "runtime_peak_rss_mib": round(max(r for _, r in runtime), 1),
            "eager_peak_rss_mib": round(max(r for _, r in eager), 1)}


def fmt(stat: dict | None, digits: int = 1) -> str:
    return "-" if stat is None else f"{stat['median']:.{digits}f} ({stat['p90']:.{digits}f})"


def report(scenarios: dict, meta: dict) -> str:
    lines = [f"{meta['machine']}; {meta['rounds']} interleaved rounds per scenario, medians (p90 in brackets). "
             f"Read bandwidth measured in this run: {meta['bandwidth_gb_s']:.1f} GB/s ({meta['threads']} threads reading "
             "a 256 MiB array); the floor is the decoder's weight bytes read per step over it.", ""]
    for title, results in scenarios.items():
        base = next(iter(results.values()))["caption_ms"]["median"]
        lines += [f"### {title}", "", "| variant | ms / caption | images / s | vision ms | first token ms | ms / token "
                  "| decode ms / token | floor ms / token | x floor | speed-up | same tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            floor = r["floor_ms"]
            lines.append(f"| {name} | {fmt(r['caption_ms'])} | {r['images_s']['median']:.2f} | {fmt(r.get('vision_ms'))} "
                         f"| {fmt(r.get('first_token_ms'))} | {fmt(r['ms_per_token'], 2)} "
                         f"| {fmt(r.get('decode_ms_per_token'), 2)} | {floor:.2f} "
                         f"| {r['ms_per_token']['median'] / floor:.1f}x | {base / r['caption_ms']['median']:.2f}x "
                         f"| {r['same_tokens_as_first']:.0%} |")
        lines.append("")
    if "process" in meta:
        p = meta["process"]
        lines += [f"Whole process, one caption (median of {meta['process_runs']} fresh processes): "
                  f"`python -m runtime.caption` {p['runtime_cold_start_s']:.2f} s and {p['runtime_peak_rss_mib']:.0f} MiB "
                  f"peak RSS; eager PyTorch {p['eager_cold_start_s']:.2f} s and {p['eager_peak_rss_mib']:.0f} MiB "
                  f"({p['eager_peak_rss_mib'] / p['runtime_peak_rss_mib']:.1f}x the runtime's memory)."]
    if "processes" in meta:
        what = "one <CAPTION> at the checkpoint's beam 3" if "text_encoder_ms" in meta else \
            f"one answer of {meta['new_tokens']} tokens"
        packages = ", ".join(f"{k.split('_')[0].upper()} {v:.0f} MiB" for k, v in meta.items() if k.endswith("_package_mib"))
        lines += [f"Whole process, {what} (median of 2 fresh processes; peak RSS): "
                  + "; ".join(f"{name} {p['cold_start_s']:.1f} s, {p['peak_rss_mib']:.0f} MiB"
                              for name, p in meta["processes"].items()) + f". Packages: {packages}."]
    if "text_encoder_ms" in meta:
        lines += ["", "Text encoder alone, part of the vision column (<CAPTION>, median of 5; the runtime's includes the "
                  "decoder's cross-attention K/V projections): "
                  + "; ".join(f"{name} {ms:.0f} ms" for name, ms in meta["text_encoder_ms"].items()) + "."]
    if "prompt_tokens" in meta:  # a chat model: prefill rate, and the cache a step reads beside its weights
        results = next(iter(scenarios.values()))
        rates = {name: meta["prompt_tokens"] / r["first_step_ms"]["median"] * 1000 for name, r in results.items()}
        lines += ["", f"Prompt: {meta['tiles']}, {meta['prompt_tokens']} tokens. Prefill (the first decoder step, "
                  "timed inside each answer): " + "; ".join(f"{name} {rate:.0f} tokens/s" for name, rate in rates.items())
                  + f". The floor counts the weights a step reads (not an embedding table it only gathers a row from); "
                  f"a step mid-answer also reads "
                  f"{meta['cache_mib_mid_answer']:.0f} MiB of FP32 cache."]
    if "llama_cpp" in meta:
        peer = meta["llama_cpp"]
        lines += ["", f"Peer: llama.cpp's llama-mtmd-cli ({peer['version']}) on the same folder converted to GGUF, its "
                  f"image encoder F32 ({next(iter(peer['gguf_mib'].values())):.0f} MiB); one fresh process per answer, "
                  f"{peer['threads']} threads, medians of {peer['rounds']} interleaved runs, phases from its own log:", "",
                  "| language model | GGUF MiB | whole process s | vision ms | prefill tokens/s | decode ms / token "
                  "| peak RSS MiB |", "|---|---|---|---|---|---|---|"]
        for name, r in peer["results"].items():
            lines.append(f"| {name} | {peer['gguf_mib'][name]:.0f} | {r['wall_s']:.1f} | {r['vision_ms']:.0f} "
                         f"| {r['prompt_tokens'] / r['prefill_ms'] * 1000:.0f} | {r['decode_ms_per_token']:.2f} "
                         f"| {r['peak_rss_mib']:.0f} |")
    if "capacity_sweep" in meta:
        sweep = meta["capacity_sweep"]
        rows = {key.split(",")[0]: {} for key in sweep}
        for key, r in sweep.items():
            rows[key.split(",")[0]][key.split(", ")[1]] = r
        lines += ["", f"Runtime FP32, ms per decode step over the same 40 tokens of one <CAPTION> with caches of each "
                  f"capacity reserved (medians of {meta['rounds']} interleaved rounds; beam 3: step and beam reorder):", "",
                  "| capacity | greedy | beam 3 | of which the beam reorder | same tokens |", "|---|---|---|---|---|"]
        for capacity, r in rows.items():
            lines.append(f"| {capacity.split()[1]} | {r['greedy']['step_ms']:.1f} | {r['beam 3']['step_ms']:.1f} "
                         f"| {r['beam 3']['reorder_ms']:.2f} | {r['greedy']['same_tokens'] and r['beam 3']['same_tokens']} |")
    return "\n".join(lines) + "\n"


def plot(scenarios: dict, path: Path) -> None:
    """One panel per scenario: ms per caption by variant; decode ms per token (after the first
    token: what the step costs, the image side left out), each against its own floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(scenarios), 2, figsize=(11, 2.2 * len(scenarios) + 0.6), squeeze=False)
    for row, (title, results) in zip(axes, scenarios.items()):
        names = list(results)
        caption = [results[n]["caption_ms"]["median"] for n in names]
        row[0].barh(names, caption, color="tab:blue")
        row[0].set_title(f"{title}: ms / caption", fontsize=9)
        per_token = [results[n].get("decode_ms_per_token", results[n]["ms_per_token"])["median"] for n in names]
        row[1].barh(names, per_token, color="tab:orange", label="decode ms / token")
        row[1].scatter([results[n]["floor_ms"] for n in names], names, color="k", marker="|", s=400,
                       label="bandwidth floor", zorder=3)
        row[1].set_title("decode ms / token vs the floor", fontsize=9)
        row[1].legend(fontsize=7, loc="best", framealpha=0.9)
        for ax in row:
            ax.tick_params(labelsize=8)
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="package for the bundled-model scenarios")
    parser.add_argument("--hf", type=Path, default=None, help="Hugging Face captioner folder to add")
    parser.add_argument("--peer-python", default=None, help="python of a venv with optimum-onnx (for --hf)")
    parser.add_argument("--florence2", type=Path, default=None,
                        help="a Florence-2 folder (e.g. `python -m export random-hf DIR --encoder florence2 --size base`): "
                             "measure it alone, into latency-florence2-cpu.*")
    parser.add_argument("--chat", type=Path, default=None,
                        help="an LLM-based model's folder (e.g. `python -m export random-hf DIR --encoder smolvlm --size "
                             "256m`): transformers vs the runtime FP32, INT8 and INT4 alone, into latency-chat-<model_type>-cpu.*")
    parser.add_argument("--packages", type=Path, default=None,
                        help="with --chat: a folder holding fp32, int8 and int4 packages already exported from it "
                             "(`python -m export hf` and `quantize`, e.g. at the --rtol its scale needs), and "
                             "optionally int4-vision-int8 (`quantize --precision int4 --vision-compute int8`)")
    parser.add_argument("--llama-mtmd", type=Path, default=None,
                        help="with --chat: llama.cpp's llama-mtmd-cli binary, run on --gguf as a peer")
    parser.add_argument("--gguf", type=Path, nargs="+", default=[],
                        help="with --llama-mtmd: the mmproj GGUF, then one or more language-model GGUFs of the --chat folder")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per answer at most (default: Florence-2's checkpoint's own max_length 1025; 32 "
                             "for --chat)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one scenario, 2 rounds, no files written: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.llama_mtmd and (not args.chat or len(args.gguf) < 2):
        parser.error("--llama-mtmd goes with --chat and --gguf MMPROJ MODEL [MODEL ...]")
    if args.packages and not args.chat:
        parser.error("--packages goes with --chat")
    try:
        import torch
    except ModuleNotFoundError as e:
        from export import needs_extra

        print(f"error: {needs_extra(e, 'python -m benchmarks.latency', 'dev')}", file=sys.stderr)
        return 1
    import onnxruntime

    rounds = 2 if args.quick else args.rounds
    bandwidth = read_bandwidth_gb_s(args.threads)
    scenarios = {} if args.florence2 or args.chat else bundled_scenarios(args, args.threads)
    notes, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.florence2:
            scenarios, notes = florence2_scenarios(args, args.threads, Path(tmp))
        if args.chat:
            scenarios, notes = chat_scenarios(args, args.threads, Path(tmp))
        if args.hf and not args.quick:
            hf, notes = hf_scenarios(args, args.threads, Path(tmp))
            scenarios |= hf
        for title, (variants, batches) in scenarios.items():
            print(f"measuring {title} ...", file=sys.stderr)
            results[title] = measure(variants, batches, rounds)
            for name, v in variants.items():
                results[title][name]["floor_ms"] = round(v.weight_bytes / bandwidth / 1e6, 3)
        if notes.get("peer"):
            notes.pop("peer").close()
    process_runs = 1 if args.quick else 5
    meta = {"threads": args.threads, "rounds": rounds, "bandwidth_gb_s": round(bandwidth, 2),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                       f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}",
            **({} if args.florence2 or args.chat else {"process_runs": process_runs,
                                          "process": process_costs(sorted(SAMPLES.glob("*.jpg"))[0], process_runs)}),
            **{k: v for k, v in notes.items() if k != "peer"}}
    table = report(results, meta)
    print(table)
    payload = json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        chat = args.chat and f"latency-chat-{json.loads((args.chat / 'config.json').read_text())['model_type']}-cpu"
        name = "latency-florence2-cpu" if args.florence2 else chat or "latency-cpu"
        (RESULTS / f"{name}.md").write_text(table)
        (RESULTS / f"{name}.json").write_text(payload)
        plot(results, RESULTS / f"{name}.png")
    if args.json:
        args.json.write_text(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
