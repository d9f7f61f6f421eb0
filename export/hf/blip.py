"""Family: `BlipForConditionalGeneration` (Salesforce/blip-image-captioning-base/large): ViT
vision model, BERT-style text decoder with cross-attention, an optional text prompt."""

from pathlib import Path

import torch
from torch import nn

from . import decoders
from .common import Family, HFCaptioner


class Blip(Family):
    ARCHITECTURE, MODEL_TYPE = "BlipForConditionalGeneration", "blip"
    SUPPORTS = "BlipForConditionalGeneration"

    def model_class(self):
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration

    def captioner(self, model) -> HFCaptioner:
        return HFCaptioner(model.vision_model, nn.Identity(), decoders.BertDecoder(model.text_decoder)).eval()

    def prompt_and_eos(self, src: Path, model, tokenizer, prompt: str | None) -> tuple[list, object]:
        """As BlipForConditionalGeneration.generate: the prompt's [CLS] becomes BOS, its [SEP] is dropped."""
        ids = tokenizer(prompt).input_ids if prompt else [None, None]
        return [model.config.text_config.bos_token_id, *ids[1:-1]], model.config.text_config.sep_token_id

    def reference_logits(self, model, inputs, ids):
        memory = model.vision_model(pixel_values=inputs[0])[0]
        return model.text_decoder(input_ids=ids, encoder_hidden_states=memory).logits

    def generate(self, model, inputs, prompt, eos: list[int], **kwargs):
        # Its generate drops the last prompt token (the [SEP] a processor adds: its one EOS).
        sep = torch.full((prompt.shape[0], 1), eos[0])
        return model.generate(pixel_values=inputs[0], input_ids=torch.cat([prompt, sep], dim=1), **kwargs)


FAMILY = Blip()
