"""Family: `Qwen2_5_VLForConditionalGeneration` (Qwen2.5-VL 3B, 7B, 32B, 72B): a ViT over 14-pixel
patches of the photo at its own aspect ratio, windowed attention (full attention in a few blocks),
2x2 patches merged into one feature in the language model's width, and a Qwen2 language model
whose prompt holds the features in place of the processor's <|image_pad|> tokens ("embeddings"
memory, export.hf.llm) at 3-D rotary positions (M-RoPE: an image token at (t, row, col)).

The graphs take what the runtime can compute from the manifest, so that nothing but pixels and
a grid crosses the contract:
- vision: one photo resized by smart_resize (sides multiples of 28 between min and max pixels) as
  pixels (N, 3, H, W). The processor's two identical temporal frames through the Conv3d are one
  Conv2d with the kernel's temporal halves summed; its patch order (2x2 merge blocks) is a reshape
  in the graph; its window attention is a mask of window ids (attention within a window is the
  same whatever the order of its tokens, so the processor's reordering of patches into windows
  and back is left out). Features come out in the prompt's order, row by row of merged patches.
- decoder: the shared LLM step; its rotary positions are M-RoPE's, computed in the step from the
  1-D positions and `image_grid` (N, 3): the row's first image token's position and the merged
  grid's rows and columns (export.hf.llm.mrope_positions), which the runtime builds from the
  prompt (runtime.search.image_grid)."""

from pathlib import Path

import torch
from torch import nn

from runtime.manifest import Grid

from ..hf_random import MASSIVE, boost_eos, byte_level_bpe, realistic_llm
from ..kv import attend, rotary
from .common import pixel_settings
from .llm import ChatCaptioner, ChatFamily, norm


class ImageFeatures(nn.Module):
    """Photos (N, 3, H, W) of one size, H and W multiples of 28 -> features (N, H/28 * W/28, D) in
    the language model's width, row by row of merged patches, as get_image_features computes them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = v = model.model.visual
        c = v.config
        self.patch, self.merge, self.heads = c.patch_size, c.spatial_merge_size, c.num_heads
        self.window = c.window_size // c.spatial_merge_size // c.patch_size  # merged patches per window side
        self.full = set(c.fullatt_block_indexes)
        weight = v.patch_embed.proj.weight  # (D, 3, frames, p, p): both frames are the same picture
        self.embed = nn.Conv2d(3, weight.shape[0], self.patch, stride=self.patch, bias=False, dtype=weight.dtype)
        with torch.no_grad():
            self.embed.weight.copy_(weight.sum(2))

    def blocks(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per patch in merge-block order: (its row, its column, its window's id)."""
        m, w = self.merge, self.window
        r = (torch.arange(rows)[:, None, None, None] * m + torch.arange(m)[None, None, :, None]).expand(rows, cols, m, m)
        c = (torch.arange(cols)[None, :, None, None] * m + torch.arange(m)[None, None, None, :]).expand(rows, cols, m, m)
        window = (r // (m * w)) * (cols // w + 1) + c // (m * w)
        return r.reshape(-1), c.reshape(-1), window.reshape(-1)

    def forward(self, pixels):
        n, v, m = pixels.shape[0], self.visual, self.merge
        x = self.embed(pixels)  # (N, D, gh, gw)
        width, rows, cols = x.shape[1], x.shape[2] // m, x.shape[3] // m
        x = x.reshape(n, width, rows, m, cols, m).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, width)
        r, c, window = self.blocks(rows, cols)
        inv_freq = v.rotary_pos_emb.inv_freq
        angles = torch.cat([r[:, None].float() * inv_freq, c[:, None].float() * inv_freq], dim=-1)
        cos, sin = angles.cos()[None].expand(n, -1, -1), angles.sin()[None].expand(n, -1, -1)
        same_window = (window[:, None] == window[None, :])[None, None]
        head_dim = width // self.heads
        for i, block in enumerate(v.blocks):
            qkv = block.attn.qkv(norm(block.norm1, x)).reshape(n, -1, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k = rotary(qkv[0], cos, sin), rotary(qkv[1], cos, sin)
            a = attend(q, k, qkv[2], block.attn.scaling, None if i in self.full else same_window)
            x = x + block.attn.proj(a.transpose(1, 2).reshape(n, -1, width))
            x = x + block.mlp(norm(block.norm2, x))
        merger = v.merger
        return merger.mlp(norm(merger.ln_q, x).reshape(n, rows * cols, -1))


def patches(pixels: torch.Tensor, patch: int = 14, merge: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (N, 3, H, W) as the processor gives them to the model: every image's patches in
    merge-block order, each as two identical frames, and the images' (1, H/14, W/14) grids."""
    n, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], 2, patch, patch)
    return x.reshape(n * gh * gw, -1), torch.tensor([[1, gh, gw]] * n)


