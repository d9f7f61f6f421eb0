"""Family: `VisionEncoderDecoderModel` with a ViT, DeiT or Swin encoder and a GPT-2 or BERT decoder
with cross-attention (nlpconnect/vit-gpt2-image-captioning and its kind)."""

from pathlib import Path

from torch import nn

from ..check import ExportError
from . import decoders
from .common import Family, HFCaptioner

ENCODERS, DECODERS = ("vit", "deit", "swin"), ("gpt2", "bert")


class VisionEncoderDecoder(Family):
    ARCHITECTURE, MODEL_TYPE = "VisionEncoderDecoderModel", "vision-encoder-decoder"
    SUPPORTS = "VisionEncoderDecoderModel (encoder vit, deit or swin; decoder gpt2 or bert with cross-attention)"

    def unsupported(self, config: dict) -> str | None:
        enc, dec = config.get("encoder", {}), config.get("decoder", {})
        if enc.get("model_type") not in ENCODERS or dec.get("model_type") not in DECODERS:
            return f"a VisionEncoderDecoderModel with encoder {enc.get('model_type')!r} and decoder {dec.get('model_type')!r}"
        if not dec.get("add_cross_attention"):
            return "its decoder has no cross-attention"
        return None

    def model_class(self):
        from transformers import VisionEncoderDecoderModel

        return VisionEncoderDecoderModel

    def captioner(self, model) -> HFCaptioner:
        # VisionEncoderDecoderModel projects encoder states only when the widths differ and
        # the decoder does not declare its own cross-attention width.
        projects = (model.encoder.config.hidden_size != model.decoder.config.hidden_size
                    and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None)
        return HFCaptioner(model.encoder, model.enc_to_dec_proj if projects else nn.Identity(),
                           decoders.wrap(model.decoder)).eval()

    def text_config(self, model):
        return model.decoder.config

    def describe(self, model) -> str:
        return f"{type(model).__name__} ({model.encoder.config.model_type} + {model.decoder.config.model_type})"

    def prompt_and_eos(self, src: Path, model, tokenizer, prompt: str | None) -> tuple[list, object]:
        if prompt:
            raise ExportError(f"{src}: --prompt is for BLIP; a VisionEncoderDecoderModel starts from "
                              "its decoder_start_token_id")
        gc = model.generation_config
        start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else model.config.decoder_start_token_id
        return [start], gc.eos_token_id

    def reference_logits(self, model, inputs, ids):
        """transformers' own forward, no cache: what the wrappers must reproduce."""
        return model(pixel_values=inputs[0], decoder_input_ids=ids).logits

    def generate(self, model, inputs, prompt, eos: list[int], **kwargs):
        return model.generate(pixel_values=inputs[0], decoder_input_ids=prompt, **kwargs)


FAMILY = VisionEncoderDecoder()
