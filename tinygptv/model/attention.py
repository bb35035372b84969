"""Scaled dot-product attention shared by the ViT, the Q-Former and the decoder.

One deviation from calling ``F.scaled_dot_product_attention`` directly: on the CPU, when attention in low precision
(bf16/fp16 inputs, or autocast on) will be back-propagated through, it runs in fp32 and its output is cast to
``v``'s dtype. The autocast state counts, not only the inputs' dtype: the decoder's q and k leave RoPE in fp32 (its
tables are fp32) while v is bf16, and autocast would run the bf16 kernel on them. PyTorch's CPU flash-attention
kernel is much slower in bf16 than in fp32 for this project's shapes, forward plus backward (torch 2.13, 2-core
AVX-512-BF16 EPYC, batch 16, ms): nano decoder 130 tokens × 8 heads of 32: 33.0 → 15.5; nano ViT 65 patches:
6.2 → 1.9; 257 patches: 28.4 → 20.4; Q-Former cross-attention 4.4 → 2.4. In the nano recipe's stage-0 vision loop the
two bf16 kernels were 45 % of the CPU time. fp32 is also the more accurate of the two. Forward-only calls
(inference) are about as fast either way and are left alone.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

_LOW = (torch.bfloat16, torch.float16)
log = logging.getLogger(__name__)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ / √d + mask) v`` for ``q [B, h, Lq, d]``, ``k, v [B, h, Lk, d]``; ``attn_mask`` bool
    (True = attend) or additive, broadcastable to ``[B, h, Lq, Lk]``. Returns ``[B, h, Lq, d]`` in ``v``'s dtype."""
    low = q.dtype in _LOW or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _LOW)
    if (q.device.type == "cpu" and low and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        return out.to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _decode_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           attn_mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row as reductions (no matmul), in fp32: compiled, these become single passes over k and v."""
    scores = (k.float() * q.float()).sum(-1)[:, :, None] * q.shape[-1] ** -0.5  # [B,h,1,S]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask.float()
    p = scores.softmax(-1)
    return (p.transpose(-1, -2) * v.float()).sum(-2, keepdim=True)  # [B,h,1,d]


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per row, ``q [B, h, 1, d]`` over ``k, v [B, h, S, d]``, as two batched matrix
    products; same inputs and result as :func:`attention`. Used for fp32 key/value caches at decode time: PyTorch's
    CPU SDPA kernel is slower there (``benchmarks/decode_attention.py``: 32 layers, full-size heads, 2-core Zen 5
    EPYC, batch 8 at 80 / 400 cached positions 22.1 → 15.9 / 77.9 → 69.0 ms, batch 1 2.59 → 2.27 / 10.2 → 9.9 ms).
    The products allocate only the ``[B, h, 1, S]`` scores, unlike elementwise reductions, whose ``[B, h, S, d]``
    temporaries cost page faults whenever the allocator has handed their memory back."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # [B,h,1,S]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    return torch.matmul(scores.softmax(-1), v)  # [B,h,1,d]


_compiled_decode = None  # None: not compiled yet; False: compiling failed, SDPA on fp32 copies is used


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per row (``q [B, h, 1, d]``, ``k, v [B, h, S, d]`` in any float dtype) in fp32,
    through a kernel compiled by ``torch.compile`` that streams k and v once.

    Why: at decode time attention reads the whole key/value cache for one query, and the CPU SDPA kernel does that
    as one small matrix product per (row, head) at ~10 GB/s (full-size model, batch 8, 128 positions, 2-core
    AVX-512 EPYC: 68 ms a step for 32 layers, while a plain read of the same bytes takes 22 ms). Compiled, these
    reductions take 46 ms over fp32 keys/values and 33 ms over bf16 ones. The first call compiles (seconds; needs a
    C++ compiler); if that fails, a warning is logged once and the SDPA kernel is used on fp32 copies.
    """
    global _compiled_decode
    if _compiled_decode is None:
        _compiled_decode = torch.compile(_decode_attention_math, dynamic=True)
    if _compiled_decode is not False:
        try:
            return _compiled_decode(q, k, v, attn_mask)
        except Exception as e:  # noqa: BLE001 - any backend failure (no compiler, unsupported op) falls back
            log.warning("compiled decode attention unavailable (%s: %s); using PyTorch's kernel",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _compiled_decode = False
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)


def warm_up_decode_attention(heads: int, head_dim: int, dtype: torch.dtype) -> float:
    """Compile :func:`decode_attention` now for ``heads × head_dim`` queries of ``dtype`` over bf16 keys/values
    (the batch-1 graph and the one for larger batches) rather than inside the first answers; returns seconds."""
    t = time.perf_counter()
    for batch in (1, 2):
        q = torch.zeros(batch, heads, 1, head_dim, dtype=dtype)
        kv = torch.zeros(batch, heads, 3, head_dim, dtype=torch.bfloat16)
        decode_attention(q, kv, kv, torch.ones(batch, 1, 1, 3, dtype=torch.bool))
    return time.perf_counter() - t
