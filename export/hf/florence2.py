"""Family: `Florence2ForConditionalGeneration` (transformers' native Florence-2: florence-community/
Florence-2-base and -large, and Microsoft's checkpoints once converted): DaViT image features
and the task prompt's embeddings go through the BART encoder together; the BART decoder writes
text with <loc_N> box tokens. The vision graph therefore takes the prompt's ids (like BLIP VQA's
question), computed once per image and task; the decoder step is BART's. The tasks, their
prompts and how each answer is parsed come from the folder's processor into the manifest."""

import copy
from pathlib import Path

import torch
from tokenizers import processors
from torch import nn

from ..check import ExportError
from ..hf_random import byte_level_bpe
from ..kv import attend, cached_attention, pick, window
from ..model import merge_heads, split_heads
from .common import Family, HFCaptioner


class BartDecoder(nn.Module):
    """BART's decoder (post-LN: self-attention, cross-attention, MLP, each followed by its
    LayerNorm; learned positions offset by 2; scaled token embeddings) and an LM head, as a
    decoder step over per-layer caches. Florence-2's text decoder."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.decoder, self.lm_head, self.n_head = decoder, lm_head, decoder.layers[0].self_attn.num_heads

    def memory_kv(self, memory: torch.Tensor) -> tuple[list, list]:
        layers = self.decoder.layers
        return ([split_heads(layer.encoder_attn.k_proj(memory), self.n_head) for layer in layers],
                [split_heads(layer.encoder_attn.v_proj(memory), self.n_head) for layer in layers])

    def forward(self, input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values, cross_keys,
                cross_values):
        d = self.decoder
        x = d.layernorm_embedding(d.embed_tokens(input_ids) + d.embed_positions.weight[position_ids + d.embed_positions.offset])
        keys, values, w = [], [], window(cache_lengths, input_ids.shape[1])
        for i, layer in enumerate(d.layers):
            sa, ca = layer.self_attn, layer.encoder_attn
            q, k, v = (split_heads(f(x), self.n_head) for f in (sa.q_proj, sa.k_proj, sa.v_proj))
            a, k, v = cached_attention(q, k, v, past_keys[i], past_values[i], w, sa.scaling)
            x = layer.self_attn_layer_norm(x + sa.out_proj(merge_heads(a)))
            q = split_heads(ca.q_proj(x), self.n_head)
            x = layer.encoder_attn_layer_norm(x + ca.out_proj(merge_heads(
                attend(q, cross_keys[i], cross_values[i], ca.scaling))))
            x = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
            keys.append(k)
            values.append(v)
        return self.lm_head(pick(x, logit_index)), keys, values


class ChannelAttention(nn.Module):
    """DaViT's grouped channel attention (transformers' Florence2VisionChannelAttention, same
    weights) with tokens kept the outer axis: softmax(Q^T K / sqrt N) over all channels with the
    pairs of different groups masked out is the block-diagonal of the per-group attentions, and
    V A^T is each group's output in place. The module's own formulation permutes Q, K, V and the
    output to channel-major order: ONNX Runtime ran those transposes as copies, a fifth of the
    vision graph at 768 px, against a few GFLOP more of MatMul here."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn, size = attn, attn.dim // attn.groups
        self.register_buffer("same_group", torch.block_diag(*[torch.ones(size, size, dtype=torch.bool)] * attn.groups),
                             persistent=False)

    def forward(self, x):
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
        scores = torch.matmul(q.transpose(-1, -2), k) * x.shape[1] ** -0.5
        weights = scores.masked_fill(~self.same_group, float("-inf")).softmax(-1)
        return self.attn.proj(torch.matmul(v, weights.transpose(-1, -2)))


