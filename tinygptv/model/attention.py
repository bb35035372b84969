"""Scaled dot-product attention shared by the ViT, the Q-Former and the decoder.

One deviation from calling ``F.scaled_dot_product_attention`` directly: on the CPU, when attention in low
precision (bf16/fp16 inputs, or autocast on) will be back-propagated through, it runs in fp32 and its output is cast
to ``v``'s dtype. The autocast state counts, not only the inputs' dtype: the decoder's q and k leave RoPE in fp32
(its tables are fp32) while v is bf16, and autocast would run the bf16 kernel on them. PyTorch's CPU flash-attention kernel is much slower in bf16 than in fp32 for this project's shapes, forward
plus backward (torch 2.13, 2-core AVX-512-BF16 EPYC, batch 16, ms): nano decoder 130 tokens × 8 heads of 32:
33.0 → 15.5; nano ViT 65 patches: 6.2 → 1.9; 257 patches: 28.4 → 20.4; Q-Former cross-attention 4.4 → 2.4. In the
nano recipe's stage-0 vision loop the two bf16 kernels were 45 % of the CPU time. fp32 is also the more accurate
of the two. Forward-only calls (inference) are about as fast either way and are left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LOW = (torch.bfloat16, torch.float16)


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
