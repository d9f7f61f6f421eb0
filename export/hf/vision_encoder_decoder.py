"""Family: `VisionEncoderDecoderModel` with a ViT, DeiT or Swin encoder and a GPT-2 or BERT decoder
with cross-attention (nlpconnect/vit-gpt2-image-captioning and its kind)."""

from pathlib import Path

import torch
from torch import nn

from ..check import ExportError
from ..hf_random import BASE, TINY, boost_eos, byte_level_tokenizer, realistic_scale, wordpiece_tokenizer
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


# The random-weight folder of this family, built offline (tests, benchmarks: python -m export random-hf;
# export.hf_random holds the tools the families share).
def encoder_config(kind: str, s: dict, init: float):
    from transformers import DeiTConfig, SwinConfig, ViTConfig

    if kind == "swin":
        return SwinConfig(image_size=s["image"], patch_size=s["patch"] // 2, embed_dim=s["hidden"] // 2, depths=[1, 1],
                          num_heads=[1, 2], window_size=2, initializer_range=init)
    cls = {"vit": ViTConfig, "deit": DeiTConfig}[kind]
    return cls(image_size=s["image"], patch_size=s["patch"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
               num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"], initializer_range=init)


def build_vision_encoder_decoder(out: Path, encoder: str = "vit", decoder: str = "gpt2", size: str = "tiny",
                                 conditioned: bool = True, seed: int = 0, realistic: bool = False) -> Path:
    from transformers import (BertConfig, DeiTImageProcessor, GPT2Config, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    s, init = (TINY if size == "tiny" else BASE), (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    if decoder == "gpt2":
        tok = byte_level_tokenizer(s["vocab"])
        dec = GPT2Config(vocab_size=max(len(tok), s["vocab"]), n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                         n_positions=64 if size == "tiny" else 1024, add_cross_attention=True, initializer_range=init,
                         tie_word_embeddings=not conditioned,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        start, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    else:
        tok = wordpiece_tokenizer(s["vocab"])
        dec = BertConfig(vocab_size=max(len(tok), s["vocab"]), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"],
                         max_position_embeddings=64 if size == "tiny" else 512, is_decoder=True,
                         add_cross_attention=True, initializer_range=init)
        start, eos, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder_config(encoder, s, init), dec)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = start, eos, pad
    model = VisionEncoderDecoderModel(config=config).eval()
    if conditioned:
        boost_eos(model.decoder, eos)
    if realistic:
        realistic_scale(model.decoder)
    model.generation_config.update(decoder_start_token_id=start, eos_token_id=eos, pad_token_id=pad, max_length=16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if encoder == "deit":  # DeiT's own processor: resize, then a centre crop
        DeiTImageProcessor(size={"height": s["image"] * 8 // 7, "width": s["image"] * 8 // 7},
                           crop_size={"height": s["image"], "width": s["image"]}).save_pretrained(out)
    else:
        ViTImageProcessor(size={"height": s["image"], "width": s["image"]}, image_mean=[0.5] * 3,
                          image_std=[0.5] * 3).save_pretrained(out)
    return out