class ImageAndPrompt(nn.Module):
    """(pixels, prompt ids with <s> ... </s>) -> the BART encoder's states over [image features;
    prompt embeddings], as transformers builds them for `generate` (the processor's <image>
    placeholders precede the prompt and are replaced by the image features). `for_export`
    computes DaViT's channel attention as ChannelAttention does, in a copy of the vision tower's
    modules; transformers' own modules stay as they are for the reference."""

    def __init__(self, model: nn.Module, for_export: bool = False):
        super().__init__()
        self.model = model.model
        self.vision_tower = self.model.vision_tower
        if for_export:  # a copy of the modules that shares the weights
            tensors = [*self.vision_tower.parameters(), *self.vision_tower.buffers()]
            self.vision_tower = copy.deepcopy(self.vision_tower, {id(t): t for t in tensors})
            for block in self.vision_tower.modules():
                if hasattr(block, "channel_attn"):
                    block.channel_attn = ChannelAttention(block.channel_attn)

    def forward(self, pixels, text_ids):
        image = self.model.multi_modal_projector(self.vision_tower(pixels).last_hidden_state)
        text = self.model.get_input_embeddings()(text_ids)
        return self.model.language_model.encoder(inputs_embeds=torch.cat([image, text], dim=1), return_dict=False)


class Florence2(Family):
    ARCHITECTURE, MODEL_TYPE = "Florence2ForConditionalGeneration", "florence2"
    SUPPORTS = "Florence2ForConditionalGeneration (transformers' native Florence-2)"
    INPUT = "task"

    def unsupported(self, config: dict) -> str | None:
        if config.get("auto_map"):
            return ("a remote-code Florence-2 checkpoint (auto_map in config.json), whose code is never run here; "
                    "convert it to transformers' native Florence2ForConditionalGeneration first "
                    "(transformers' convert_florence2_original_pytorch_to_hf.py)")
        return None

    def model_class(self):
        from transformers import Florence2ForConditionalGeneration

        return Florence2ForConditionalGeneration

    def captioner(self, model) -> HFCaptioner:
        lm = model.model.language_model
        return HFCaptioner(ImageAndPrompt(model, for_export=True), nn.Identity(), BartDecoder(lm.decoder, model.lm_head)).eval()

    def prompt_and_eos(self, src: Path, model, tokenizer, prompt: str | None) -> tuple[list, object]:
        if prompt:
            raise ExportError(f"{src}: Florence-2 takes its task at run time (--task), not a prompt at export")
        gc = model.generation_config
        start = gc.decoder_start_token_id if gc.decoder_start_token_id is not None else model.config.text_config.decoder_start_token_id
        return [start], gc.eos_token_id if gc.eos_token_id is not None else model.config.text_config.eos_token_id

    def tasks(self, src: Path) -> dict:
        """The manifest's `tasks`: every task the processor knows, its prompt ("{input}" where the
        task takes text) and how its answer is parsed, exactly as Florence2Processor has them."""
        from transformers import Florence2Processor

        try:
            processor = Florence2Processor.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ExportError(f"{src}: no usable Florence-2 processor ({str(e).splitlines()[0]})") from None
        if not processor.post_processor_config:
            raise ExportError(f"{src}: the processor has no post_processor_config; answers could not be parsed")
        prompts = {**processor.task_prompts_without_inputs, **processor.task_prompts_with_input}
        return {"default": "<CAPTION>",
                "prompts": {task: {"prompt": prompt, "parse": processor.tasks_answer_post_processing_type.get(task, "pure_text")}
                            for task, prompt in prompts.items()},
                "parse": processor.post_processor_config}

    def reference_logits(self, model, inputs, ids):
        """transformers' own forward, no cache: the processor's layout of input ids (image
        placeholders, then the prompt) and the decoder's teacher-forced logits."""
        pixels, text = inputs
        placeholders = torch.full((len(text), self.image_tokens(model, pixels)), model.config.image_token_id)
        return model(input_ids=torch.cat([placeholders, text], dim=1), pixel_values=pixels, decoder_input_ids=ids).logits

    def image_tokens(self, model, pixels) -> int:
        """How many image features DaViT's strided convolutions leave for these pixels, plus the pooled
        one: the processor's <image> placeholders. Worked out from the config: running the tower to
        count them would add a whole vision pass to every reference call."""
        vision, (height, width) = model.config.vision_config, pixels.shape[-2:]
        for kernel, stride, padding in zip(vision.patch_size, vision.patch_stride, vision.patch_padding):
            height, width = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
        return height * width + 1

    def generate(self, model, inputs, prompt, eos: list[int], **kwargs):
        pixels, text = inputs
        placeholders = torch.full((len(text), self.image_tokens(model, pixels)), model.config.image_token_id)
        return model.generate(input_ids=torch.cat([placeholders, text], dim=1), pixel_values=pixels,
                              decoder_input_ids=prompt, **kwargs)