class Qwen2_5_VL(ChatFamily):
    ARCHITECTURE, MODEL_TYPE = "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"
    SUPPORTS = "Qwen2_5_VLForConditionalGeneration"
    NAME, ROPE = "Qwen2.5-VL", "mrope"
    DEFAULT_QUESTION = "Describe this image."

    def unsupported(self, config: dict) -> str | None:
        vision = config.get("vision_config", {})
        if vision.get("temporal_patch_size", 2) != 2 or vision.get("spatial_merge_size", 2) != 2:
            return "a Qwen2.5-VL whose patches are not 2 frames deep or merged 2x2"
        return None

    def captioner(self, model) -> ChatCaptioner:
        return ChatCaptioner(ImageFeatures(model), model.model.language_model, model.lm_head).eval()

    def preprocess_spec(self, src: Path) -> Grid:
        """The image processor's smart_resize in the manifest's terms (preprocess kind "grid")."""
        ip = self.processor(src).image_processor
        return Grid(**pixel_settings(src, ip), factor=int(ip.patch_size * ip.merge_size),
                    min_pixels=int(ip.size["shortest_edge"]), max_pixels=int(ip.size["longest_edge"]))

    def image_layout(self, proc) -> dict:
        """One <|image_pad|> per feature (layout "grid": merged rows x cols of this photo)."""
        return {"layout": "grid", "image": proc.image_token}

    def reference_logits(self, model, inputs, ids):
        """transformers' own forward over prompt ids that hold one image's placeholders per row."""
        flat, grid = patches(inputs[0])
        types = (ids == model.config.image_token_id).int()
        return model(input_ids=ids, pixel_values=flat, image_grid_thw=grid, mm_token_type_ids=types).logits


FAMILY = Qwen2_5_VL()


# The random-weight folder of this family, built offline (tests, benchmarks: python -m export random-hf;
# export.hf_random holds the tools the families share).
# Qwen2.5-VL's chat template (Qwen/Qwen2.5-VL-3B-Instruct's chat_template.json): each image as
# <|vision_start|><|image_pad|><|vision_end|>, the processor then repeats <|image_pad|> once per feature.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


# Qwen/Qwen2.5-VL-3B-Instruct: a 32-block ViT (1,280 wide, windows of 112 pixels, full attention in
# blocks 7, 15, 23, 31) whose 2x2 patch merger feeds Qwen2.5-3B (36 layers, 2,048 wide, 16 heads,
# 2 for keys and values, M-RoPE sections 16/24/24). "3b": those widths, heads, windows, vocabulary
# and rotary sections with 8 vision blocks (full attention in 3 and 7) and 6 language-model layers,
# so that export and its checks fit this 24 GiB machine; "tiny": the same structure, narrow, with
# at most 64 image tokens.
QWEN2_5_VL = {"tiny": {"vision": dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1, 3]),
                       "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=1024),
                       "mrope": [2, 3, 3], "pixels": (56 * 56, 28 * 28 * 64), "vocab": None},
              "3b": {"vision": dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                    fullatt_block_indexes=[3, 7]),
                     "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=6, num_attention_heads=16,
                                  num_key_value_heads=2, max_position_embeddings=128000),
                     "mrope": [16, 24, 24], "pixels": (56 * 56, 28 * 28 * 1280), "vocab": 151936}}


def build_qwen2_5_vl(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0,
                     realistic: bool = False) -> Path:
    """Qwen2.5-VL (transformers' native classes, its processor and chat template): a ViT over 14-pixel
    patches of the photo at its own aspect ratio (smart_resize between min and max pixels), windowed
    attention, a 2x2 merger; a Qwen2 language model with 3-D rotary positions (M-RoPE). Sizes: see
    QWEN2_5_VL. Ends at <|im_end|> or <|endoftext|>. `realistic`: a trained checkpoint's magnitudes."""
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor)

    s, init = QWEN2_5_VL[size], (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = byte_level_bpe(400 if size == "tiny" else 50000,
                         ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *QWEN_VISION_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", *QWEN_VISION_TOKENS)}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text = dict(**s["text"], vocab_size=s["vocab"] or len(tok), initializer_range=init,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": s["mrope"]},
                bos_token_id=None, eos_token_id=eos[0], pad_token_id=ids["<|endoftext|>"])
    vision = dict(**s["vision"], out_hidden_size=s["text"]["hidden_size"], window_size=112, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=init)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=not conditioned)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    if conditioned:
        boost_eos(model, eos[0])
    if realistic:
        realistic_llm(model.model.language_model, model.lm_head, [tok.convert_tokens_to_ids("<|im_start|>")])
        with torch.no_grad():  # image features carry the outlier dimensions as token embeddings do (else
            # their RMSNorm, with those dimensions' gain at zero, divides by almost nothing)
            model.model.visual.merger.mlp[2].bias[list(MASSIVE)] += torch.tensor(list(MASSIVE.values()))
    model.generation_config.update(max_new_tokens=16, eos_token_id=eos, pad_token_id=ids["<|endoftext|>"],
                                   bos_token_id=None)
    model.save_pretrained(out)
    low, high = s["pixels"]
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=low, max_pixels=high),
                                    tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out
