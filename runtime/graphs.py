"""The one place that runs a package's two graphs: session options, encode, one decoder step,
generation. `Captioner` loads a package into a `Graphs` (after choosing providers); the export
side's checks and quantization open the graph files of a package being built the same way.

Graph inputs and outputs are bound by their role names (runtime.manifest.roles). The decoder
step always runs with IO binding: each layer's cache buffer is bound as both its `past_` input
and its `present_` output, so the step's TensorScatter writes the new tokens' keys and values
in place and nothing of the cache is copied (export/kv.py)."""

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import WEIGHT_ONLY, Decoder, memory_roles
from .search import (Cache, GenerationConfig, State, cached, capacity, generate, initial_state, memory_feeds,
                     prefix_logits, start, take_rows, text_logprobs, uncached)

CPU = ["CPUExecutionProvider"]
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Idle pool threads spin this long for more work before they sleep. Each of a decode step's hundreds of
# small kernels hands work to the pool, and waking sleeping threads for each cost SmolVLM-256M's INT4
# step 20% (11.4 -> 9 ms); onnxruntime's unbounded default spin let one session's idle threads take the
# cores the other session's next run needs (the bundled model 2x slower per caption on 2 cores). Bounded,
# both gain: the bundled INT8 caption 27 -> 23 ms (same run, interleaved processes). The bound needs
# onnxruntime 1.26 (session.intra_op.spin_duration_us); older ones do not spin at all.
SPIN_US = "500"
BOUNDED_SPIN = tuple(int(part) for part in ort.__version__.split(".")[:2]) >= (1, 26)


