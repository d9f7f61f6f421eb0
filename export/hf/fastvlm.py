"""Family: `FastVlmForConditionalGeneration` (Apple's FastVLM 0.5B, 1.5B, 7B in transformers' native
form): FastViTHD, a convolutional vision tower (timm's fastvit_mci3 through transformers' timm
wrapper) that makes one 1024-pixel image into 256 features, a two-layer projector to the language
model's width, and a Qwen2 language model whose prompt holds the features in place of the
processor's <image> placeholders ("embeddings" memory, export.hf.llm; the LLaVA layout).

The image is one fixed-size picture (the CLIP image processor: shortest edge, then a centre crop),
so preprocessing is the manifest's "fixed" kind; the chat section lays the image out as its
features' count of <image> tokens (layout "repeat"), as LlavaProcessor expands the placeholder."""

from torch import nn

from .llm import ChatCaptioner, ChatFamily


class ImageFeatures(nn.Module):
    """Images (N, 3, S, S) -> their features in the language model's width (N, tokens, D), as
    get_image_features computes them: the tower's last feature map, flattened, projected."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.multi_modal_projector

    def forward(self, pixels):
        return self.projector(self.tower(pixels).last_hidden_state.flatten(2).permute(0, 2, 1))


class FastVlm(ChatFamily):
    ARCHITECTURE, MODEL_TYPE = "FastVlmForConditionalGeneration", "fast_vlm"
    SUPPORTS = "FastVlmForConditionalGeneration"
    NAME = "FastVLM"
    DEFAULT_QUESTION = "Describe the image."

    def unsupported(self, config: dict) -> str | None:
        vision, text = config.get("vision_config", {}), config.get("text_config", {})
        if not str(vision.get("architecture", "")).startswith("fastvit"):
            return f"a FastVLM whose vision tower is {vision.get('architecture')!r} (timm's fastvit expected)"
        if text.get("model_type", "qwen2") != "qwen2":
            return f"a FastVLM whose language model is {text.get('model_type')!r} (Qwen2 expected)"
        return None

    def captioner(self, model) -> ChatCaptioner:
        return ChatCaptioner(ImageFeatures(model), model.model.language_model, model.lm_head).eval()

    def describe(self, model) -> str:
        return f"{type(model).__name__} ({model.config.vision_config.architecture} + {model.config.text_config.model_type})"

    def image_layout(self, proc) -> dict:
        """Its features' count of <image> tokens (counted in what the processor makes of a picture)."""
        from PIL import Image

        ids = proc(text=proc.image_token, images=[Image.new("RGB", (64, 48))], return_tensors="np").input_ids[0]
        return {"layout": "repeat", "tokens": int((ids == proc.image_token_id).sum()), "image": proc.image_token}

    def reference_logits(self, model, inputs, ids):
        """transformers' own forward over prompt ids that hold one image's placeholders per row."""
        return model(input_ids=ids, pixel_values=inputs[0]).logits


FAMILY = FastVlm()
