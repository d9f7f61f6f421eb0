"""Decoder steps over transformers' own submodules (same weights, nothing copied), with the
cache as fixed-capacity stacked buffers (layers, batch, heads, capacity, head_dim) plus
`past_length`, as in export.model: transformers' cache objects cannot be graph inputs. Shared
by the families whose text decoder they are."""

import torch
from torch import nn

from ..model import causal, merge_heads, split_heads, write


def attend(q, k, v, scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, where `mask`) v, written out. The exporter decomposes
    F.scaled_dot_product_attention into a Transpose and a Mul of K ahead of the MatMul, which
    ONNX Runtime then runs at every step over all of a layer's keys (Florence-2-base: its 594
    cross-attention keys in 6 layers, 2.8 of 11 ms per int8 step); written so, the transpose and
    the scale fold into one FusedMatMul that reads K in place."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


class GPT2Decoder(nn.Module):
    """`GPT2LMHeadModel` with cross-attention, as a decoder step over stacked caches."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.n_head, self.width = lm, lm.config.n_head, lm.config.n_embd

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = [block.crossattention.c_attn(memory).split(self.width, dim=2) for block in self.lm.transformer.h]
        return (torch.stack([split_heads(k, self.n_head) for k, _ in kv]),
                torch.stack([split_heads(v, self.n_head) for _, v in kv]))

    def forward(self, input_ids, past_key, past_value, past_length, cross_key, cross_value):
        t = self.lm.transformer
        positions, mask = causal(past_length, input_ids.shape[1], past_key.shape[3])
        x = t.wte(input_ids) + t.wpe(positions)
        keys, values = [], []
        for i, block in enumerate(t.h):
            attn, cross = block.attn, block.crossattention
            q, k, v = (split_heads(z, self.n_head) for z in attn.c_attn(block.ln_1(x)).split(self.width, dim=2))
            k, v = write(past_key[i], k, past_length), write(past_value[i], v, past_length)
            x = x + attn.c_proj(merge_heads(attend(q, k, v, attn.scaling, mask)))
            q = split_heads(cross.q_attn(block.ln_cross_attn(x)), self.n_head)
            x = x + cross.c_proj(merge_heads(attend(q, cross_key[i], cross_value[i], cross.scaling)))
            x = x + block.mlp(block.ln_2(x))
            keys.append(k)
            values.append(v)
        return self.lm.lm_head(t.ln_f(x)), torch.stack(keys), torch.stack(values)


class BertDecoder(nn.Module):
    """`BertLMHeadModel` or BLIP's `BlipTextLMHeadModel` (post-LN, `.bert` + `.cls`), as a
    decoder step over stacked caches."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.n_head = lm, lm.config.num_attention_heads

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.lm.bert.encoder.layer
        return (torch.stack([split_heads(layer.crossattention.self.key(memory), self.n_head) for layer in layers]),
                torch.stack([split_heads(layer.crossattention.self.value(memory), self.n_head) for layer in layers]))

    def forward(self, input_ids, past_key, past_value, past_length, cross_key, cross_value):
        emb = self.lm.bert.embeddings
        positions, mask = causal(past_length, input_ids.shape[1], past_key.shape[3])
        x = emb.word_embeddings(input_ids)
        if hasattr(emb, "token_type_embeddings"):  # BERT's segment 0; BLIP has none
            x = x + emb.token_type_embeddings(torch.zeros_like(input_ids))
        x = emb.LayerNorm(x + emb.position_embeddings(positions))
        keys, values = [], []
        for i, layer in enumerate(self.lm.bert.encoder.layer):
            sa, ca = layer.attention.self, layer.crossattention.self
            q, k, v = (split_heads(f(x), self.n_head) for f in (sa.query, sa.key, sa.value))
            k, v = write(past_key[i], k, past_length), write(past_value[i], v, past_length)
            a = layer.attention.output(merge_heads(attend(q, k, v, mask=mask)), x)
            q = split_heads(ca.query(a), self.n_head)
            c = layer.crossattention.output(merge_heads(attend(q, cross_key[i], cross_value[i])), a)
            x = layer.output(layer.intermediate(c), c)
            keys.append(k)
            values.append(v)
        return self.lm.cls(x), torch.stack(keys), torch.stack(values)


