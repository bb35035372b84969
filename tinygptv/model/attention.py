"""Scaled dot-product attention shared by the ViT, the Q-Former and the decoder.

One deviation from calling ``F.scaled_dot_product_attention`` directly: on the CPU, when low-precision inputs
(bf16/fp16 under autocast) will be back-propagated through, the attention runs in fp32 and its output is cast
back, and for small score matrices (at most :data:`EXPLICIT_MAX_SCORES` elements: the nano model's shapes, or one
full-size sequence) it is computed explicitly (``softmax(q kᵀ / √d + mask) v`` with matmuls) instead of through
PyTorch's CPU flash-attention kernel.

Why, measured with torch 2.13 on a 2-core AVX-512-BF16 EPYC. The CPU flash kernel is much slower in bf16 than in
fp32 for this project's shapes, forward plus backward (batch 16, ms, bf16 → fp32): nano decoder 130 tokens × 8
heads of 32: 33.0 → 15.5; nano ViT 65 patches: 6.2 → 1.9; 257 patches: 28.4 → 20.4; Q-Former cross-attention
4.4 → 2.4. Inside the nano recipe's bf16 training loops the fp32 flash kernel was still slower than the explicit
fp32 computation (median seconds per step, two rounds each, flash → explicit): stage-0 text LM 0.61 / 0.68 →
0.47 / 0.46; stage-0 ViT + Q-Former through the LM 0.79 / 0.62 → 0.54 / 0.49 (most of it the decoder's
attention backward). The explicit form keeps the ``[B, h, Lq, Lk]`` probabilities for the backward pass, hence
the size bound. fp32 is also the more accurate choice. Forward-only calls (inference) and fp32 training are
left to the kernel: there the two were about as fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LOW = (torch.bfloat16, torch.float16)
EXPLICIT_MAX_SCORES = 1 << 22  # B·h·Lq·Lk up to which CPU low-precision training attends explicitly (16 MB fp32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ / √d + mask) v`` for ``q [B, h, Lq, d]``, ``k, v [B, h, Lk, d]``; ``attn_mask`` bool
    (True = attend) or additive, broadcastable to ``[B, h, Lq, Lk]``. Returns ``[B, h, Lq, d]`` in ``q``'s dtype."""
    if (q.device.type == "cpu" and q.dtype in _LOW and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.float()
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
            q32, k32, v32 = q.float(), k.float(), v.float()
            if q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= EXPLICIT_MAX_SCORES:
                out = _explicit(q32, k32, v32, attn_mask)
            else:
                out = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=attn_mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, h, Lq, Lk]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # a row with nothing to attend to gets uniform weights, not NaN
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attn_mask
    return torch.matmul(scores.softmax(-1), v)
