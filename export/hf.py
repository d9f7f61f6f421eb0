"""python -m export hf SRC --out PKG: a Hugging Face captioner folder -> model package.

Supported: `VisionEncoderDecoderModel` with a ViT, DeiT or Swin encoder and a GPT-2 or
BERT decoder (with cross-attention), and `BlipForConditionalGeneration`. The folder is
read with `local_files_only`; nothing comes from the hub.

The decoders are re-expressed over transformers' own submodules (same weights, nothing
copied) with the cache as plain stacked tensors, because transformers' cache objects
cannot be graph inputs. Cross-attention K/V move into the vision graph: computed once
per image, not every step (which is what optimum's export does). The export checks
these wrappers against transformers' own forward before tracing them.
"""

import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the hub

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.preprocess import upright
from runtime.search import GenerationConfig, until_eos

from .check import Agreement, ExportError, Tolerance, compare, compare_argmax
from .model import causal, merge_heads, split_heads
from .onnx_export import OPSET, GraphShape, report, trace, versions, write_package
from .progress import Progress
from .quantize import quantize_package

SUPPORTED = ("VisionEncoderDecoderModel (encoder vit, deit or swin; decoder gpt2 or bert with cross-attention) "
             "and BlipForConditionalGeneration")
ENCODERS = ("vit", "deit", "swin")
DECODERS = ("gpt2", "bert")
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor configs store them


class Unsupported(ExportError):
    def __init__(self, src: Path, what: str):
        super().__init__(f"{src}: {what}; supported: {SUPPORTED}")


class GPT2Decoder(nn.Module):
    """`GPT2LMHeadModel` with cross-attention, as a decoder step over stacked caches."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.n_head, self.width = lm, lm.config.n_head, lm.config.n_embd

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = [block.crossattention.c_attn(memory).split(self.width, dim=2) for block in self.lm.transformer.h]
        return (torch.stack([split_heads(k, self.n_head) for k, _ in kv]),
                torch.stack([split_heads(v, self.n_head) for _, v in kv]))

    def forward(self, input_ids, past_key, past_value, cross_key, cross_value):
        t = self.lm.transformer
        positions, mask = causal(past_key.shape[3], input_ids.shape[1], input_ids.device)
        x = t.wte(input_ids) + t.wpe(positions)
        keys, values = [], []
        for i, block in enumerate(t.h):
            attn, cross = block.attn, block.crossattention
            q, k, v = (split_heads(z, self.n_head) for z in attn.c_attn(block.ln_1(x)).split(self.width, dim=2))
            k, v = torch.cat([past_key[i], k], dim=2), torch.cat([past_value[i], v], dim=2)
            x = x + attn.c_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)))
            q = split_heads(cross.q_attn(block.ln_cross_attn(x)), self.n_head)
            x = x + cross.c_proj(merge_heads(F.scaled_dot_product_attention(q, cross_key[i], cross_value[i],
                                                                            scale=cross.scaling)))
            x = x + block.mlp(block.ln_2(x))
            keys.append(k)
            values.append(v)
        return self.lm.lm_head(t.ln_f(x)), torch.stack(keys), torch.stack(values)


class BertDecoder(nn.Module):
    """`BertLMHeadModel` or BLIP's `BlipTextLMHeadModel` (post-LN, `.bert` + `.cls`), as a
    decoder step over stacked caches."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.n_head = lm, lm.config.num_attention_heads

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.lm.bert.encoder.layer
        return (torch.stack([split_heads(layer.crossattention.self.key(memory), self.n_head) for layer in layers]),
                torch.stack([split_heads(layer.crossattention.self.value(memory), self.n_head) for layer in layers]))

    def forward(self, input_ids, past_key, past_value, cross_key, cross_value):
        emb = self.lm.bert.embeddings
        positions, mask = causal(past_key.shape[3], input_ids.shape[1], input_ids.device)
        x = emb.word_embeddings(input_ids)
        if hasattr(emb, "token_type_embeddings"):  # BERT's segment 0; BLIP has none
            x = x + emb.token_type_embeddings(torch.zeros_like(input_ids))
        x = emb.LayerNorm(x + emb.position_embeddings(positions))
        keys, values = [], []
        for i, layer in enumerate(self.lm.bert.encoder.layer):
            sa, ca = layer.attention.self, layer.crossattention.self
            q, k, v = (split_heads(f(x), self.n_head) for f in (sa.query, sa.key, sa.value))
            k, v = torch.cat([past_key[i], k], dim=2), torch.cat([past_value[i], v], dim=2)
            a = layer.attention.output(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), x)
            q = split_heads(ca.query(a), self.n_head)
            c = layer.crossattention.output(merge_heads(F.scaled_dot_product_attention(q, cross_key[i], cross_value[i])), a)
            x = layer.output(layer.intermediate(c), c)
            keys.append(k)
            values.append(v)
        return self.lm.cls(x), torch.stack(keys), torch.stack(values)


