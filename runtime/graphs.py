"""The one place that runs a package's two graphs: session options, encode, one decoder step,
generation. `Captioner` loads a package into a `Graphs` (after choosing providers); the export
side's checks and quantization open the graph files of a package being built the same way.

Input and output names are read from the sessions themselves: for a loaded package they are
the manifest's (vetted before ONNX Runtime opened anything)."""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .search import (GenerationConfig, cached, capacity, generate, initial_state, prefix_logits, text_logprobs,
                     uncached)

CPU = ["CPUExecutionProvider"]


def session_options(precision: str, threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Two sessions run alternately; idle pool threads spinning after one session's run
    # steal the cores the next one needs (2x slower per caption on a 2-core box).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if precision == "int8":
        # Conv weights are stored int8 + DequantizeLinear: fold them to FP32 at load
        # rather than dequantize at every run (ORT's int8 convolutions ran the bundled CNN 2.6x slower).
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class DeviceTensor:
    """An OrtValue left on the execution device, shaped like the numpy arrays the search
    functions take: the KV cache stays on the GPU between steps. Only beam reordering
    (`tensor[:, rows]`) takes a trip through host memory."""

    DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

    def __init__(self, value: ort.OrtValue):
        self.value = value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    @property
    def dtype(self):
        return np.dtype(self.DTYPES[self.value.data_type()])

    def __getitem__(self, index) -> "DeviceTensor":
        host = np.ascontiguousarray(self.value.numpy()[index])
        return DeviceTensor(ort.OrtValue.ortvalue_from_numpy(host, self.value.device_name(), 0))


def host(x) -> np.ndarray:
    """A graph output in host memory, wherever it was left."""
    return x.value.numpy() if isinstance(x, DeviceTensor) else x


def io_names(session: ort.InferenceSession) -> tuple[list[str], list[str]]:
    return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


class Graphs:
    """vision: pixels [+ question ids] -> the decoder's memory K/V (cross-attention or prefix; the
    search runs both alike); decoder: one step over the KV cache (runtime.search).
    `device` None runs with numpy feeds; "cuda" (or "cpu", to test the path) binds inputs and
    outputs so that caches stay where the provider computes."""

    def __init__(self, vision: ort.InferenceSession, decoder: ort.InferenceSession, device: str | None = None):
        self.vision, self.decoder, self.device = vision, decoder, device
        self.vision_io, self.decoder_io = io_names(vision), io_names(decoder)

    @classmethod
    def open(cls, vision: Path, decoder: Path, precision: str = "fp32") -> "Graphs":
        """CPU sessions on two graph files, as the runtime would set them up for `precision`."""
        opts = session_options(precision)
        return cls(*(ort.InferenceSession(str(path), opts, providers=CPU) for path in (vision, decoder)))

    def encode(self, pixels: np.ndarray, *inputs: np.ndarray):
        """(N, 3, H, W) [+ the graph's other inputs, such as question ids (N, Q)] -> memory K/V,
        once per image (left on the device with IO binding)."""
        if self.device is None:
            key, value = self.vision.run(None, dict(zip(self.vision_io[0], (pixels, *inputs))))
            return key, value
        key, value = self._run_bound(self.vision, self.vision_io, [pixels, *inputs], host_outputs=0)
        return DeviceTensor(key), DeviceTensor(value)

    def step(self, input_ids, past_key, past_value, past_length, cross_key, cross_value):
        """The decoder-step graph as a `GraphStep`."""
        feeds = (input_ids, past_key, past_value, past_length, cross_key, cross_value)
        if self.device is None:
            return tuple(self.decoder.run(None, dict(zip(self.decoder_io[0], feeds))))
        logits, present_key, present_value = self._run_bound(self.decoder, self.decoder_io, feeds, host_outputs=1)
        return logits.numpy(), DeviceTensor(present_key), DeviceTensor(present_value)

    def generate(self, pixels: np.ndarray, prompt: np.ndarray, eos_id: int, cfg: GenerationConfig,
                 cache: bool = True, inputs: list[np.ndarray] = ()) -> list[list[int]]:
        """Tokens per image; `inputs`: the vision graph's other inputs, one row per image;
        `cache=False` recomputes the whole prefix every step (the reference the KV cache must equal)."""
        step = cached(self.step) if cache else uncached(self.step)
        state = initial_state(*self.encode(pixels, *inputs), capacity(len(prompt), cfg.max_new_tokens))
        return generate(step, state, np.tile(prompt, (len(pixels), 1)), eos_id, cfg)

    def score(self, key, value, sequences: list[np.ndarray], start: int) -> np.ndarray:
        """Log-probability of each sequence's tokens from `start` on (teacher forcing), in one
        decoder pass: row i attends to memory row i of `key`/`value` (the vision graph's output)."""
        # Right padding: under causal attention no pad reaches a position before it.
        ids = np.zeros((len(sequences), max(map(len, sequences))), dtype=np.int64)
        for row, sequence in zip(ids, sequences):
            row[: len(sequence)] = sequence
        logits = prefix_logits(self.step, initial_state(key, value, ids.shape[1] - 1), ids[:, :-1])
        lengths = np.array([len(sequence) - start for sequence in sequences])
        return text_logprobs(logits[:, start - 1 :], ids[:, start:], lengths)

    def _run_bound(self, session, io, feeds, host_outputs: int):
        """Run with IO binding: device-resident inputs stay put; the first `host_outputs`
        outputs come back to host memory, the rest stay on the device."""
        binding = session.io_binding()
        for name, value in zip(io[0], feeds):
            if isinstance(value, DeviceTensor):
                binding.bind_ortvalue_input(name, value.value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for i, name in enumerate(io[1]):
            binding.bind_output(name, "cpu" if i < host_outputs else self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()