def session_options(precision: str, threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if BOUNDED_SPIN:
        opts.add_session_config_entry("session.intra_op.spin_duration_us", SPIN_US)
    else:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if precision in WEIGHT_ONLY:
        # Conv weights are stored int8 + DequantizeLinear: fold them to FP32 at load
        # rather than dequantize at every run (ORT's int8 convolutions ran the bundled CNN 2.6x slower).
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def cpu_session(path: Path, precision: str = "fp32") -> ort.InferenceSession:
    """A CPU session on one graph file, set up as the runtime sets one up for `precision`: how the
    export side's checks and quantization run the graphs of a package being built."""
    return ort.InferenceSession(str(path), session_options(precision), providers=CPU)


class DeviceTensor:
    """An OrtValue left on the execution device, shaped like the numpy arrays the search
    functions take: memory and caches stay on the GPU between steps. Taking rows (beams)
    goes through host memory, once per generation for the memory and, for the cache, only
    at steps where beams change parents."""

    def __init__(self, value: ort.OrtValue):
        self.value = value

    @classmethod
    def upload(cls, host: np.ndarray, device: str) -> "DeviceTensor":
        return cls(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(host), device, 0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    def __getitem__(self, index) -> "DeviceTensor":
        return DeviceTensor.upload(self.value.numpy()[index], self.value.device_name())


class DeviceCache(Cache):
    """A Cache whose buffers are DeviceTensors: reordered through host memory, written back in place."""

    def reorder(self, parents: np.ndarray) -> "DeviceCache":
        moved = np.flatnonzero(parents != np.arange(len(parents)))
        if len(moved):
            slots = int(self.lengths.max())
            for buffer in (*self.keys, *self.values):
                host = buffer.value.numpy()
                host[moved, :, :slots] = host[parents[moved], :, :slots]
                buffer.value.update_inplace(host)
        return replace(self, lengths=self.lengths[parents], start=self.start[parents])


def host(x) -> np.ndarray:
    """A graph output in host memory, wherever it was left."""
    return x.value.numpy() if isinstance(x, DeviceTensor) else x


def io_names(session: ort.InferenceSession) -> tuple[list[str], list[str]]:
    return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


def ort_value(x) -> ort.OrtValue:
    """Bindable without a copy: a numpy buffer is wrapped where it lies (host memory)."""
    return x.value if isinstance(x, DeviceTensor) else ort.OrtValue.ortvalue_from_numpy(x)


def row_of(cache: Cache, r: int) -> Cache:
    """Row r of a host cache, its buffers views of the whole's (a device cache's rows are copies)."""
    if isinstance(cache, DeviceCache):
        raise ValueError("a step of several rows of several tokens over a written device cache")
    return replace(cache, keys=[k[r : r + 1] for k in cache.keys], values=[v[r : r + 1] for v in cache.values],
                   lengths=cache.lengths[r : r + 1], start=cache.start[r : r + 1])


class Graphs:
    """vision: pixels [+ text ids] -> the decoder's memory, per layer (cross-attention keys and
    values, or a prefix of the cache); decoder: one step over the cache (runtime.search).
    `device` None leaves the memory and the cache in host memory (numpy); "cuda" (or "cpu", to
    test the path) keeps them where the provider computes."""

    def __init__(self, vision: ort.InferenceSession, decoder: ort.InferenceSession, spec: Decoder,
                 device: str | None = None):
        self.vision, self.decoder, self.spec, self.device = vision, decoder, spec, device
        self.vision_io, self.memory = io_names(vision), memory_roles(spec)
        inputs = {i.name: i for i in decoder.get_inputs()}
        self.dtype = DTYPES[inputs["past_key.0"].type]  # the cache's: fp16 packages keep it in fp16
        self.logits_dtype = DTYPES[next(o.type for o in decoder.get_outputs() if o.name == "logits")]
        self.held = threading.local()  # cache_binding's

    @classmethod
    def open(cls, vision: Path, decoder: Path, spec: Decoder, precision: str = "fp32") -> "Graphs":
        """CPU sessions on two graph files, as the runtime would set them up for `precision`."""
        return cls(cpu_session(vision, precision), cpu_session(decoder, precision), spec)

    def encode(self, pixels: np.ndarray, *inputs: np.ndarray) -> tuple[list, list]:
        """(N, 3, H, W) [+ the graph's other inputs, such as question ids (N, Q)] -> per-layer
        (keys, values), or ([image features],), once per image (left on the device with a device set)."""
        feeds = dict(zip(self.vision_io[0], (pixels, *inputs)))
        if self.device is None:
            outputs = dict(zip(self.vision_io[1], self.vision.run(None, feeds)))
        else:
            binding = self.vision.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in self.vision_io[1]:
                binding.bind_output(name, self.device)
            self.vision.run_with_iobinding(binding)
            outputs = {n: DeviceTensor(v) for n, v in zip(self.vision_io[1], binding.get_outputs())}
        if self.spec.memory == "embeddings":
            return ([outputs["image_features"]],)
        half = len(self.memory) // 2
        return [outputs[n] for n in self.memory[:half]], [outputs[n] for n in self.memory[half:]]

    def start(self, outputs: tuple[list, list], slots: int) -> State:
        """The state before a prompt, with `slots` cache slots beyond any memory prefix."""
        if self.device is None:
            return start(self.spec, outputs, slots, self.dtype)
        state = start(self.spec, tuple([host(x) for x in layers] for layers in outputs), slots, self.dtype)
        cache = DeviceCache(*([DeviceTensor.upload(b, self.device) for b in buffers]
                              for buffers in (state.cache.keys, state.cache.values)), state.cache.lengths, state.cache.start)
        return initial_state(cache, () if self.spec.memory == "prefix" else outputs)

    def cache_binding(self, cache: Cache) -> ort.IOBinding:
        """A binding of the decoder step with `cache`'s buffers bound as both past and present, made
        once per cache and kept for its steps, one per thread: binding a step's 2 x layers buffers
        anew took SmolVLM-256M's INT4 step ~0.4 of the 1 ms it spent outside the graph. A cache keeps
        its buffer lists while it advances and reorders (in place); a selected one has new lists."""
        held = self.held.__dict__
        if held.get("keys") is not cache.keys or held.get("values") is not cache.values:
            binding = self.decoder.io_binding()
            for kind, buffers in (("key", cache.keys), ("value", cache.values)):
                for i, buffer in enumerate(buffers):
                    value = ort_value(buffer)
                    binding.bind_ortvalue_input(f"past_{kind}.{i}", value)
                    binding.bind_ortvalue_output(f"present_{kind}.{i}", value)
            # Holding the lists keeps their buffers alive while bound (and no new list reuses their id).
            held.update(keys=cache.keys, values=cache.values, binding=binding)
        return held["binding"]

    def step(self, ids: np.ndarray, positions: np.ndarray, cache: Cache, memory: tuple, logit_index: np.ndarray):
        """The decoder-step graph as a `GraphStep`: writes the cache in place, returns the logits."""
        if self.spec.attention == "grouped" and ids.shape[0] > 1 and ids.shape[1] > 1 and cache.lengths.any():
            # GroupQueryAttention takes several tokens over a written cache one row at a time; a
            # row of the cache is a view of its buffers, written in place as the whole is.
            return np.concatenate([self.step(ids[r : r + 1], positions[r : r + 1], row_of(cache, r),
                                             tuple([take_rows(x, [r]) for x in layers] for layers in memory),
                                             logit_index[r : r + 1]) for r in range(len(ids))])
        binding = self.cache_binding(cache)
        for name, value in (("input_ids", ids), ("position_ids", positions), ("cache_lengths", cache.lengths),
                            ("logit_index", logit_index)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        for name, value in memory_feeds(self.spec, memory, ids, cache).items():
            if isinstance(value, np.ndarray) and value.dtype == np.int64:
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, ort_value(value))
        # Into an array of ours: get_outputs() would wrap every bound output, the caches' too.
        logits = np.empty((*logit_index.shape, self.spec.vocab_size), self.logits_dtype)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.decoder.run_with_iobinding(binding)
        return logits

    def generate(self, pixels: np.ndarray, prompt: np.ndarray, eos_id: int, cfg: GenerationConfig,
                 cache: bool = True, inputs: list[np.ndarray] = ()) -> list[list[int]]:
        """Tokens per image; `inputs`: the vision graph's other inputs, one row per image;
        `cache=False` recomputes the whole prefix every step (the reference the KV cache must equal)."""
        step = cached(self.step) if cache else uncached(self.step)
        state = self.start(self.encode(pixels, *inputs), capacity(len(prompt), cfg.max_new_tokens))
        return generate(step, state, np.tile(prompt, (len(pixels), 1)), eos_id, cfg)

    def score(self, outputs: tuple[list, list], sequences: list[np.ndarray], start: int) -> np.ndarray:
        """Log-probability of each sequence's tokens from `start` on (teacher forcing), in one
        decoder pass: row i reads memory row i of `outputs` (the vision graph's, per layer)."""
        # Right padding: under causal attention no pad reaches a position before it.
        ids = np.zeros((len(sequences), max(map(len, sequences))), dtype=np.int64)
        for row, sequence in zip(ids, sequences):
            row[: len(sequence)] = sequence
        logits = prefix_logits(self.step, self.start(outputs, ids.shape[1] - 1), ids[:, :-1])
        lengths = np.array([len(sequence) - start for sequence in sequences])
        return text_logprobs(logits[:, start - 1 :], ids[:, start:], lengths)

