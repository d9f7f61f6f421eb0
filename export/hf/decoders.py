"""Decoder steps over transformers' own submodules (same weights, nothing copied), with the
cache as per-layer buffers written in place (export.kv), as in export.model: transformers' cache
objects cannot be graph inputs. Every step takes (input_ids, position_ids, cache_lengths,
logit_index, past keys, past values[, cross keys, cross values]) and returns (logits at
logit_index, present keys, present values). Shared by the families whose text decoder they are."""

import torch
from torch import nn

from ..kv import attend, cached_attention, pick, window
from ..model import merge_heads, split_heads


class GPT2Decoder(nn.Module):
    """`GPT2LMHeadModel` with cross-attention, as a decoder step over per-layer caches."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.n_head, self.width = lm, lm.config.n_head, lm.config.n_embd

    def memory_kv(self, memory: torch.Tensor) -> tuple[list, list]:
        kv = [block.crossattention.c_attn(memory).split(self.width, dim=2) for block in self.lm.transformer.h]
        return [split_heads(k, self.n_head) for k, _ in kv], [split_heads(v, self.n_head) for _, v in kv]

    def forward(self, input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values, cross_keys,
                cross_values):
        t = self.lm.transformer
        x = t.wte(input_ids) + t.wpe(position_ids)
        keys, values, w = [], [], window(cache_lengths, input_ids.shape[1])
        for i, block in enumerate(t.h):
            attn, cross = block.attn, block.crossattention
            q, k, v = (split_heads(z, self.n_head) for z in attn.c_attn(block.ln_1(x)).split(self.width, dim=2))
            a, k, v = cached_attention(q, k, v, past_keys[i], past_values[i], w, attn.scaling)
            x = x + attn.c_proj(merge_heads(a))
            q = split_heads(cross.q_attn(block.ln_cross_attn(x)), self.n_head)
            x = x + cross.c_proj(merge_heads(attend(q, cross_keys[i], cross_values[i], cross.scaling)))
            x = x + block.mlp(block.ln_2(x))
            keys.append(k)
            values.append(v)
        return self.lm.lm_head(t.ln_f(pick(x, logit_index))), keys, values


class BertDecoder(nn.Module):
    """`BertLMHeadModel` or BLIP's `BlipTextLMHeadModel` (post-LN, `.bert` + `.cls`), as a
    decoder step over per-layer caches."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.n_head = lm, lm.config.num_attention_heads

    def memory_kv(self, memory: torch.Tensor) -> tuple[list, list]:
        layers = self.lm.bert.encoder.layer
        return ([split_heads(layer.crossattention.self.key(memory), self.n_head) for layer in layers],
                [split_heads(layer.crossattention.self.value(memory), self.n_head) for layer in layers])

    def forward(self, input_ids, position_ids, cache_lengths, logit_index, past_keys, past_values, cross_keys,
                cross_values):
        emb = self.lm.bert.embeddings
        x = emb.word_embeddings(input_ids)
        if hasattr(emb, "token_type_embeddings"):  # BERT's segment 0; BLIP has none
            x = x + emb.token_type_embeddings(torch.zeros_like(input_ids))
        x = emb.LayerNorm(x + emb.position_embeddings(position_ids))
        keys, values, w = [], [], window(cache_lengths, input_ids.shape[1])
        for i, layer in enumerate(self.lm.bert.encoder.layer):
            sa, ca = layer.attention.self, layer.crossattention.self
            q, k, v = (split_heads(f(x), self.n_head) for f in (sa.query, sa.key, sa.value))
            a, k, v = cached_attention(q, k, v, past_keys[i], past_values[i], w)
            a = layer.attention.output(merge_heads(a), x)
            q = split_heads(ca.query(a), self.n_head)
            c = layer.crossattention.output(merge_heads(attend(q, cross_keys[i], cross_values[i])), a)
            x = layer.output(layer.intermediate(c), c)
            keys.append(k)
            values.append(v)
        return self.lm.cls(pick(x, logit_index)), keys, values


def wrap(lm: nn.Module) -> nn.Module:
    return GPT2Decoder(lm) if lm.config.model_type == "gpt2" else BertDecoder(lm)


def dims(text) -> tuple[int, int, int, int, int, int]:
    """(layers, heads, key-value heads, head size, width, positions) of a GPT-2, BART, BERT-style or
    Llama-style text config (the decoder's)."""
    if text.model_type == "gpt2":
        return text.n_layer, text.n_head, text.n_head, text.n_embd // text.n_head, text.n_embd, text.n_positions
    if text.model_type == "bart":
        heads = text.decoder_attention_heads
        return text.decoder_layers, heads, heads, text.d_model // heads, text.d_model, text.max_position_embeddings
    heads = text.num_attention_heads
    return (text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads,
            getattr(text, "head_dim", None) or text.hidden_size // heads, text.hidden_size, text.max_position_embeddings)
