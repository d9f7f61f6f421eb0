"""What every Hugging Face family shares: config, tokenizer, image processor settings in the
manifest's terms, generation settings, and the captioner shape the tracer takes."""

import json
from pathlib import Path

import torch
from torch import nn

from runtime.manifest import FixedSize, Generation, Preprocess

from ..check import ExportError

RESAMPLE = {1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as preprocessor configs store them


class HFCaptioner(nn.Module):
    """vision(pixels[, text_ids]) -> memory K/V per layer; step(...) as in export.hf.decoders. `encoder`
    maps the vision inputs to hidden states (its output's first item), `project` those to
    the decoder's width, `decoder.memory_kv` them to every layer's keys and values."""

    def __init__(self, encoder: nn.Module, project: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.project, self.decoder = encoder, project, decoder

    def memory(self, pixels: torch.Tensor, *text_ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.encoder(pixels, *text_ids)[0])

    def vision(self, pixels: torch.Tensor, *text_ids: torch.Tensor) -> tuple[list, list]:
        return self.decoder.memory_kv(self.memory(pixels, *text_ids))

    def step(self, *feeds):
        return self.decoder(*feeds)


class Family:
    """What export.hf needs of a Hugging Face architecture, with the defaults most families share. Each
    family module (export/hf/<family>.py) defines one subclass, FAMILY = its instance, and holds
    everything of that family: its wrappers over transformers' modules, its manifest sections, its
    reference (transformers' own logits and generate, for parity) and its random-weight folder
    (build_<family>, over export.hf_random's shared tools). Adding a family is its module, its line in
    export.hf.FAMILIES and its --encoder choice of `python -m export random-hf`."""

    ARCHITECTURE = ""  # config.json's architectures[0]
    ALSO: tuple[str, ...] = ()  # other architectures with the same layout
    MODEL_TYPE = ""  # config.json's model_type, for folders that name no architecture
    SUPPORTS = ""  # its line in the refusal message
    MEMORY = "cross"  # how the decoder reads the vision graph: runtime.manifest.Decoder.memory
    INPUT = "none"  # where the text a request asks goes: runtime.manifest.Prompting.input
    ROPE = "1d"  # runtime.manifest.Decoder.rope
    ATTENTION = "onnx"  # runtime.manifest.Decoder.attention

    def unsupported(self, config: dict) -> str | None:
        """Why a folder of this architecture cannot be exported (read from config.json alone), or None."""
        return None

    def model_class(self):
        raise NotImplementedError

    def captioner(self, model) -> nn.Module:
        """The module the tracer takes: vision(...) and step(...)."""
        raise NotImplementedError

    def text_config(self, model):
        return model.config.text_config

    def describe(self, model) -> str:
        return type(model).__name__

    def preprocess_spec(self, src: Path) -> Preprocess:
        return preprocess_spec(src)

    def prompt_and_eos(self, src: Path, model, tokenizer, prompt: str | None) -> tuple[list, object]:
        """The decoder's fixed prompt ids and the end-of-sequence id(s), as the family's generate has them."""
        raise NotImplementedError

    def reference_logits(self, model, inputs, ids):
        """transformers' own teacher-forced logits for the vision graph's `inputs` and token rows `ids`."""
        raise NotImplementedError

    def generate(self, model, inputs, prompt, eos: list[int], **kwargs):
        """transformers' own generate from the vision graph's `inputs`; `eos`: every id that ends a sequence."""
        raise NotImplementedError


def read_config(src: Path) -> dict:
    try:
        return json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise ExportError(f"{src}: no config.json; not a Hugging Face model folder") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{src}: unreadable config.json: {e}") from None


def image_processor(src: Path):
    """The PIL-backend image processor: the runtime resizes with Pillow too."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(src, local_files_only=True, backend="pil")
    except OSError as e:
        raise ExportError(f"{src}: no usable preprocessor_config.json ({str(e).splitlines()[0]})") from None


def pixel_settings(src: Path, proc) -> dict:
    """The resample filter, rescale, mean and std of an image processor that resizes, rescales and
    normalizes as the runtime does; ExportError for settings it does not implement."""
    resample = int(proc.resample)
    if resample not in RESAMPLE or not proc.do_resize or not proc.do_rescale or not proc.do_normalize:
        raise ExportError(f"{src}: image processor settings the runtime does not implement "
                         f"(resample {resample}, resize {proc.do_resize}, rescale {proc.do_rescale}, "
                         f"normalize {proc.do_normalize})")
    return {"resample": RESAMPLE[resample], "rescale": float(proc.rescale_factor),
            "mean": [float(m) for m in proc.image_mean], "std": [float(s) for s in proc.image_std]}


def preprocess_spec(src: Path) -> FixedSize:
    """The image processor's settings in the manifest's terms."""
    proc = image_processor(src)
    size, crop = dict(proc.size), None
    if "height" in size:
        resize = [size["height"], size["width"]]
    else:
        resize = size["shortest_edge"]
    if getattr(proc, "do_center_crop", False):
        crop = [proc.crop_size["height"], proc.crop_size["width"]]
    return FixedSize(**pixel_settings(src, proc), resize=resize, crop=crop, crop_offset="floor")


# Settings that change which tokens `generate` picks and that the runtime does not do.
UNSUPPORTED_GENERATION = ("do_sample", "repetition_penalty", "min_length", "min_new_tokens", "bad_words_ids",
                          "num_beam_groups", "suppress_tokens",
                          "begin_suppress_tokens", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty")


def generation_settings(model, prompt_ids: list[int]) -> tuple[Generation, list[str]]:
    """(manifest `generation`, settings ignored) from the checkpoint's generation config, for a
    prompt the family has worked out."""
    from transformers import GenerationConfig as HFGenerationConfig

    gc, default = model.generation_config, HFGenerationConfig()
    ignored = [f"{k}={getattr(gc, k)!r}" for k in UNSUPPORTED_GENERATION
               if getattr(gc, k, None) not in (getattr(default, k, None), None)]

    def setting(name: str, default):  # transformers 5 leaves unset fields None
        value = getattr(gc, name, None)
        return default if value is None else value

    max_new = setting("max_new_tokens", None) or setting("max_length", 20) - len(prompt_ids)
    return Generation(int(max_new), num_beams=int(setting("num_beams", 1)),
                      length_penalty=float(setting("length_penalty", 1.0)),
                      early_stopping=setting("early_stopping", False),
                      no_repeat_ngram_size=int(setting("no_repeat_ngram_size", 0)),
                      forced_bos_token_id=setting("forced_bos_token_id", None),
                      forced_eos_token_id=setting("forced_eos_token_id", None)), ignored


def eos_ids(src: Path, prompt_ids: list, eos, chat: dict) -> list[int]:
    """Every id that ends a sequence (transformers' eos_token_id: one or several)."""
    eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    if None in prompt_ids or not eos or (not prompt_ids and not chat):
        raise ExportError(f"{src}: the config sets no decoder start / EOS token id")
    return [int(e) for e in eos]


def load_tokenizer(src: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ExportError(f"{src}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    if not tok.is_fast:
        raise ExportError(f"{src}: the tokenizer has no fast (tokenizer.json) form for the runtime")
    return tok
