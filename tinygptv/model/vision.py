"""Frozen vision tower: LAVIS EVA ViT-g followed by ``ln_vision``.

Semantics and dimensions follow ``shared/reference/tinygptv-official.md`` §1.1 (data flow) and §1.2
(EVA ViT-g). Parameter names match LAVIS ``eva_vit_g.pth`` one to one, so that file loads without any
renaming (see :mod:`tinygptv.weights.vision`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from tinygptv.config import VisionConfig
from tinygptv.model.attention import attention

log = logging.getLogger(__name__)


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize an absolute position embedding to a new square patch grid (reference §1.2).

    The CLS position is kept as is; the patch positions are resized with bicubic interpolation
    (``align_corners=False``), computed in fp32 and cast back to the input dtype.

    Args:
        pos_embed: ``[1, 1 + g², W]`` with ``g`` the current grid side.
        new_grid: target grid side ``g'``.

    Returns:
        ``[1, 1 + g'², W]``; the input itself when ``g == g'``.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be [1, 1+g², W], got {tuple(pos_embed.shape)}")
    _, n_tokens, width = pos_embed.shape
    old_grid = math.isqrt(n_tokens - 1)
    if old_grid * old_grid != n_tokens - 1:
        raise ValueError(f"pos_embed has {n_tokens - 1} patch positions, not a square grid")
    if old_grid == new_grid:
        return pos_embed
    cls_pos = pos_embed[:, :1]  # [1, 1, W]
    grid = pos_embed[:, 1:].float().reshape(1, old_grid, old_grid, width)  # [1, g, g, W]
    grid = grid.permute(0, 3, 1, 2)  # [1, W, g, g]
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)  # [1, W, g', g']
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, width)  # [1, g'², W]
    return torch.cat([cls_pos, grid.to(pos_embed.dtype)], dim=1)  # [1, 1 + g'², W]


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens with one strided convolution (LAVIS ``PatchEmbed``)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S]`` → ``[B, g², W]``."""
        x = self.proj(images.to(self.proj.weight.dtype))  # [B, W, g, g]
        return x.flatten(2).transpose(1, 2)  # [B, g², W]


class EVAAttention(nn.Module):
    """Multi-head self-attention with a bias-free fused ``qkv`` plus learned ``q_bias``/``v_bias`` (k bias = 0)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(cfg.width))
            self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, W]`` → ``[B, N, W]`` (no mask: every token attends to every token)."""
        b, n, w = x.shape
        qkv = self.qkv(x)  # [B, N, 3W]
        if self.q_bias is not None:  # in place: at 448 px each copy of qkv is 17 MB (fp32)
            qkv += torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]).to(qkv.dtype)  # [3W]
        qkv = qkv.reshape(b, n, 3, self.heads, w // self.heads)  # [B, N, 3, h, d]
        # one copy to a contiguous [3, B, h, N, d]: the CPU flash-attention kernel is ~35 % faster on contiguous
        # inputs at 448 px (measured on 6 ViT-g layers, bf16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # each [B, h, N, d]
        del qkv  # the linear's output is not needed past the copy (17 MB fp32 at 448 px)
        out = attention(q, k, v)  # [B, h, N, d]
        out = out.transpose(1, 2).reshape(b, n, w)  # [B, N, W]
        return self.proj(out)


class EVAMlp(nn.Module):
    """``fc1`` → exact (erf) GELU → ``fc2``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, W]`` → ``[B, N, W]``."""
        h = self.fc1(x)  # [B, N, mlp_dim]
        # without autograd the GELU overwrites its input: one [B, N, mlp_dim] buffer instead of two (25 MB at 448 px)
        h = F.gelu(h) if torch.is_grad_enabled() else torch.ops.aten.gelu_(h)
        return self.fc2(h)


class EVABlock(nn.Module):
    """Pre-norm transformer block without layer-scale or drop-path."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = EVAAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = EVAMlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, W]`` → ``[B, N, W]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EVAViT(nn.Module):
    """EVA ViT-g as built by LAVIS ``create_eva_vit_g`` (reference §1.2).

    CLS token + learned absolute positions, ``cfg.depth`` pre-norm blocks, no final norm. Returns all
    tokens (CLS first) of the last block. Weights always come from a checkpoint, so initialisation is
    minimal (and works on the ``meta`` device).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(EVABlock(cfg) for _ in range(cfg.depth))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor, interpolate_pos: bool = False) -> torch.Tensor:
        """Encode images.

        Args:
            images: ``[B, C, S, S]`` with ``S == cfg.image_size``, or any multiple of the patch size when
                ``interpolate_pos`` (positions resized on the fly, differentiably — for multi-resolution training).

        Returns:
            ``[B, 1 + g², W]`` with ``g = S // patch_size``.
        """
        size = self.cfg.image_size
        pos = self.pos_embed
        if tuple(images.shape[-2:]) != (size, size):
            if not interpolate_pos or images.shape[-1] != images.shape[-2]:
                raise ValueError(f"expected {size}x{size} images, got {tuple(images.shape[-2:])}; "
                                 f"call VisionEncoder.set_image_size to change the resolution")
            pos = interpolate_pos_embed(pos, images.shape[-1] // self.cfg.patch_size)
        x = self.patch_embed(images)  # [B, g², W]
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)  # [B, 1 + g², W]
        for block in self.blocks:
            x = block(x)
        return x


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (LAVIS ``LayerNorm`` in base_model.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class VisionEncoder(nn.Module):
    """``vit`` (EVA ViT-g) then ``ln_vision``: ``[B, 3, S, S]`` → ``[B, 1 + g², W]`` (reference §1.1)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = EVAViT(cfg)
        self.ln_vision = LayerNormFp32(cfg.width, eps=cfg.ln_vision_eps)

    def forward(self, images: torch.Tensor, interpolate_pos: bool = False) -> torch.Tensor:
        """``[B, 3, S, S]`` → ``[B, 1 + g², W]``."""
        return self.ln_vision(self.vit(images, interpolate_pos))

    @torch.no_grad()
    def set_image_size(self, size: int) -> None:
        """Change the input resolution: interpolate ``pos_embed`` in place and update ``cfg.image_size``.

        Stage 4 goes from 224 to 448 px (16×16 → 32×32 patches, reference §1.2).
        """
        if size <= 0 or size % self.cfg.patch_size:
            raise ValueError(f"image size {size} is not a positive multiple of patch_size={self.cfg.patch_size}")
        old = self.vit.pos_embed
        resized = interpolate_pos_embed(old.detach(), size // self.cfg.patch_size)
        self.vit.pos_embed = nn.Parameter(resized.clone(), requires_grad=old.requires_grad)
        log.info("vision: image size %d -> %d (%d position embeddings)", self.cfg.image_size, size, resized.shape[1])
        self.cfg.image_size = size
