"""Family: `SmolVLMForConditionalGeneration` and `Idefics3ForConditionalGeneration` (HuggingFaceTB's
SmolVLM / SmolVLM2 256M, 500M, 2.2B; Idefics3-8B: the same layout): a SigLIP vision encoder over tiles
of the photo, a pixel-shuffle connector to the language model's width, and a Llama language model
whose prompt holds the tiles' features in place of the processor's <image> placeholders
("embeddings" memory, export.hf.llm).

The processor splits a photo into tiles of `max_image_size` (after resizing its longest edge to
`size`, then to multiples of the tile) plus the whole photo as one more tile, and lays each tile out
in the prompt as `<fake_token_around_image><row_r_col_c>` and `image_seq_len` <image> tokens (the
global tile: `<global-img>`); its chat template wraps the question. The manifest carries all of it
(preprocess kind "tiles", the `chat` section) and the runtime rebuilds both, equal to the
processor's (PIL backend). Every tile is full-size after the processor's resizes, so the patch mask
is all ones and the vision graph takes whole tiles."""

from pathlib import Path

from torch import nn

from runtime.manifest import Tiles

from .common import pixel_settings
from .llm import ChatCaptioner, ChatFamily


class ImageFeatures(nn.Module):
    """Whole tiles (N, 3, S, S) -> their features in the language model's width (N, tokens, D), as
    get_image_features computes them for tiles without padding (every patch position in order)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vision, self.connector = model.model.vision_model, model.model.connector

    def forward(self, pixels):
        emb = self.vision.embeddings
        x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2) + emb.position_embedding.weight[None]
        x = self.vision.post_layernorm(self.vision.encoder(inputs_embeds=x).last_hidden_state)
        return self.connector(x)


class SmolVLM(ChatFamily):
    ARCHITECTURE, MODEL_TYPE = "SmolVLMForConditionalGeneration", "smolvlm"
    ALSO = ("Idefics3ForConditionalGeneration",)
    SUPPORTS = "SmolVLMForConditionalGeneration and Idefics3ForConditionalGeneration"
    NAME = "SmolVLM"
    DEFAULT_QUESTION = "Can you describe this image?"  # SmolVLM's model card asks this for a description

    def unsupported(self, config: dict) -> str | None:
        text = config.get("text_config", {})
        if text.get("model_type", "llama") != "llama":
            return f"a SmolVLM whose language model is {text.get('model_type')!r} (Llama expected)"
        return None

    def captioner(self, model) -> ChatCaptioner:
        return ChatCaptioner(ImageFeatures(model), model.model.text_model, model.lm_head).eval()

    def preprocess_spec(self, src: Path) -> Tiles:
        """The image processor's tiling in the manifest's terms (preprocess kind "tiles")."""
        ip = self.processor(src).image_processor
        return Tiles(**pixel_settings(src, ip), longest_edge=int(ip.size["longest_edge"]),
                     tile=int(ip.max_image_size["longest_edge"]), split=bool(ip.do_image_splitting))

    def image_layout(self, proc) -> dict:
        return {"layout": "tiles", "tokens": int(proc.image_seq_len), "image": proc.image_token,
                "around": proc.fake_image_token, "global": proc.global_image_token}

    def reference_rows(self, images) -> list:
        return [[image] for image in images]  # SmolVLM's processor takes each row's images as a list

    def reference_logits(self, model, inputs, ids):
        """transformers' own forward over prompt ids that hold one tile's placeholders per row."""
        pixels = inputs[0]
        return model(input_ids=ids, pixel_values=pixels[:, None]).logits


FAMILY = SmolVLM()
