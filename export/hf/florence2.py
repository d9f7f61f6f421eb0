"""Family: `Florence2ForConditionalGeneration` (transformers' native Florence-2: florence-community/
Florence-2-base and -large, and Microsoft's checkpoints once converted): DaViT image features
and the task prompt's embeddings go through the BART encoder together; the BART decoder writes
text with <loc_N> box tokens. The vision graph therefore takes the prompt's ids (like BLIP VQA's
question), computed once per image and task; the decoder step is BART's. The tasks, their
prompts and how each answer is parsed come from the folder's processor into the manifest."""

import copy
from pathlib import Path

import torch
from torch import nn

from ..check import ExportError
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
