"""python -m export hf SRC --out PKG: a Hugging Face captioner folder -> model package.

The folder is read with `local_files_only` (nothing comes from the hub) and selected by the
architecture in its config.json: one module per family (`FAMILIES`), over the shared parts in
`common` (config, tokenizer, preprocessing, generation settings) and `decoders` (decoder steps
over transformers' own submodules). Cross-attention K/V move into the vision graph: computed once
per image, not every step (which is what optimum's export does). The wrappers are checked
against transformers' own forward before they are traced.

A family is one module with one `common.Family` subclass (the interface and its defaults); adding
one is its module and a line in FAMILIES.
"""

import os
import tempfile
from dataclasses import asdict, replace
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub

import numpy as np
import torch

from runtime.manifest import Decoder, Manifest, Prompting, TokenizerSpec
from runtime.preprocess import smart_size, upright
from runtime.prompting import chat_text
from runtime.search import GenerationConfig, State, cached, capacity, prefix_logits, start, until_eos

from ..check import Agreement, ExportError, Tolerance, compare, compare_argmax
from ..package import OPSET, GraphShape, eager_outputs, report, trace, versions, write_package
from ..reference import torch_graph_step
from ..progress import Progress
from ..quantize import check_vision_compute, quantize_package
from . import blip, blip_vqa, decoders, fastvlm, florence2, git, qwen2_5_vl, smolvlm, vision_encoder_decoder
from .common import (Family, HFCaptioner, eos_ids, generation_settings, image_processor, load_tokenizer,
                     read_config)

FAMILIES = {architecture: module.FAMILY for module in (vision_encoder_decoder, blip, blip_vqa, git, florence2, smolvlm,
                                                       fastvlm, qwen2_5_vl)
            for architecture in (module.FAMILY.ARCHITECTURE, *module.FAMILY.ALSO)}
SUPPORTED = " and ".join(dict.fromkeys(family.SUPPORTS for family in FAMILIES.values()))


class Unsupported(ExportError):
    def __init__(self, src: Path, what: str):
        super().__init__(f"{src}: {what}; supported: {SUPPORTED}")


def family_of(src: Path) -> Family:
    """The family of a folder, from config.json alone: unsupported architectures are
    refused before any weights are read."""
    config = read_config(src)
    architectures, kind = config.get("architectures") or [], config.get("model_type")
    by_type = [f for f in FAMILIES.values() if f.MODEL_TYPE == kind]
    family = FAMILIES.get(architectures[0]) if architectures else (by_type or [None])[0]
    if family is None:
        raise Unsupported(src, f"{', '.join(architectures or [str(kind)])} is not a supported captioner")
    if reason := family.unsupported(config):
        raise Unsupported(src, reason)
    return family


def load_model(src: Path, attention: str | None = None):
    """(family, transformers model in eval mode). `attention` picks transformers'
    attention implementation (its default, sdpa, is what users run)."""
    family = family_of(src)
    return family, family.model_class().from_pretrained(src, local_files_only=True, attn_implementation=attention).eval()


def graph_shape(family, model, captioner: HFCaptioner, image_size: tuple[int, int], tiles: int,
                grid_factor: int = 0) -> GraphShape:
    text = family.text_config(model)
    layers, heads, kv_heads, head_dim, width, positions = decoders.dims(text)
    image_token = model.config.image_token_id if family.MEMORY == "embeddings" else None
    decoder = Decoder(layers, heads, kv_heads, head_dim, text.vocab_size, positions, family.MEMORY, image_token,
                      family.ROPE, family.ATTENTION)
    shape = GraphShape(decoder, 0, image_size, positions if family.INPUT in ("encoder", "task") else 0, tiles, width,
                       grid_factor)
    inputs = shape.vision_inputs(1, torch.Generator())
    with torch.inference_mode():
        memory_tokens = captioner.memory(*inputs).shape[1] - sum(t.shape[1] for t in inputs[1:])
    if family.INPUT == "task":  # the image's tokens and the prompt share the encoder's positions
        return replace(shape, memory_tokens=memory_tokens, text_positions=positions - memory_tokens)
    return replace(shape, memory_tokens=memory_tokens)


