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

import torch
from torch import nn

from runtime.manifest import Tiles

from ..hf_random import boost_eos, byte_level_bpe, corpus, realistic_llm
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


# The random-weight folder of this family, built offline (tests, benchmarks: python -m export random-hf;
# export.hf_random holds the tools the families share).
# SmolVLM's added tokens: the chat turns, and how an image is laid out in the prompt.
SMOLVLM_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>",
                  *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)), "<end_of_utterance>"]


# HuggingFaceTB/SmolVLM-256M-Instruct and -500M-Instruct: SigLIP-base over 512-pixel tiles (64 features
# each after the 4x4 pixel shuffle), SmolLM2-135M / -360M as the language model.
SMOLVLM = {"tiny": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8),
                    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=512),
                    "scale_factor": 2, "tile": 32, "vocab": None},
           # SmolVLM-256M's language-model widths (576, 9 heads over 3 KV heads, 1536) at 3 layers, a 2-layer
           # vision tower over 64-pixel tiles, photos resized to 128 (at most 2x2 tiles): small enough to train
           # here (export.distill), for a weight-only gate on trained weights.
           "small": {"vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=64, patch_size=8),
                     "text": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9,
                                  num_key_value_heads=3, max_position_embeddings=2048),
                     "scale_factor": 2, "tile": 64, "longest": 128, "vocab": None},
           "256m": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                   image_size=512, patch_size=16),
                    "text": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                 num_key_value_heads=3, max_position_embeddings=8192),
                    "scale_factor": 4, "tile": 512, "vocab": 49280},
           "500m": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                   image_size=512, patch_size=16),
                    "text": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                                 num_key_value_heads=5, max_position_embeddings=8192),
                    "scale_factor": 4, "tile": 512, "vocab": 49280}}


def smolvlm_tokenizer(vocab: int):
    """SmolLM2's scheme: byte-level BPE, no BOS added; SmolVLM's chat and image tokens."""
    from transformers import PreTrainedTokenizerFast

    # Paragraphs teach it "\n\n" as one token, as SmolLM2's has it: the processor writes it before the
    # global image, and llama.cpp's SmolVLM support looks that token up (a peer run needs it).
    tok = byte_level_bpe(vocab, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [f"{line}.\n\n" for line in corpus()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": SMOLVLM_TOKENS})
    return fast


def build_smolvlm(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0, realistic: bool = False) -> Path:
    """SmolVLM (transformers' native classes, the real processor and chat template). "tiny": 32-pixel
    tiles, 4 features each, a 2-layer language model with grouped-query attention (2 heads of 16 values
    over 1 for keys and values); "small": see SMOLVLM; "256m" and "500m": those checkpoints' whole architectures, vocabulary included (the
    tokenizer trained here has fewer tokens: ids beyond it decode to nothing). Generation ends at
    <end_of_utterance> or <|im_end|> (two EOS ids). `realistic`: a trained checkpoint's magnitudes."""
    from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor,
                              SmolVLMVideoProcessor)
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    s, init = SMOLVLM[size], (0.3 if conditioned else 0.02)
    torch.manual_seed(seed)
    tok = smolvlm_tokenizer(400 if size == "tiny" else 50000)
    eos = [tok.convert_tokens_to_ids("<end_of_utterance>"), tok.convert_tokens_to_ids("<|im_end|>")]
    text = dict(**s["text"], vocab_size=s["vocab"] or len(tok), rope_theta=100000.0, initializer_range=init,
                tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=eos[0], pad_token_id=tok.pad_token_id)
    config = SmolVLMConfig(vision_config={**s["vision"], "initializer_range": init}, text_config=text,
                           scale_factor=s["scale_factor"], image_token_id=tok.convert_tokens_to_ids("<image>"),
                           tie_word_embeddings=False)
    model = SmolVLMForConditionalGeneration(config).eval()
    if conditioned:
        boost_eos(model, eos[0])
    if realistic:
        realistic_llm(model.model.text_model, model.lm_head, [tok.convert_tokens_to_ids("<|im_start|>")])
    model.generation_config.update(max_new_tokens=16, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id)
    model.save_pretrained(out)
    tile = s["tile"]
    tokens = (s["vision"]["image_size"] // s["vision"]["patch_size"]) ** 2 // s["scale_factor"] ** 2
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=True, max_image_size={"longest_edge": tile},
                                              size={"longest_edge": s.get("longest", 4 * tile)}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tok, video_processor=SmolVLMVideoProcessor(), image_seq_len=tokens, chat_template=DEFAULT_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out
