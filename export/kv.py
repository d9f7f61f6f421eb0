"""The decoder step's KV cache and attention, as every exported decoder computes them.

The cache is per layer (N, kv_heads, capacity, head_dim). A step writes its T tokens' keys and
values at slots cache_lengths[n] .. +T-1 of each row with `cache_write`, which exports as ONNX's
TensorScatter (opset 24): ONNX Runtime runs it in place when the step's past and present buffers
are bound to the same memory (runtime/graphs.py does), so nothing of the capacity is copied. The
attention then reads the slots written so far (a Slice to the longest row: the in-graph copy is
of what is attended, not of the capacity), with a mask for shorter rows and causality.

Measured on Florence-2-base's decoder (6 layers, 768 wide, 51,289-token head; FP32, 2 threads,
past 40, ms per step), capacity 64 -> 1024: the previous Gather + Where rewrite of the whole
buffer 9.0 -> 17.6 (batch 1) and 12.0 -> 51.8 (batch 3); this design 7.4 -> 7.5 and 9.8 -> 12.8;
ONNX Runtime's contrib GroupQueryAttention with a shared buffer 7.1 -> 7.1 and 9.3 -> 10.7; the
standard Attention op over the whole buffer with TensorScatter 7.3 -> 8.5 and 9.7 -> 15.1.
GroupQueryAttention reads the cache without the Slice (10% faster at a 1,000-token prefix with
SmolVLM-256M's decoder), but its CUDA kernel takes only fp16/bf16 and it refuses several rows of
several tokens over a non-empty cache; TensorScatter is standard ONNX, on the CPU and CUDA
providers alike (README "The two graphs"). The decoder-only language models' step, whose cost at
batch 1 is mostly its many small nodes, takes it all the same (grouped_attention, with the
residual sums and norms as add_rms_norm, as onnxruntime-genai's graphs do): its manifest says so
(decoder.attention "grouped") and the runtime steps such rows one at a time.
"""

from typing import NamedTuple

import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

# onnxscript ships opsets up to 23 and onnx knows 24; the decoder step is converted to 24 afterwards
# (export.package.to_decoder_opset).
TENSOR_SCATTER, RMS_NORMALIZATION, ROTARY_EMBEDDING = (Op(Opset("", 24), name) for name in
                                                      ("TensorScatter", "RMSNormalization", "RotaryEmbedding"))


def contrib_schema(name: str, inputs: str, outputs: str, ints: str, floats: str) -> onnx.defs.OpSchema:
    """The part of an ONNX Runtime contrib op's schema that a translation uses (onnx does not ship
    them): inputs of type T, or M where the name ends in "_k" or "_length" (int32), or I where it
    ends in "_ids" (int64), and attributes."""
    def param(p):
        return onnx.defs.OpSchema.FormalParameter(p, "M" if p.endswith(("_k", "_length")) else "I" if p.endswith("_ids") else "T")
    attr = onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        name, "com.microsoft", 1, inputs=[param(p) for p in inputs.split()], outputs=[param(p) for p in outputs.split()],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], ""),
                          ("I", ["tensor(int64)"], "")],
        attributes=[onnx.defs.OpSchema.Attribute(a, attr.INT) for a in ints.split()]
        + [onnx.defs.OpSchema.Attribute(a, attr.FLOAT, required=False) for a in floats.split()])


GROUP_QUERY_ATTENTION = Op(Opset("com.microsoft", 1), "GroupQueryAttention", contrib_schema(
    "GroupQueryAttention", "query key value past_key past_value seqlens_k total_sequence_length cos_cache sin_cache position_ids",
    "output present_key present_value", "num_heads kv_num_heads do_rotary", "scale"))
SKIP_SIMPLIFIED_LAYER_NORMALIZATION = Op(Opset("com.microsoft", 1), "SkipSimplifiedLayerNormalization", contrib_schema(
    "SkipSimplifiedLayerNormalization", "input skip gamma", "output mean inv_std_var input_skip_bias_sum", "", "epsilon"))