def check_wrappers(family, model, captioner: HFCaptioner, shape: GraphShape, tol: Tolerance) -> Agreement:
    """The per-layer-cache wrappers vs transformers' forward, prefill and one cached step,
    judged like the graphs (export.check)."""
    gen, d = torch.Generator().manual_seed(0), shape.decoder
    inputs = shape.vision_inputs(2, gen)
    ids = torch.randint(d.vocab_size, (2, 6), generator=gen)
    if d.memory == "embeddings":  # one image's placeholders amid the text
        ids = torch.cat([ids[:, :2], torch.full((2, shape.memory_tokens), d.image_token), ids[:, 2:]], dim=1)
    with torch.inference_mode():
        want = family.reference_logits(model, inputs, ids)
    step, ids, t = torch_graph_step(captioner, d), ids.numpy(), ids.shape[1] - 1
    state = start(d, shape.memory(eager_outputs(captioner, inputs), ids), t + 1)
    first = prefix_logits(step, state, ids[:, :t])
    fed = State(ids[:, :t], np.tile(np.arange(t), (2, 1)), state.cache.advanced(t), state.memory)
    last, _ = cached(step)(fed, ids[:, t:])
    got, want, seen = np.concatenate([first, last[:, None]], axis=1), want.numpy(), Agreement()
    what = f"the decoder wrapper vs transformers' forward (prefill {t} tokens + 1 cached step, batch 2)"
    compare(what, ["logits"], [got], [want], tol, seen)
    compare_argmax(what, got, want, tol, seen)
    return seen