FAMILY = Florence2()


# The random-weight folder of this family, built offline (tests, benchmarks: python -m export random-hf;
# export.hf_random holds the tools the families share).
FLORENCE2_BASE_VOCAB = 51289  # florence-community/Florence-2-base's config.json


# Florence-2's added tokens: boxes and polygons are written with these (the task prompts are text).
FLORENCE_TOKENS = ["<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>",
                   *(f"<loc_{i}>" for i in range(1000))]


# The processor's parse settings, as Microsoft's checkpoints ship them.
FLORENCE_PARSE = {"ocr": {"PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
                          "AREA_THRESHOLD": 0.0},
                  "phrase_grounding": {"FILTER_BY_BLACK_LIST": True}, "pure_text": {}, "description_with_bboxes": {},
                  "description_with_polygons": {}, "polygons": {}, "bboxes": {}, "description_with_bboxes_or_polygons": {}}


def florence_tokenizer(vocab: int):
    """BART's byte-level BPE (<s> 0, <pad> 1, </s> 2, <unk> 3; "<s> text </s>") plus Florence-2's
    <image> placeholder, box, polygon and OCR tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(vocab, ["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens(["<image>", *FLORENCE_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": FLORENCE_TOKENS})  # what the post-processor skips
    return fast


def build_florence2(out: Path, size: str = "tiny", conditioned: bool = True, seed: int = 0, window: int = 2) -> Path:
    """Florence-2 (transformers' native classes). "tiny": DaViT with four stages at 96 px, windows of
    `window` (several windows per stage, padded where they do not divide), BART 2+2 layers;
    "base": Florence-2-base's architecture (DaViT-base, BART 6+6 layers, 768 px). Generation as
    the checkpoints ship it: beam 3, no 3-gram repeated, </s> then a forced <s>."""
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig)

    init = 0.3 if conditioned else 0.02
    torch.manual_seed(seed)
    tok = florence_tokenizer(400 if size == "tiny" else 50265)
    if size == "tiny":
        image, vision = 96, Florence2VisionConfig(depths=[1, 1, 2, 1], embed_dim=[16, 32, 32, 32], num_heads=[1, 2, 2, 2],
                                                  num_groups=[1, 2, 2, 2], window_size=window, projection_dim=32,
                                                  drop_path_rate=0.0, initializer_range=init)
        text = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)
    else:
        image, vision = 768, Florence2VisionConfig(depths=[1, 1, 9, 1], embed_dim=[128, 256, 512, 1024],
                                                   num_heads=[4, 8, 16, 32], num_groups=[4, 8, 16, 32], window_size=12,
                                                   projection_dim=768, drop_path_rate=0.0)
        text = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                    decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)
    # "base" has the real checkpoint's vocabulary (51,289: an output head of 158 MB, ~4 ms of every
    # step); its tokenizer, trained here on little text, has fewer tokens: ids beyond it decode to nothing.
    text = BartConfig(vocab_size=len(tok) if size == "tiny" else FLORENCE2_BASE_VOCAB, **text, init_std=init, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_bos_token_id=0, forced_eos_token_id=2,
                      tie_word_embeddings=not conditioned)
    config = Florence2Config(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=tok.image_token_id,
                             tie_word_embeddings=not conditioned)
    model = Florence2ForConditionalGeneration(config).eval()
    if conditioned:  # words between the boxes (untouched, random weights write <loc_N> tokens mostly)
        with torch.no_grad():
            model.lm_head.weight[tok.convert_tokens_to_ids("<loc_0>"):] *= 0.9
    model.generation_config.update(num_beams=3, no_repeat_ngram_size=3, early_stopping=False, forced_bos_token_id=0,
                                   max_length=20 if size == "tiny" else 1025)
    model.save_pretrained(out)
    with torch.inference_mode():
        tokens = model.model.get_image_features(torch.zeros(1, 3, image, image)).pooler_output.shape[1]
    processor = Florence2Processor(
        image_processor=CLIPImageProcessor(size={"height": image, "width": image}, do_center_crop=False,
                                           image_seq_length=tokens, image_mean=[0.485, 0.456, 0.406],
                                           image_std=[0.229, 0.224, 0.225]),
        tokenizer=tok, post_processor_config=FLORENCE_PARSE)
    processor.save_pretrained(out)
    return out
