"""Family: `BlipForConditionalGeneration` (Salesforce/blip-image-captioning-base/large): ViT
vision model, BERT-style text decoder with cross-attention, an optional text prompt."""

from pathlib import Path

import torch
from torch import nn

from ..hf_random import BASE, TINY, boost_eos, realistic_scale, wordpiece_tokenizer
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


# The random-weight folder of this family, built offline (tests, benchmarks: python -m export random-hf;
# export.hf_random holds the tools the families share).
def build_blip(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0, realistic: bool = False,
               vqa: bool = False) -> Path:
    """BLIP captioning (Salesforce/blip-image-captioning-base's shape at "base") or, with `vqa`,
    BLIP VQA (blip-vqa-base's: the same parts plus a question encoder)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering, BlipImageProcessor

    s, init = (TINY if size == "tiny" else BASE), (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = wordpiece_tokenizer(s.get("blip_vocab", s["vocab"]))
    image = s.get("blip_image", s["image"])
    text = {"vocab_size": max(len(tok), s.get("blip_vocab", 0)), "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "intermediate_size": 4 * s["hidden"], "encoder_hidden_size": s["hidden"],
            "max_position_embeddings": 64 if size == "tiny" else 512, "initializer_range": init,
            "bos_token_id": tok.bos_token_id, "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": s["hidden"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
              "intermediate_size": 4 * s["hidden"], "image_size": image, "patch_size": s["patch"],
              "initializer_range": init}
    blip = BlipForQuestionAnswering if vqa else BlipForConditionalGeneration
    model = blip(BlipConfig(text_config=text, vision_config=vision, initializer_range=init)).eval()
    if conditioned:
        boost_eos(model.text_decoder, tok.sep_token_id)
    if realistic:
        realistic_scale(model.text_decoder)
    model.generation_config.update(max_length=16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    BlipImageProcessor(size={"height": image, "width": image}).save_pretrained(out)
    return out
