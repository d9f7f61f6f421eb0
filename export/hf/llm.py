"""The decoder step of a decoder-only language model (the Llama and Qwen2 layouts: pre-norm RMSNorm
layers, rotary positions, grouped-query attention, a gated MLP) over transformers' own submodules
(same weights, nothing copied), with the cache as per-layer buffers written in place (export.kv).

Image features enter the prompt as the processor lays it out: the k-th image placeholder of a
sequence fed from its start takes row k of `image_features` (`feature_index` says which token takes
which, -1 for none; runtime.search.feature_index), the way transformers' masked_scatter puts them in
place of the placeholders' embeddings. The features stay bound every step; only a prompt's
placeholders ever read them. Shared by the families whose language model this is."""

import torch
from torch import nn

from ..kv import cached_attention, pick


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, T, Dh) rotated by the angles of its positions (cos, sin (N, T, Dh)), as transformers'
    apply_rotary_pos_emb."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def with_features(embeds: torch.Tensor, image_features: torch.Tensor, feature_index: torch.Tensor) -> torch.Tensor:
    """(N, T, D) token embeddings with row feature_index[n, t] of image_features (N, K, D) where it is >= 0."""
    rows = torch.gather(image_features, 1, feature_index.clamp(min=0)[..., None].expand(-1, -1, embeds.shape[-1]))
    return torch.where(feature_index[..., None] >= 0, rows.to(embeds.dtype), embeds)


class CausalLM(nn.Module):
    """`model` is the language model (embed_tokens, layers, norm, rotary_emb), `lm_head` its output head."""

    def __init__(self, model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.model, self.lm_head = model, lm_head
        attention = model.layers[0].self_attn
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim, self.scaling = attention.head_dim, attention.scaling

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        n, t, _ = x.shape
        return x.view(n, t, heads, self.head_dim).transpose(1, 2)

    def forward(self, input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values, image_features,
                feature_index):
        m = self.model
        x = with_features(m.embed_tokens(input_ids), image_features, feature_index)
        cos, sin = m.rotary_emb(x, position_ids)
        keys, values = [], []
        for i, layer in enumerate(m.layers):
            attention, h = layer.self_attn, layer.input_layernorm(x)
            q = rotary(self.split(attention.q_proj(h), self.heads), cos, sin)
            k = rotary(self.split(attention.k_proj(h), self.kv_heads), cos, sin)
            a, k, v = cached_attention(q, k, self.split(attention.v_proj(h), self.kv_heads), past_keys[i], past_values[i],
                                       cache_lengths, self.scaling)
            n, _, t, _ = a.shape
            x = x + attention.o_proj(a.transpose(1, 2).reshape(n, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            keys.append(k)
            values.append(v)
        return self.lm_head(m.norm(pick(x, logit_index))), keys, values
