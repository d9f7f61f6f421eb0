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

import torch
from onnxscript.values import Op, Opset

TENSOR_SCATTER = Op(Opset("", 24), "TensorScatter")  # onnxscript ships opsets up to 23; onnx knows 24


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


TRANSLATIONS = {torch.ops.edgecap.cache_write.default: cache_write_onnx}


def slots(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """(N, T): the slots t new tokens take in each row."""
    return lengths[:, None] + torch.arange(t, device=lengths.device)


def visible(cache_lengths: torch.Tensor, t: int, total) -> torch.Tensor:
    """(N, 1, T, total) mask: query i of row n, at slot cache_lengths[n] + i, sees slots up to its own."""
    limit = slots(cache_lengths, t) + 1
    return (torch.arange(total, device=cache_lengths.device)[None, None, :] < limit[:, :, None])[:, None]


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


def cached_attention(q, k, v, past_key, past_value, cache_lengths, scale: float | None = None):
    """Attention of the new tokens' q (N, H, T, Dh) over the cache with their k, v (N, Hkv, T, Dh)
    written in: (output (N, H, T, Dh), present key, present value)."""
    present_key, present_value = cache_write(past_key, k, cache_lengths), cache_write(past_value, v, cache_lengths)
    total = cache_lengths.max() + q.shape[2]
    out = attend(q, present_key[:, :, :total], present_value[:, :, :total], scale, visible(cache_lengths, q.shape[2], total))
    return out, present_key, present_value


def pick(hidden: torch.Tensor, logit_index: torch.Tensor) -> torch.Tensor:
    """(N, T, D) -> (N, K, D): the positions whose next-token logits are wanted (the last one when
    decoding: a 1,000-token prefill runs its output head once, not 1,000 times)."""
    return torch.gather(hidden, 1, logit_index[..., None].expand(-1, -1, hidden.shape[-1]))
