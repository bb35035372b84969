"""The two projection layers between the Q-Former and the LM (reference §1.4).

``proj1`` = upstream ``llama_proj`` (Q-Former width → 4096), ``proj2`` = ``llama_proj2`` (4096 → LM width),
applied back to back with no activation or norm in between. Being two affine maps, they fold exactly
into one (``W = W2·W1``, ``b = W2·b1 + b2``) for inference: :meth:`Projector.fold`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, hidden)
        self.proj2 = nn.Linear(hidden, out_dim)
        self._folded: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The input dtype: the weights' (quantized linears take float32 and convert inside)."""
        weight = getattr(self.proj1, "weight", None)
        return weight.dtype if weight is not None else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, Q, in_dim] -> [B, Q, out_dim]
        if self._folded is not None:
            return F.linear(x, *self._folded)
        return self.proj2(self.proj1(x))

    @torch.no_grad()
    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [out,in], b [out])`` of the single equivalent linear map, computed in fp64."""
        if not all(isinstance(lin, nn.Linear) for lin in (self.proj1, self.proj2)):
            raise ValueError("folding needs floating-point projections; these are quantized (load without quantize=)")
        w1, b1 = self.proj1.weight.double(), self.proj1.bias.double()
        w2, b2 = self.proj2.weight.double(), self.proj2.bias.double()
        dtype = self.proj1.weight.dtype
        return (w2 @ w1).to(dtype), (w2 @ b1 + b2).to(dtype)

    def fold(self) -> None:
        """Use the folded single linear map in ``forward`` (inference; the two layers stay saved)."""
        self._folded = self.folded_weights()

    def unfold(self) -> None:
        self._folded = None

    def train(self, mode: bool = True) -> "Projector":
        if mode:
            self.unfold()
        return super().train(mode)