@torch.library.custom_op("edgecap::cache_write", mutates_args=())
def cache_write(cache: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`cache` (N, H, C, Dh) with `new` (N, H, T, Dh) at slots lengths[n] .. lengths[n]+T-1."""
    out = cache.clone()
    out[torch.arange(len(cache))[:, None], :, slots(lengths, new.shape[2])] = new.transpose(1, 2).to(cache.dtype)
    return out


@cache_write.register_fake
def _(cache, new, lengths):
    return torch.empty_like(cache)


def _backward(ctx, grad):
    rows, at = torch.arange(len(grad))[:, None], slots(ctx.lengths, ctx.t)
    grad_new = grad[rows, :, at].transpose(1, 2)
    grad_cache = grad.clone()
    grad_cache[rows, :, at] = 0
    return grad_cache, grad_new, None


def _save(ctx, inputs, output):
    ctx.lengths, ctx.t = inputs[2], inputs[1].shape[2]


cache_write.register_autograd(_backward, setup_context=_save)  # training runs the same step


def cache_write_onnx(cache, new, lengths):
    return TENSOR_SCATTER(cache, new, lengths, axis=-2)  # TensorRT's parser takes 4-D caches at axis -2


@torch.library.custom_op("edgecap::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: x / sqrt(mean(x^2) + eps) in FP32, times the weight; exported as
    ONNX's RMSNormalization (opset 23), one node where the decomposition took seven."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def rms_norm_onnx(x, weight, eps: float):
    return RMS_NORMALIZATION(x, weight, axis=-1, epsilon=eps)


@torch.library.custom_op("edgecap::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + delta), x + delta): a residual connection and the norm after it, exported as
    ONNX Runtime's SkipSimplifiedLayerNormalization, one node where they took two."""
    total = x + delta
    return rms_norm(total, weight, eps), total


@add_rms_norm.register_fake
def _(x, delta, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def add_rms_norm_onnx(x, delta, weight, eps: float):
    normed, _, _, total = SKIP_SIMPLIFIED_LAYER_NORMALIZATION(x, delta, weight, epsilon=eps)
    return normed, total


@torch.library.custom_op("edgecap::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, T, Dh) rotated by its positions' angles, cos and sin (N, T, Dh / 2) (the first half
    of transformers' duplicated ones), as apply_rotary_pos_emb rotates halves; exported as ONNX's
    RotaryEmbedding (opset 23), one node where rotate_half took seven."""
    half = x.shape[-1] // 2
    cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@rotary.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


def rotary_onnx(x, cos, sin):
    return ROTARY_EMBEDDING(x, cos, sin)


class Written(NamedTuple):
    """The cache's extent after a step, as GroupQueryAttention takes it (int32), computed once per
    step: each row's written slots less one, and the longest row's."""

    last: torch.Tensor  # (N,)
    total: torch.Tensor  # ()


def written(cache_lengths: torch.Tensor, t: int) -> Written:
    return Written((cache_lengths + t - 1).to(torch.int32), (cache_lengths.max() + t).to(torch.int32))


class Angles(NamedTuple):
    """The step's rotary angles as GroupQueryAttention reads them, computed once per step: cos and
    sin tables whose row r is the angles of the step's r-th token (rows of N x T tokens, padded
    with zeros: the op wants a table of at least the cache's written length, as if indexed by
    slot), and each token's row (N, T). Tables of the step's own tokens rather than of every
    position serve 3-D positions (Qwen2-VL's M-RoPE) as they serve 1-D ones."""

    cos: torch.Tensor  # (R, Dh / 2), R >= total
    sin: torch.Tensor
    rows: torch.Tensor  # (N, T) int64


@torch.library.custom_op("edgecap::angle_tables", mutates_args=())
def angle_tables(cos: torch.Tensor, sin: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (N, T, Dh / 2) each as (max(N T, total), Dh / 2): their tokens' rows, then zeros."""
    def table(x):
        rows = x.reshape(-1, x.shape[-1])
        return torch.cat([rows, rows.new_zeros(max(int(total) - len(rows), 0), x.shape[-1])])
    return table(cos), table(sin)


@angle_tables.register_fake
def _(cos, sin, total):
    rows = torch.library.get_ctx().new_dynamic_size()
    return cos.new_empty(rows, cos.shape[-1]), sin.new_empty(rows, sin.shape[-1])


def angle_tables_onnx(cos, sin, total):
    ints = lambda *v: op.Constant(value_ints=list(v))
    cos, sin = op.Flatten(cos, axis=2), op.Flatten(sin, axis=2)
    missing = op.Max(op.Sub(op.Cast(op.Reshape(total, ints(1)), to=onnx.TensorProto.INT64), op.Shape(cos, start=0, end=1)),
                     ints(0))
    pads = op.Concat(ints(0, 0), missing, ints(0), axis=0)  # the two tables' rows padded alike, computed once
    return op.Pad(cos, pads), op.Pad(sin, pads)


def angles(cos: torch.Tensor, sin: torch.Tensor, w: Written) -> Angles:
    """cos and sin (N, T, Dh / 2), the step's tokens' angles, as GroupQueryAttention reads them."""
    n, t, _ = cos.shape
    return Angles(*angle_tables(cos, sin, w.total), torch.arange(n * t, device=cos.device).view(n, t))


@torch.library.custom_op("edgecap::grouped_attention", mutates_args=())
def grouped_attention(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, last: torch.Tensor,
                      total: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, heads: int,
                      kv_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder-only language model's attention as one node: the new tokens' q, k and v side by
    side (N, T, (heads + 2 kv_heads) * Dh), the fused projection's output, q and k rotated by
    their angles (`angles`), k and v written into the cache after each row's slots (`written`:
    `last` is the last slot the step writes) and attended causally: (output (N, T, heads * Dh),
    present key, present value). Computed here as rotary and cached_attention; exported as ONNX
    Runtime's GroupQueryAttention, which splits, rotates, writes the cache in place and reads it
    up to each row's length, so the step keeps no Split, rotation, Reshape, Transpose, Slice,
    mask or softmax nodes of its own (19 fewer per layer)."""
    n, t, _ = qkv.shape
    q, k, v = (x.reshape(n, t, h, -1).transpose(1, 2) for x, h in zip(
        qkv.split([heads * past_key.shape[-1], *[kv_heads * past_key.shape[-1]] * 2], dim=-1), (heads, kv_heads, kv_heads)))
    cos, sin = cos[rows], sin[rows]
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    out, present_key, present_value = cached_attention(q, k, v, past_key, past_value, window(last.long() + 1 - t, t), scale)
    return out.transpose(1, 2).reshape(n, t, -1), present_key, present_value


@grouped_attention.register_fake
def _(qkv, past_key, past_value, last, total, cos, sin, rows, heads, kv_heads, scale):
    n, t, _ = qkv.shape
    return qkv.new_empty(n, t, heads * past_key.shape[-1]), torch.empty_like(past_key), torch.empty_like(past_value)


def grouped_attention_onnx(qkv, past_key, past_value, last, total, cos, sin, rows, heads: int, kv_heads: int,
                           scale: float):
    return GROUP_QUERY_ATTENTION(qkv, None, None, past_key, past_value, last, total, cos, sin, rows, num_heads=heads,
                                 kv_num_heads=kv_heads, scale=scale, do_rotary=1)


TRANSLATIONS = {torch.ops.edgecap.cache_write.default: cache_write_onnx, torch.ops.edgecap.angle_tables.default: angle_tables_onnx,
                torch.ops.edgecap.rms_norm.default: rms_norm_onnx, torch.ops.edgecap.rotary.default: rotary_onnx,
                torch.ops.edgecap.grouped_attention.default: grouped_attention_onnx,
                torch.ops.edgecap.add_rms_norm.default: add_rms_norm_onnx}


def slots(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """(N, T): the slots t new tokens take in each row."""
    return lengths[:, None] + torch.arange(t, device=lengths.device)


class Window(NamedTuple):
    """What every layer's attention over the cache shares in one step, computed once per step:
    where the new tokens go, how many slots are read (`total`, the longest row's), and the mask."""

    lengths: torch.Tensor  # (N,) slots written before this step
    total: torch.Tensor
    mask: torch.Tensor  # (N, 1, T, total): query i of row n, at slot lengths[n] + i, sees slots up to its own


def window(cache_lengths: torch.Tensor, t: int) -> Window:
    total = cache_lengths.max() + t
    limit = slots(cache_lengths, t) + 1
    return Window(cache_lengths, total,
                  (torch.arange(total, device=cache_lengths.device)[None, None, :] < limit[:, :, None])[:, None])


def attend(q, k, v, scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, where `mask`) v, written out. q (N, H, T, Dh); k, v (N, Hkv, S, Dh)
    with H a multiple of Hkv (grouped-query attention: each key head serves H / Hkv query heads,
    whose rows are stacked rather than the keys repeated); mask (N, 1, T, S). The exporter
    decomposes F.scaled_dot_product_attention into a Transpose and a Mul of K ahead of the MatMul,
    which ONNX Runtime then runs at every step over all of a layer's keys (Florence-2-base: its
    594 cross-attention keys in 6 layers, 2.8 of 11 ms per int8 step); written so, the transpose
    and the scale fold into one FusedMatMul that reads K in place."""
    n, heads, t, dh = q.shape
    group = heads // k.shape[1]
    scores = torch.matmul(q.reshape(n, k.shape[1], group * t, dh), k.transpose(-1, -2)) * (dh**-0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.reshape(n, k.shape[1], group, t, -1).masked_fill(~mask[:, :, None], float("-inf"))
        scores = scores.reshape(n, k.shape[1], group * t, -1)
    return torch.matmul(scores.softmax(-1), v).reshape(n, heads, t, dh)


def cached_attention(q, k, v, past_key, past_value, w: Window, scale: float | None = None):
    """Attention of the new tokens' q (N, H, T, Dh) over the cache with their k, v (N, Hkv, T, Dh)
    written in: (output (N, H, T, Dh), present key, present value)."""
    present_key, present_value = cache_write(past_key, k, w.lengths), cache_write(past_value, v, w.lengths)
    out = attend(q, present_key[:, :, : w.total], present_value[:, :, : w.total], scale, w.mask)
    return out, present_key, present_value


def pick(hidden: torch.Tensor, logit_index: torch.Tensor) -> torch.Tensor:
    """(N, T, D) -> (N, K, D): the positions whose next-token logits are wanted (the last one when
    decoding: a 1,000-token prefill runs its output head once, not 1,000 times)."""
    return torch.gather(hidden, 1, logit_index[..., None].expand(-1, -1, hidden.shape[-1]))
