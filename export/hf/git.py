"""Family: `GitForCausalLM` (microsoft/git-base, git-base-coco, git-base-vqav2, git-large-*): a
CLIP ViT whose projected patch tokens are a prefix of the text decoder's self-attention
("prefix" memory: decoders.GitDecoder). Any GIT takes a question as prompt tokens after [CLS],
as transformers' VQA example feeds one; the VQA checkpoints are trained to answer it."""

from pathlib import Path

from torch import nn

from ..check import ExportError
from . import decoders
from .common import Family, HFCaptioner


class ImageTokens(nn.Module):
    """The image encoder's last hidden state (CLIP's post-LayerNorm included)."""

    def __init__(self, git: nn.Module):
        super().__init__()
        self.image_encoder = git.image_encoder

    def forward(self, pixels):
        return (self.image_encoder(pixels).last_hidden_state,)


class Git(Family):
    ARCHITECTURE, MODEL_TYPE = "GitForCausalLM", "git"
    SUPPORTS = "GitForCausalLM (image checkpoints)"
    MEMORY, INPUT = "prefix", "prompt"

    def unsupported(self, config: dict) -> str | None:
        if config.get("num_image_with_embedding"):
            return "a video GIT (num_image_with_embedding: several frames per input)"
        return None

    def model_class(self):
        from transformers import GitForCausalLM

        return GitForCausalLM

    def captioner(self, model) -> HFCaptioner:
        return HFCaptioner(ImageTokens(model.git), model.git.visual_projection, decoders.GitDecoder(model)).eval()

    def text_config(self, model):
        return model.config

    def prompt_and_eos(self, src: Path, model, tokenizer, prompt: str | None) -> tuple[list, object]:
        """[CLS] (the config's BOS), as generate starts without input ids; a prompt's tokens follow it."""
        if prompt:
            raise ExportError(f"{src}: a GIT takes its text as a question at run time (--question), not at export")
        return [model.config.bos_token_id], model.generation_config.eos_token_id or model.config.eos_token_id

    def reference_logits(self, model, inputs, ids):
        """transformers' own forward over [image tokens; text], no cache: the text positions' logits."""
        logits = model(input_ids=ids, pixel_values=inputs[0]).logits
        return logits[:, -ids.shape[1] :]

    def generate(self, model, inputs, prompt, eos_id: int, **kwargs):
        return model.generate(pixel_values=inputs[0], input_ids=prompt, eos_token_id=eos_id, **kwargs)


FAMILY = Git()
