"""The decoder step of a decoder-only language model (the Llama and Qwen2 layouts: pre-norm RMSNorm
layers, rotary positions, grouped-query attention, a gated MLP) over transformers' own submodules
(same weights, nothing copied), with the cache as per-layer buffers written in place (export.kv).
At batch 1 such a step costs its nodes more than its weights (SmolVLM-256M at 4 bits reads 14 MB
a step), so it is written in as few as the model allows: per layer one q/k/v product, one
attention node that rotates q and k, writes the cache and reads it (GroupQueryAttention), one
residual-sum-and-norm node after each half, and the MLP's three products.

Image features enter the prompt as the processor lays it out: the k-th image placeholder of a
sequence fed from its start takes row k of `image_features` (`feature_index` says which token takes
which, -1 for none; runtime.search.feature_index), the way transformers' masked_scatter puts them in
place of the placeholders' embeddings. The features stay bound every step; only a prompt's
placeholders ever read them. Shared by the families whose language model this is.

Qwen2-VL's 3-D rotary positions (M-RoPE) are computed in the step from the 1-D positions and the
image's place in the prompt (`image_grid`, mrope_positions): the runtime keeps 1-D positions."""

from pathlib import Path

import torch
from torch import nn

from ..kv import add_rms_norm, angles, grouped_attention, pick, rms_norm, written
from ..check import ExportError
from .common import Family


def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm module's computation, as export.kv.rms_norm (one ONNX node)."""
    return rms_norm(x, module.weight, module.variance_epsilon)


