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
providers alike (README "The two graphs").
"""

from typing import NamedTuple

import torch
from onnxscript.values import Op, Opset

# onnxscript ships opsets up to 23 and onnx knows 24; the decoder step is converted to 24 afterwards
# (export.package.to_decoder_opset).
TENSOR_SCATTER, RMS_NORMALIZATION, ROTARY_EMBEDDING = (Op(Opset("", 24), name) for name in
                                                      ("TensorScatter", "RMSNormalization", "RotaryEmbedding"))


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


@torch.library.custom_op("edgecap::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, H, T, Dh) rotated by its positions' angles, cos and sin (N, T, Dh / 2) (the first half of
    transformers' duplicated ones), as apply_rotary_pos_emb rotates halves; exported as ONNX's
    RotaryEmbedding (opset 23), one node where rotate_half took seven."""
    half = x.shape[-1] // 2
    cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@rotary.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


def rotary_onnx(x, cos, sin):
    return ROTARY_EMBEDDING(x, cos, sin)


TRANSLATIONS = {torch.ops.edgecap.cache_write.default: cache_write_onnx,
                torch.ops.edgecap.rms_norm.default: rms_norm_onnx, torch.ops.edgecap.rotary.default: rotary_onnx}


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
