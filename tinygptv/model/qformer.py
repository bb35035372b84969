"""Query path of the BLIP-2 Q-Former: learned queries that read the ViT tokens.

Semantics follow ``shared/reference/tinygptv-official.md`` §1.3: a BERT-base encoder (post-LN layers,
erf GELU) whose input is only the 32 learned query tokens; even layers (``i % cross_attention_freq == 0``)
add cross-attention to the image tokens; every layer uses the *query* FFN (``intermediate_query`` /
``output_query``). The text branch (word/position embeddings, text FFN, LM head) is not built.
Dropout is omitted: the Q-Former is frozen and run in eval mode.

Checkpoint key ↔ module name mapping lives in :mod:`tinygptv.weights.vision`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tinygptv.config import QFormerConfig
from tinygptv.model.attention import attention


class QFormerAttention(nn.Module):
    """BERT attention with post-LN residual: ``norm(x + dense(MHA(x, context)))``.

    Self-attention when ``context`` is None, cross-attention otherwise (``key``/``value`` then read
    ``kv_dim``-wide context tokens).
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim, dim)
        self.value = nn.Linear(kv_dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend from ``x`` to ``context`` (or to itself).

        Args:
            x: ``[B, Q, H]`` queries.
            context: ``[B, N, kv_dim]`` or None for self-attention.
            mask: bool ``[B, 1, 1, N]``, True = attend; None = attend everywhere.

        Returns:
            ``[B, Q, H]``.
        """
        ctx = x if context is None else context
        b, q_len, h = x.shape
        n = ctx.shape[1]
        d = h // self.heads
        q = self.query(x).view(b, q_len, self.heads, d).transpose(1, 2)  # [B, heads, Q, d]
        k = self.key(ctx).view(b, n, self.heads, d).transpose(1, 2)  # [B, heads, N, d]
        v = self.value(ctx).view(b, n, self.heads, d).transpose(1, 2)  # [B, heads, N, d]
        out = attention(q, k, v, attn_mask=mask)  # [B, heads, Q, d]
        out = out.transpose(1, 2).reshape(b, q_len, h)  # [B, Q, H]
        return self.norm(x + self.dense(out))


class QueryFFN(nn.Module):
    """Query feed-forward with post-LN residual: ``norm(x + fc2(gelu(fc1(x))))``."""

    def __init__(self, dim: int, mlp_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, Q, H]`` → ``[B, Q, H]``."""
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class QFormerLayer(nn.Module):
    """Self-attention over the queries → optional cross-attention to the image → query FFN."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int, cross_attention: bool):
        super().__init__()
        self.self_attn = QFormerAttention(cfg.hidden, cfg.hidden, cfg.heads, cfg.ln_eps)
        self.cross_attn = (QFormerAttention(cfg.hidden, encoder_width, cfg.heads, cfg.ln_eps)
                           if cross_attention else None)
        self.ffn = QueryFFN(cfg.hidden, cfg.mlp_dim, cfg.ln_eps)

    def forward(self, x: torch.Tensor, image_embeds: torch.Tensor,
                image_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``x [B, Q, H]``, ``image_embeds [B, N, W]``, ``image_mask [B, 1, 1, N]`` or None → ``[B, Q, H]``."""
        x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image_embeds, image_mask)
        return self.ffn(x)


class QFormer(nn.Module):
    """BLIP-2 Q-Former, query path only: image tokens ``[B, N, W]`` → query outputs ``[B, Q, H]``."""

    def __init__(self, cfg: QFormerConfig, encoder_width: int):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.hidden))
        nn.init.normal_(self.query_tokens, mean=0.0, std=0.02)
        self.layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, encoder_width, cross_attention=i % cfg.cross_attention_freq == 0)
            for i in range(cfg.layers)
        )

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices of the layers that cross-attend to the image."""
        return [i for i, layer in enumerate(self.layers) if layer.cross_attn is not None]

    def forward(self, image_embeds: torch.Tensor, image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the learned queries against the image tokens.

        Args:
            image_embeds: ``[B, N, W]`` output of the vision encoder (cast to the Q-Former's dtype).
            image_mask: optional bool ``[B, N]``, True = valid token. Upstream passes all ones.

        Returns:
            ``[B, Q, H]`` last hidden state of the queries.
        """
        dtype = self.query_tokens.dtype
        image_embeds = image_embeds.to(dtype)
        mask = None
        if image_mask is not None:
            mask = image_mask.to(torch.bool)[:, None, None, :]  # [B, 1, 1, N]
        x = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # [B, Q, H]
        x = self.layernorm(x)
        for layer in self.layers:
            x = layer(x, image_embeds, mask)
        return x