class GitDecoder(nn.Module):
    """`GitForCausalLM`'s text side (BERT-style post-LN layers): the image tokens are a prefix of
    every layer's self-attention, which they see whole and the text sees causally after them.
    They never attend to text, so their keys and values depend on the image alone: `memory_kv`
    runs the layers over them once per image, and a step attends to [prefix; cache]."""

    def __init__(self, git: nn.Module):
        super().__init__()
        self.git, self.n_head = git, git.config.num_attention_heads

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, layers, x = [], [], self.git.git.encoder.layer, memory
        for i, layer in enumerate(layers):
            keys.append(split_heads(layer.attention.self.key(x), self.n_head))
            values.append(split_heads(layer.attention.self.value(x), self.n_head))
            if i < len(layers) - 1:
                x = layer(x)  # no mask: image tokens attend to each other bidirectionally
        return torch.stack(keys), torch.stack(values)

    def forward(self, input_ids, past_key, past_value, past_length, prefix_key, prefix_value):
        emb = self.git.git.embeddings
        positions, mask = causal(past_length, input_ids.shape[1], past_key.shape[3])
        mask = torch.cat([torch.ones(mask.shape[0], prefix_key.shape[3], dtype=torch.bool), mask], dim=1)
        x = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions))
        keys, values = [], []
        for i, layer in enumerate(self.git.git.encoder.layer):
            sa = layer.attention.self
            q, k, v = (split_heads(f(x), self.n_head) for f in (sa.query, sa.key, sa.value))
            k, v = write(past_key[i], k, past_length), write(past_value[i], v, past_length)
            a = attend(q, torch.cat([prefix_key[i], k], dim=2), torch.cat([prefix_value[i], v], dim=2), mask=mask)
            a = layer.attention.output(merge_heads(a), x)
            x = layer.output(layer.intermediate(a), a)
            keys.append(k)
            values.append(v)
        return self.git.output(x), torch.stack(keys), torch.stack(values)


class BartDecoder(nn.Module):
    """BART's decoder (post-LN: self-attention, cross-attention, MLP, each followed by its
    LayerNorm; learned positions offset by 2; scaled token embeddings) and an LM head, as a
    decoder step over stacked caches. Florence-2's text decoder."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.decoder, self.lm_head, self.n_head = decoder, lm_head, decoder.layers[0].self_attn.num_heads

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers = self.decoder.layers
        return (torch.stack([split_heads(layer.encoder_attn.k_proj(memory), self.n_head) for layer in layers]),
                torch.stack([split_heads(layer.encoder_attn.v_proj(memory), self.n_head) for layer in layers]))

    def forward(self, input_ids, past_key, past_value, past_length, cross_key, cross_value):
        d = self.decoder
        positions, mask = causal(past_length, input_ids.shape[1], past_key.shape[3])
        x = d.layernorm_embedding(d.embed_tokens(input_ids) + d.embed_positions.weight[positions + d.embed_positions.offset])
        keys, values = [], []
        for i, layer in enumerate(d.layers):
            sa, ca = layer.self_attn, layer.encoder_attn
            q, k, v = (split_heads(f(x), self.n_head) for f in (sa.q_proj, sa.k_proj, sa.v_proj))
            k, v = write(past_key[i], k, past_length), write(past_value[i], v, past_length)
            x = layer.self_attn_layer_norm(x + sa.out_proj(merge_heads(
                attend(q, k, v, sa.scaling, mask))))
            q = split_heads(ca.q_proj(x), self.n_head)
            x = layer.encoder_attn_layer_norm(x + ca.out_proj(merge_heads(
                attend(q, cross_key[i], cross_value[i], ca.scaling))))
            x = layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x))))
            keys.append(k)
            values.append(v)
        return self.lm_head(x), torch.stack(keys), torch.stack(values)


def wrap(lm: nn.Module) -> nn.Module:
    return GPT2Decoder(lm) if lm.config.model_type == "gpt2" else BertDecoder(lm)


def dims(text) -> tuple[int, int, int, int]:
    """(layers, heads, width, positions) of a GPT-2, BART or BERT-style text config (the decoder's)."""
    if text.model_type == "gpt2":
        return text.n_layer, text.n_head, text.n_embd, text.n_positions
    if text.model_type == "bart":
        return text.decoder_layers, text.decoder_attention_heads, text.d_model, text.max_position_embeddings
    return text.num_hidden_layers, text.num_attention_heads, text.hidden_size, text.max_position_embeddings
