"""Family: `BlipForQuestionAnswering` (Salesforce/blip-vqa-base, blip-vqa-capfilt-large): the
image's ViT states are read by a question encoder (BERT with cross-attention), and the answer
decoder cross-attends to the question's encoding. The vision graph therefore takes the question
too ("encoder" question): one pass per image and question, then the answer is decoded as a
caption is."""

from pathlib import Path

from torch import nn

from ..check import ExportError
from . import decoders
from .common import Family, HFCaptioner


class QuestionEncoder(nn.Module):
    """(pixels, question ids with [CLS] ... [SEP]) -> the question's encoding, as generate computes it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision_model, self.text_encoder = model.vision_model, model.text_encoder

    def forward(self, pixels, text_ids):
        image = self.vision_model(pixel_values=pixels)[0]
        return self.text_encoder(input_ids=text_ids, encoder_hidden_states=image, return_dict=False)


class BlipVqa(Family):
    ARCHITECTURE, MODEL_TYPE = "BlipForQuestionAnswering", "blip"
    SUPPORTS = "BlipForQuestionAnswering"
    INPUT = "encoder"

    def model_class(self):
        from transformers import BlipForQuestionAnswering

        return BlipForQuestionAnswering

    def captioner(self, model) -> HFCaptioner:
        return HFCaptioner(QuestionEncoder(model), nn.Identity(), decoders.BertDecoder(model.text_decoder)).eval()

    def prompt_and_eos(self, src: Path, model, tokenizer, prompt: str | None) -> tuple[list, object]:
        """As its generate: the answer starts from BOS ([DEC]) and ends at [SEP]."""
        if prompt:
            raise ExportError(f"{src}: a VQA model takes its question at run time (--question), not a prompt at export")
        text = model.config.text_config
        return [text.bos_token_id], text.sep_token_id

    def reference_logits(self, model, inputs, ids):
        """transformers' own forward (question encoder, then the answer decoder), no cache."""
        pixels, question = inputs
        return model.text_decoder(input_ids=ids, encoder_hidden_states=QuestionEncoder(model)(pixels, question)[0]).logits

    def generate(self, model, inputs, prompt, eos: list[int], **kwargs):
        pixels, question = inputs
        return model.generate(input_ids=question, pixel_values=pixels, **kwargs)


FAMILY = BlipVqa()