def add_norm(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the RMSNorm module's computation on x + delta, x + delta), as export.kv.add_rms_norm (one ONNX node)."""
    return add_rms_norm(x, delta, module.weight, module.variance_epsilon)


def fused(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing several that read the same input, their outputs side by side: a decode
    step's matrix products are each small (a 576-wide model's q, k and v: 0.7 MB at 4 bits), and
    ONNX Runtime's cost per product is then more its call than its bytes. Each output is the same
    dot product as before."""
    out = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears),
                    bias=linears[0].bias is not None, dtype=linears[0].weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if out.bias is not None:
            out.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return out


def with_features(embeds: torch.Tensor, image_features: torch.Tensor, feature_index: torch.Tensor) -> torch.Tensor:
    """(N, T, D) token embeddings with row feature_index[n, t] of image_features (N, K, D) where it is >= 0."""
    rows = torch.gather(image_features, 1, feature_index.clamp(min=0)[..., None].expand(-1, -1, embeds.shape[-1]))
    return torch.where(feature_index[..., None] >= 0, rows.to(embeds.dtype), embeds)


def mrope_positions(position_ids: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
    """(3, N, T) temporal, row and column positions, as Qwen2-VL's get_rope_index assigns them, of
    tokens at 1-D positions (N, T) of rows whose image grid (N, 3) is (s, rows, cols): its first
    image token at s and rows x cols image tokens. Before the image all three are the 1-D position;
    image token k is at (s, s + k // cols, s + k % cols); text after it goes on from
    s + max(rows, cols), one per token."""
    s, rows, cols = (x[:, None] for x in image_grid.unbind(-1))
    k, tokens = position_ids - s, rows * cols
    inside = (k >= 0) & (k < tokens)
    text = torch.where(k >= tokens, position_ids - tokens + torch.maximum(rows, cols), position_ids)
    cols = cols.clamp(min=1)
    return torch.stack([torch.where(inside, s, text), torch.where(inside, s + k // cols, text),
                        torch.where(inside, s + k % cols, text)])


class CausalLM(nn.Module):
    """`model` is the language model (embed_tokens, layers, norm, rotary_emb), `lm_head` its output head."""

    def __init__(self, model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.model, self.lm_head = model, lm_head
        attention = model.layers[0].self_attn
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        if self.head_dim % 16:  # every released checkpoint's are 64 or 128 wide
            raise ExportError(f"heads of {self.head_dim} values: ONNX Runtime's GroupQueryAttention rotates heads "
                              "whose width is a multiple of 16")
        self.qkv = nn.ModuleList(fused(a.q_proj, a.k_proj, a.v_proj) for a in (layer.self_attn for layer in model.layers))
        self.gate_up = nn.ModuleList(fused(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in model.layers)

    def forward(self, input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values, image_features,
                feature_index, image_grid=None):
        m = self.model
        x = with_features(m.embed_tokens(input_ids), image_features, feature_index)
        positions = position_ids if image_grid is None else mrope_positions(position_ids, image_grid)
        (cos, sin), w = m.rotary_emb(x, positions), written(cache_lengths, input_ids.shape[1])
        half = self.head_dim // 2  # the halves of transformers' angles are the same
        rope = angles(cos[..., :half], sin[..., :half], w)
        keys, values, h = [], [], norm(m.layers[0].input_layernorm, x)
        for i, layer in enumerate(m.layers):  # each residual sum and the norm after it: one node (add_norm)
            a, k, v = grouped_attention(self.qkv[i](h), past_keys[i], past_values[i], *w, *rope, self.heads, self.kv_heads,
                                        self.scaling)
            h, x = add_norm(layer.post_attention_layernorm, x, layer.self_attn.o_proj(a))
            gate, up = self.gate_up[i](h).chunk(2, dim=-1)
            after = m.layers[i + 1].input_layernorm if i + 1 < len(m.layers) else m.norm
            h, x = add_norm(after, x, layer.mlp.down_proj(layer.mlp.act_fn(gate) * up))
            keys.append(k)
            values.append(v)
        return self.lm_head(pick(h, logit_index)), keys, values


class ChatCaptioner(nn.Module):
    """A chat family's two graphs: vision(pixels) -> ([features],) through the family's `features`
    module; step(...) is CausalLM over its language model and output head."""

    def __init__(self, features: nn.Module, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.features, self.lm = features, CausalLM(language_model, lm_head)

    def memory(self, pixels):
        return self.features(pixels)

    def vision(self, pixels):
        return ([self.features(pixels)],)

    def step(self, *feeds):
        return self.lm(*feeds)


class ChatFamily(Family):
    """An LLM-based family: image features in place of the prompt's image tokens ("embeddings"
    memory), a chat template, transformers' processor as the reference. NAME is the processor's
    family name in messages; a family says how an image is laid out in the prompt (image_layout)."""

    MEMORY, INPUT, ATTENTION = "embeddings", "chat", "grouped"  # CausalLM's attention: export.kv.grouped_attention
    NAME = ""
    DEFAULT_QUESTION = ""  # what the package asks when a request asks nothing (its model card's)

    def model_class(self):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def processor(self, src: Path):
        """transformers' processor with its PIL-backend image processor (the runtime resizes with Pillow too)."""
        from transformers import AutoImageProcessor, AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(src, local_files_only=True)
            proc.image_processor = AutoImageProcessor.from_pretrained(src, local_files_only=True, backend="pil")
        except (OSError, ValueError, ImportError) as e:
            raise ExportError(f"{src}: no usable {self.NAME} processor ({str(e).splitlines()[0]})") from None
        return proc

    def image_layout(self, proc) -> dict:
        """How one image is laid out in the prompt: the manifest's chat.image (runtime.prompting.image_layout)."""
        raise NotImplementedError

    def chat(self, src: Path) -> dict:
        """The manifest's `chat`: the processor's chat template, the question asked when none is, and
        how an image is laid out in the prompt (runtime.prompting)."""
        proc = self.processor(src)
        if not proc.chat_template:
            raise ExportError(f"{src}: the processor has no chat template")
        return {"template": proc.chat_template, "question": self.DEFAULT_QUESTION, "image": self.image_layout(proc)}

    def prompt_and_eos(self, src: Path, model, tokenizer, prompt: str | None) -> tuple[list, object]:
        """A chat family asks its question at run time: no prompt at export, the checkpoint's ends."""
        if prompt:
            raise ExportError(f"{src}: a {self.NAME} takes its question at run time (--question), not a prompt at export")
        return [], model.generation_config.eos_token_id

    def reference_rows(self, images) -> list:
        """The images as the processor takes them, one per row."""
        return list(images)

    def reference_inputs(self, src: Path, images, question: str):
        """transformers' processor on these images (one per row) asked `question` in its chat
        template, as the model cards call it."""
        proc = self.processor(src)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        rows = self.reference_rows(images)
        return proc(text=[text] * len(rows), images=rows, return_tensors="pt")