class HFCaptioner(nn.Module):
    """vision(pixels) -> cross K/V; step(...) as in runtime.search."""

    def __init__(self, encoder: nn.Module, project: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.project, self.decoder = encoder, project, decoder

    def memory(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.project(self.encoder(pixel_values=pixels)[0])

    def vision(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.cross_kv(self.memory(pixels))

    def step(self, input_ids, past_key, past_value, cross_key, cross_value):
        return self.decoder(input_ids, past_key, past_value, cross_key, cross_value)


def read_config(src: Path) -> dict:
    try:
        return json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise ExportError(f"{src}: no config.json; not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{src}: unreadable config.json: {e}") from None


def load_model(src: Path, attention: str | None = None):
    """(family, transformers model in eval mode); unsupported architectures are refused
    from config.json alone, before any weights are read. `attention` picks transformers'
    attention implementation (its default, sdpa, is what users run)."""
    config = read_config(src)
    kind = config.get("model_type")
    if kind == "vision-encoder-decoder":
        enc, dec = config.get("encoder", {}), config.get("decoder", {})
        if enc.get("model_type") not in ENCODERS or dec.get("model_type") not in DECODERS:
            raise Unsupported(src, f"a VisionEncoderDecoderModel with encoder {enc.get('model_type')!r} "
                                   f"and decoder {dec.get('model_type')!r}")
        if not dec.get("add_cross_attention"):
            raise Unsupported(src, "its decoder has no cross-attention")
        from transformers import VisionEncoderDecoderModel as cls
    elif kind == "blip" and "BlipForConditionalGeneration" in config.get("architectures", ["BlipForConditionalGeneration"]):
        from transformers import BlipForConditionalGeneration as cls
    else:
        arch = ", ".join(config.get("architectures") or [str(kind)])
        raise Unsupported(src, f"{arch} is not a supported captioner")
    return kind, cls.from_pretrained(src, local_files_only=True, attn_implementation=attention).eval()


def captioner_for(kind: str, model) -> HFCaptioner:
    if kind == "blip":
        return HFCaptioner(model.vision_model, nn.Identity(), BertDecoder(model.text_decoder)).eval()
    # VisionEncoderDecoderModel projects encoder states only when the widths differ and
    # the decoder does not declare its own cross-attention width.
    projects = (model.encoder.config.hidden_size != model.decoder.config.hidden_size
                and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None)
    decoder = GPT2Decoder(model.decoder) if model.decoder.config.model_type == "gpt2" else BertDecoder(model.decoder)
    return HFCaptioner(model.encoder, model.enc_to_dec_proj if projects else nn.Identity(), decoder).eval()


def image_processor(src: Path):
    """The PIL-backend image processor: the runtime resizes with Pillow too."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(src, local_files_only=True, backend="pil")
    except OSError as e:
        raise ExportError(f"{src}: no usable preprocessor_config.json ({str(e).splitlines()[0]})") from None


def preprocess_spec(src: Path) -> dict:
    """The image processor's settings in the manifest's terms."""
    proc = image_processor(src)
    size, crop = dict(proc.size), None
    if "height" in size:
        resize = [size["height"], size["width"]]
    else:
        resize = size["shortest_edge"]
    if getattr(proc, "do_center_crop", False):
        crop = [proc.crop_size["height"], proc.crop_size["width"]]
    resample = int(proc.resample)
    if resample not in RESAMPLE or not proc.do_resize or not proc.do_rescale or not proc.do_normalize:
        raise ExportError(f"{src}: image processor settings the runtime does not implement "
                         f"(resample {resample}, resize {proc.do_resize}, rescale {proc.do_rescale}, "
                         f"normalize {proc.do_normalize})")
    mean, std = proc.image_mean, proc.image_std
    return {"resize": resize, "crop": crop, "crop_offset": "floor", "resample": RESAMPLE[resample],
            "rescale": float(proc.rescale_factor), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "layout": "NCHW"}


# Settings that change which tokens `generate` picks and that the runtime does not do.
UNSUPPORTED_GENERATION = ("do_sample", "repetition_penalty", "min_length", "min_new_tokens", "bad_words_ids",
                          "forced_bos_token_id", "forced_eos_token_id", "num_beam_groups", "suppress_tokens",
                          "begin_suppress_tokens", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty")


def generation_settings(src: Path, kind: str, model, tokenizer, prompt: str | None) -> tuple[dict, int, list[str]]:
    """(manifest `generation`, EOS id, settings ignored) from the checkpoint's generation config."""
    from transformers import GenerationConfig as HFGenerationConfig

    gc, default = model.generation_config, HFGenerationConfig()
    ignored = [f"{k}={getattr(gc, k)!r}" for k in UNSUPPORTED_GENERATION
               if getattr(gc, k, None) not in (getattr(default, k, None), None)]
    if kind == "blip":
        # BlipForConditionalGeneration.generate: the prompt's [CLS] becomes BOS, its [SEP] is dropped.
        ids = tokenizer(prompt).input_ids if prompt else [None, None]
        prompt_ids = [model.config.text_config.bos_token_id, *ids[1:-1]]
        eos = model.config.text_config.sep_token_id
    else:
        if prompt:
            raise ExportError(f"{src}: --prompt is for BLIP; a VisionEncoderDecoderModel starts from "
                             "its decoder_start_token_id")
        start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else model.config.decoder_start_token_id
        prompt_ids, eos = [start], gc.eos_token_id
    if isinstance(eos, list):
        if len(eos) != 1:
            raise ExportError(f"{src}: several EOS tokens {eos}; the runtime stops on one")
        eos = eos[0]
    if None in prompt_ids or eos is None:
        raise ExportError(f"{src}: the config sets no decoder start / EOS token id")
    def setting(name: str, default):  # transformers 5 leaves unset fields None
        value = getattr(gc, name, None)
        return default if value is None else value

    max_new = setting("max_new_tokens", None) or setting("max_length", 20) - len(prompt_ids)
    return {"prompt_ids": [int(i) for i in prompt_ids], "max_new_tokens": int(max_new),
            "num_beams": int(setting("num_beams", 1)), "length_penalty": float(setting("length_penalty", 1.0)),
            "early_stopping": setting("early_stopping", False),
            "no_repeat_ngram_size": int(setting("no_repeat_ngram_size", 0))}, int(eos), ignored


def load_tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExportError(f"{src}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    if not tok.is_fast:
        raise ExportError(f"{src}: the tokenizer has no fast (tokenizer.json) form for the runtime")
    return tok


def graph_shape(kind: str, model, captioner: HFCaptioner, image_size: tuple[int, int]) -> GraphShape:
    with torch.inference_mode():
        memory_tokens = captioner.memory(torch.zeros(1, 3, *image_size)).shape[1]
    text = model.config.text_config if kind == "blip" else model.decoder.config
    if text.model_type == "gpt2":
        layers, heads, width, positions = text.n_layer, text.n_head, text.n_embd, text.n_positions
    else:
        layers, heads, width, positions = (text.num_hidden_layers, text.num_attention_heads, text.hidden_size,
                                           text.max_position_embeddings)
    return GraphShape(layers, heads, width // heads, memory_tokens, text.vocab_size, positions, image_size)


def reference_logits(kind: str, model, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own forward, no cache: what the wrappers must reproduce."""
    if kind == "blip":
        memory = model.vision_model(pixel_values=pixels)[0]
        return model.text_decoder(input_ids=ids, encoder_hidden_states=memory).logits
    return model(pixel_values=pixels, decoder_input_ids=ids).logits


def check_wrappers(kind: str, model, captioner: HFCaptioner, shape: GraphShape, tol: Tolerance) -> Agreement:
    """The stacked-cache wrappers vs transformers' forward, prefill and one cached step,
    judged like the graphs (export.check)."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, *shape.image_size, generator=gen)
    ids = torch.randint(shape.vocab_size, (2, 6), generator=gen)
    empty = torch.zeros(shape.layers, 2, shape.heads, 0, shape.head_dim)
    with torch.inference_mode():
        want = reference_logits(kind, model, pixels, ids)
        cross = captioner.vision(pixels)
        first, key, value = captioner.step(ids[:, :5], empty, empty, *cross)
        last, _, _ = captioner.step(ids[:, 5:], key, value, *cross)
    got, want, seen = torch.cat([first, last], dim=1).numpy(), want.numpy(), Agreement()
    what = "the decoder wrapper vs transformers' forward (prefill 5 tokens + 1 cached step, batch 2)"
    compare(what, ["logits"], [got], [want], tol, seen)
    compare_argmax(what, got, want, tol, seen)
    return seen


def export_hf(src: Path, out: Path, prompt: str | None = None, precision: str = "fp32",
              tol: Tolerance = Tolerance()) -> str:
    """A package of `precision` (int8 and fp16 are quantized from the FP32 export); returns
    the summary lines (warnings first) for the entry point to print."""
    if precision != "fp32":
        with tempfile.TemporaryDirectory() as tmp:
            summary = export_hf(src, Path(tmp) / "fp32", prompt, tol=tol)
            return summary + "\n" + quantize_package(Path(tmp) / "fp32", precision, out)
    src = Path(src)
    if not src.is_dir():
        raise ExportError(f"{src}: not a folder (a local Hugging Face model folder is expected)")
    progress = Progress("export", 4, every_s=0)
    # Eager attention traces everywhere (Swin's sdpa path does not decompose for ONNX).
    kind, model = load_model(src, attention="eager")
    tokenizer = load_tokenizer(src)
    spec = preprocess_spec(src)
    generation, eos, ignored = generation_settings(src, kind, model, tokenizer, prompt)
    captioner = captioner_for(kind, model)
    if not isinstance(spec["resize"], list) and spec["crop"] is None:
        raise ExportError(f"{src}: the image processor keeps the aspect ratio without a crop; "
                         "the vision graph needs a fixed size")
    image_size = tuple(spec["crop"] or spec["resize"])
    shape = graph_shape(kind, model, captioner, image_size)
    wrapper = check_wrappers(kind, model, captioner, shape, tol)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seen = trace(captioner, shape, folder, progress, tol, generation["prompt_ids"])
        tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
        manifest = write_package(folder, out, {
            "name": src.name,
            "precision": "fp32",
            "dims": shape.dims(),
            "decoder": shape.decoder_section(),
            "preprocess": spec,
            "tokenizer": {"file": "tokenizer.json", "eos_id": eos,
                          "clean_up_spaces": bool(tokenizer.clean_up_tokenization_spaces)},
            "generation": generation,
            "source": {
                "model": type(model).__name__ + (f" ({model.encoder.config.model_type} + {model.decoder.config.model_type})"
                                                 if kind != "blip" else ""),
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

    def __init__(self, src: Path, manifest: dict):
        from transformers.utils import logging

        logging.set_verbosity_error()  # generate's advice about max_length and masks
        self.kind, self.model = load_model(Path(src))
        self.tokenizer = load_tokenizer(Path(src))
        self.prompt = np.array(manifest["generation"]["prompt_ids"], dtype=np.int64)
        self.eos_id = manifest["tokenizer"]["eos_id"]
        self.processor = image_processor(Path(src))

    def pixels(self, images) -> torch.Tensor:
        # The runtime's decoding policy (formats, limits, EXIF), then transformers' own pipeline from
        # the image as decoded: its convert_to_rgb composites transparency onto white (asked for
        # explicitly, since processors such as ViT's leave it off by default).
        return self.processor(images=[upright(i) for i in images], do_convert_rgb=True,
                              return_tensors="pt").pixel_values

    @torch.inference_mode()
    def generate(self, images, cfg: GenerationConfig) -> list[list[int]]:
        pixels = self.pixels(images)
        prompt = torch.from_numpy(np.tile(self.prompt, (pixels.shape[0], 1)))
        kwargs = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "do_sample": False,
                  "length_penalty": cfg.length_penalty, "early_stopping": cfg.early_stopping,
                  "no_repeat_ngram_size": cfg.no_repeat_ngram_size}
        if self.kind == "blip":  # its generate drops the last prompt token (the [SEP] a processor adds)
            sep = torch.full((pixels.shape[0], 1), self.eos_id)
            out = self.model.generate(pixel_values=pixels, input_ids=torch.cat([prompt, sep], dim=1), **kwargs)
        else:
            out = self.model.generate(pixel_values=pixels, decoder_input_ids=prompt, **kwargs)
        rows = out[:, len(self.prompt):].tolist()
        return [until_eos(row, self.eos_id) for row in rows]

    @torch.inference_mode()
    def logits(self, pixels: torch.Tensor, ids: np.ndarray) -> np.ndarray:
        return reference_logits(self.kind, self.model, pixels, torch.from_numpy(ids)).numpy()

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([*self.prompt, *tokens], skip_special_tokens=True)