def export_hf(src: Path, out: Path, prompt: str | None = None, precision: str = "fp32",
              tol: Tolerance = Tolerance(), vision_compute: str = "fp32") -> str:
    """A package of `precision` (int8 and fp16 are quantized from the FP32 export, see
    export.quantize for `vision_compute`); returns the summary lines (warnings first) for the
    entry point to print."""
    check_vision_compute(precision, vision_compute)
    if precision != "fp32":
        with tempfile.TemporaryDirectory() as tmp:
            summary = export_hf(src, Path(tmp) / "fp32", prompt, tol=tol)
            return summary + "\n" + quantize_package(Path(tmp) / "fp32", precision, out, vision_compute=vision_compute)
    src = Path(src)
    if not src.is_dir():
        raise ExportError(f"{src}: not a folder (a local Hugging Face model folder is expected)")
    progress = Progress("export", 4, every_s=0)
    # Eager attention traces everywhere (Swin's sdpa path does not decompose for ONNX).
    # Everything read from the folder's small files is checked before the weights are loaded.
    family = family_of(src)
    tasks = family.tasks(src) if family.INPUT == "task" else None
    chat = family.chat(src) if family.INPUT == "chat" else None
    tokenizer = load_tokenizer(src)
    spec = family.preprocess_spec(src)
    family, model = load_model(src, attention="eager")
    prompt_ids, eos = family.prompt_and_eos(src, model, tokenizer, prompt)
    eos = eos_ids(src, prompt_ids, eos, chat)
    generation, ignored = generation_settings(model, prompt_ids)
    captioner = family.captioner(model)
    grid_factor = spec.factor if spec.kind == "grid" else 0
    if spec.kind == "tiles":
        image_size, tiles = (spec.tile, spec.tile), (spec.longest_edge // spec.tile) ** 2 + 1
    elif grid_factor:  # an example size: a 640x480 photo's
        image_size, tiles = smart_size(640, 480, spec)[::-1], 0
    elif not isinstance(spec.resize, list) and spec.crop is None:
        raise ExportError(f"{src}: the image processor keeps the aspect ratio without a crop; "
                         "the vision graph needs a fixed size")
    else:
        image_size, tiles = tuple(spec.crop or spec.resize), 0
    shape = graph_shape(family, model, captioner, image_size, tiles, grid_factor)
    wrapper = check_wrappers(family, model, captioner, shape, tol)
    # A chat model's check prompt: its default question about one untiled image, as the runtime builds it.
    checked = tokenizer(chat_text(chat, chat["question"], [shape.grid])).input_ids if chat else prompt_ids
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seen = trace(captioner, shape, folder, progress, tol, checked)
        tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
        manifest = write_package(folder, out, {
            "name": src.name,
            "precision": "fp32",
            "dims": shape.dims(capacity(len(checked) + (tiles - 1) * shape.memory_tokens, generation.max_new_tokens)),
            "decoder": asdict(shape.decoder),
            "preprocess": asdict(spec),
            # Florence-2's answers keep its location tokens for the parsers
            "tokenizer": asdict(TokenizerSpec("tokenizer.json", eos, bool(tokenizer.clean_up_tokenization_spaces),
                                              skip_special_tokens=family.INPUT != "task")),
            "generation": asdict(generation),
            "prompting": asdict(Prompting(family.INPUT, [int(i) for i in prompt_ids], tasks, chat)),
            "source": {
                "model": family.describe(model),
                "folder": src.name,
                "prompt": prompt,
                "ignored_generation_settings": ignored,
                "wrapper_vs_transformers": wrapper.record(tol),
                "onnx_vs_eager": seen.record(tol),
                "opset": OPSET,
                "versions": {**versions(), "transformers": version("transformers")},
            },
        })
    progress.update(4, "written")
    warnings = [f"warning: generation_config sets {setting}, which the runtime does not implement; ignored"
                for setting in ignored]
    return "\n".join([*warnings, report(out, manifest, seen, progress)])


class HFReference:
    """transformers' own image processor (PIL backend) and `generate`: the parity reference
    for a package exported from `src`."""

    def __init__(self, src: Path, manifest: Manifest):
        from transformers.utils import logging

        logging.set_verbosity_error()  # generate's advice about max_length and masks
        self.src, (self.family, self.model) = Path(src), load_model(Path(src))
        self.tokenizer = load_tokenizer(Path(src))
        self.prompt = np.array(manifest.prompting.prefix, dtype=np.int64)
        self.eos = manifest.tokenizer.eos_ids
        self.chat = manifest.prompting.chat
        self.processor = image_processor(Path(src))
        if self.family.INPUT == "task":  # Florence-2's processor builds the task prompts
            from transformers import Florence2Processor

            self.tasks = Florence2Processor.from_pretrained(Path(src), local_files_only=True)

    def pixels(self, images) -> torch.Tensor:
        # The runtime's decoding policy (formats, limits, EXIF), then transformers' own pipeline from
        # the image as decoded: its convert_to_rgb composites transparency onto white (asked for
        # explicitly, since processors such as ViT's leave it off by default).
        return self.processor(images=[upright(i) for i in images], do_convert_rgb=True,
                              return_tensors="pt").pixel_values

    def ask(self, question: str | None = None, task: str | None = None, text: str | None = None,
            images=None) -> tuple[np.ndarray, list[torch.Tensor]]:
        """(prompt, text ids for the model's encoder) as transformers' processors and model cards
        build them: GIT appends the question's tokens to [CLS]; BLIP VQA encodes [CLS] question
        [SEP]; Florence2Processor builds a task's prompt (`images`: one, for its layout)."""
        if task is not None:
            ids = self.tasks(text=[task + (text or "")], images=[upright(images[0])], return_tensors="pt").input_ids
            return self.prompt, [ids[:, int((ids[0] == self.tasks.image_token_id).sum()) :]]
        if question is None:
            return self.prompt, []
        if self.family.INPUT == "prompt":
            return np.array([*self.prompt, *self.tokenizer(question, add_special_tokens=False).input_ids]), []
        return self.prompt, [torch.tensor([self.tokenizer(question).input_ids])]

    @torch.inference_mode()
    def generate(self, images, cfg: GenerationConfig, question: str | None = None, task: str | None = None,
                 text: str | None = None) -> list[list[int]]:
        kwargs = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "do_sample": False,
                  "length_penalty": cfg.length_penalty, "early_stopping": cfg.early_stopping,
                  "no_repeat_ngram_size": cfg.no_repeat_ngram_size}
        if self.chat is not None:  # the processor lays out tiles and prompt; one image per row
            inputs = self.family.reference_inputs(self.src, [upright(i) for i in images], question or self.chat["question"])
            out = self.model.generate(**inputs, **kwargs)
            return [until_eos(row, self.eos) for row in out[:, inputs.input_ids.shape[1]:].tolist()]
        pixels = self.pixels(images)
        prompt, asked = self.ask(question, task, text, images)
        inputs = [pixels, *(q.repeat(len(pixels), 1) for q in asked)]
        out = self.family.generate(self.model, inputs, torch.from_numpy(np.tile(prompt, (len(pixels), 1))),
                                   self.eos, **kwargs)
        return [until_eos(row, self.eos) for row in out[:, len(prompt):].tolist()]

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor, ids: np.ndarray, question: str | None = None, task: str | None = None,
               text: str | None = None, images=None) -> np.ndarray:
        """Teacher-forced logits of token rows that start with the prompt (and question)."""
        inputs = [pixels, *(q.repeat(len(pixels), 1) for q in self.ask(question, task, text, images)[1])]
        return self.family.reference_logits(self.model, inputs, torch.from_numpy(ids)).numpy()

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([*self.prompt, *tokens], skip_special_tokens=True)
