"""The eager PyTorch reference: the trained captioner run step by step by PyTorch,
through the same search functions the runtime uses, so parity isolates the graphs
and the preprocessing (torchvision here, Pillow + numpy in the runtime)."""

from pathlib import Path

import numpy as np
import torch

from runtime.manifest import Decoder, Manifest, sha256
from runtime.search import GenerationConfig, cached, capacity, generate, memory_feeds, prefix_logits, start

from .model import bundled, load_decoder
from .preprocess import reference_pixels


def step_args(decoder: Decoder, feeds: dict) -> tuple:
    """The memory inputs by role name (runtime.search.memory_feeds) as a step's arguments:
    cross-attention keys and values as two lists, or image features and their index."""
    values = list(feeds.values())
    return (values[: decoder.layers], values[decoder.layers :]) if decoder.memory == "cross" else tuple(values)


def torch_graph_step(model, decoder: Decoder):
    """Adapt a model's `step` (export.model, export.hf.decoders, export.hf.llm) to the `GraphStep`
    signature: numpy in, the present keys and values written back into the cache's buffers, logits out."""

    def tensor(a):
        return torch.from_numpy(np.ascontiguousarray(a))

    @torch.inference_mode()
    def step(ids, positions, cache, memory, logit_index):
        feeds = {name: [tensor(x) for x in value] if isinstance(value, list) else tensor(value)
                 for name, value in memory_feeds(decoder, memory, ids, cache).items()}
        logits, keys, values = model.step(tensor(ids), tensor(positions), tensor(cache.lengths), tensor(logit_index),
                                          [tensor(k) for k in cache.keys], [tensor(v) for v in cache.values],
                                          *step_args(decoder, feeds))
        for buffer, present in zip((*cache.keys, *cache.values), (*keys, *values)):
            buffer[...] = present.numpy()
        return logits.numpy()

    return step


class Reference:
    """Eager PyTorch captioner, configured from a model package's manifest."""

    def __init__(self, checkpoint: Path, manifest: Manifest):
        decoder, self.tokenizer, _ = load_decoder(checkpoint)
        self.model = bundled(decoder)
        self.spec, self.decoder = manifest.preprocess, manifest.decoder
        self.prompt = np.array(manifest.prompting.prefix, dtype=np.int64)
        self.eos = manifest.tokenizer.eos_ids
        self.graph_step = torch_graph_step(decoder, self.decoder)

    def pixels(self, images) -> torch.Tensor:
        return torch.stack([reference_pixels(i, self.spec) for i in images])

    @torch.inference_mode()
    def cross(self, pixels: torch.Tensor) -> tuple[list, list]:
        return tuple([t.numpy() for t in layers] for layers in self.model.vision(pixels))

    def start(self, pixels: torch.Tensor, slots: int):
        return start(self.decoder, self.cross(pixels), slots)

    def generate(self, images, cfg: GenerationConfig) -> list[list[int]]:
        state = self.start(self.pixels(images), capacity(len(self.prompt), cfg.max_new_tokens))
        return generate(cached(self.graph_step), state, np.tile(self.prompt, (len(images), 1)), self.eos, cfg)

    def logits(self, pixels: torch.Tensor, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits (N, T, V) for token rows that start with the prompt."""
        return prefix_logits(self.graph_step, self.start(pixels, ids.shape[1]), ids)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)


def checkpoint_for(manifest: Manifest, search_dir: Path) -> Path:
    """The training checkpoint a package was exported from, found by its recorded SHA-256."""
    want = manifest.data["source"]["decoder_checkpoint"]
    path = search_dir / want["file"]
    if not path.is_file() or sha256(path) != want["sha256"]:
        raise FileNotFoundError(f"checkpoint {want['file']} (sha256 {want['sha256'][:12]}...) not found in {search_dir}; "
                                "pass --reference")
    return path
