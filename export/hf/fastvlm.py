"""Family: `FastVlmForConditionalGeneration` (Apple's FastVLM 0.5B, 1.5B, 7B in transformers' native
form): FastViTHD, a convolutional vision tower (timm's fastvit_mci3 through transformers' timm
wrapper) that makes one 1024-pixel image into 256 features, a two-layer projector to the language
model's width, and a Qwen2 language model whose prompt holds the features in place of the
processor's <image> placeholders ("embeddings" memory, export.hf.llm; the LLaVA layout).

The image is one fixed-size picture (the CLIP image processor: shortest edge, then a centre crop),
so preprocessing is the manifest's "fixed" kind; the chat section lays the image out as its
features' count of <image> tokens (layout "repeat"), as LlavaProcessor expands the placeholder."""

from pathlib import Path

import torch
from torch import nn

from ..hf_random import boost_eos, qwen_tokenizer, realistic_llm
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


# The random-weight folder of this family, built offline (tests, benchmarks: python -m export random-hf;
# export.hf_random holds the tools the families share).
# A Qwen2 chat template over LLaVA-style content (the image's placeholder on its own line), as the
# FastVLM checkpoints prompt.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# apple/FastVLM-0.5B: FastViTHD (timm's fastvit_mci3, 3,072 features of a 16 x 16 map at 1,024 pixels)
# and Qwen2-0.5B. "tiny": the same stages, 8 to 128 wide, at 128 pixels (2 x 2 features).
FASTVLM = {"tiny": {"vision": {"layers": (1, 1, 1, 1, 1), "embed_dims": (8, 16, 32, 64, 128)}, "image": 128,
                    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=512), "vocab": None},
           "0.5b": {"vision": {}, "image": 1024,
                    "text": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, max_position_embeddings=32768), "vocab": 151936}}


def build_fastvlm(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0, realistic: bool = False) -> Path:
    """FastVLM (transformers' native classes over timm's fastvit_mci3; LlavaProcessor with CLIP's image
    processor, as the converted checkpoints). "tiny": fastvit_mci3's five stages, narrow, at 128
    pixels; "0.5b": FastVLM-0.5B's whole architecture, vocabulary included. Ends at <|im_end|> or
    <|endoftext|>. `realistic`: a trained checkpoint's magnitudes."""
    from transformers import (CLIPImageProcessor, FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor,
                              TimmWrapperConfig)
    import timm

    s, init = FASTVLM[size], (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = qwen_tokenizer(400 if size == "tiny" else 50000)
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    tower = timm.create_model("fastvit_mci3", pretrained=False, num_classes=0, **s["vision"])
    width = tower.num_features
    vision = TimmWrapperConfig(architecture="fastvit_mci3", hidden_size=width, do_pooling=False,
                               model_args={**s["vision"], "inference_mode": True}, initializer_range=init)
    text = dict(**s["text"], model_type="qwen2", vocab_size=s["vocab"] or len(tok), rope_theta=1000000.0,
                initializer_range=init, tie_word_embeddings=not conditioned, eos_token_id=eos[0],
                pad_token_id=tok.pad_token_id)
    config = FastVlmConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                           image_seq_length=(s["image"] // 64) ** 2)
    model = FastVlmForConditionalGeneration(config).eval()
    if conditioned:
        boost_eos(model, eos[0])
    if realistic:
        realistic_llm(model.model.language_model, model.lm_head, [tok.convert_tokens_to_ids("<|im_start|>")])
    model.generation_config.update(max_new_tokens=16, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": s["image"]},
                                           crop_size={"height": s["image"], "width": s["image"]},
                                           image_mean=[0.0] * 3, image_std=[1.0] * 3),
        tokenizer=tok, patch_size=64, vision_feature_select_strategy="full", chat_template=QWEN_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out
