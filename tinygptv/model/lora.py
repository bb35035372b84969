"""LoRA linear layer with peft-0.2.0 semantics (reference §2.5).

::

    x ──► W x + b ───────────────────────────────┐
    │                                            (+) ──► y
    └──► dropout ──► A (r×in) ──► B (out×r) ──► ·s ┘      s = alpha / r

``A`` is Kaiming-uniform(a=√5) initialised and ``B`` zeros, so a fresh adapter is the identity
change. ``merge()`` folds ``s·B·A`` into ``W`` for inference; ``unmerge()`` takes it out again.
With ``r == 0`` the layer is a plain ``nn.Linear``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus an optional low-rank adapter (``lora_A [r,in]``, ``lora_B [out,r]``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, r: int = 0,
                 alpha: float = 1.0, dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = r
        self.scaling = alpha / r if r > 0 else 0.0
        self.merged = False
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
            self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.r > 0 and self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        out = F.linear(x, self.weight, self.bias)
        if self.r > 0 and not self.merged:
            h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # [..., r]
            out = out + (F.linear(h, self.lora_B) * self.scaling).to(out.dtype)
        return out

    def delta_weight(self) -> torch.Tensor:
        """``s · B · A`` as a dense ``[out, in]`` matrix (fp32 for accuracy)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.r > 0 and not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.r > 0 and self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, r={self.r}, scaling={self.scaling:g}" if self.r else base


def lora_layers(module: nn.Module) -> list[LoRALinear]:
    """Every :class:`LoRALinear` with an adapter inside ``module``."""
    return [m for m in module.modules() if isinstance(m, LoRALinear) and m.r > 0]


def merge_lora(module: nn.Module) -> None:
    for layer in lora_layers(module):
        layer.merge()


def unmerge_lora(module: nn.Module) -> None:
    for layer in lora_layers(module):
        layer.unmerge()
