"""Memo of the frozen vision towers' outputs during training.

Stages 1–4 keep the ViT and the Q-Former frozen and in eval mode (reference §1.7), and images are preprocessed
deterministically (resize + normalise, no augmentation), so an image seen again gives the same Q-Former outputs
(up to the float rounding of being batched with other images). Multi-epoch stages see every image many times; on a CPU the two towers are a large share of a step
(nano stage 4: ~25 % of its time). :class:`TowerCache` keys each image by a hash of its pixel tensor and keeps
the ``[Q, H]`` outputs on the CPU, bounded in bytes; only the misses of a batch go through the towers, as one
batch. It steps aside (computes everything, stores nothing) whenever a tower is trainable or in training mode,
so it can never return stale features for weights that change.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch

from tinygptv.lru import TensorLRU

log = logging.getLogger(__name__)


def pixel_key(pixels: torch.Tensor) -> tuple:
    """A key for one image's ``[3, S, S]`` pixels: content hash, shape, dtype and the autocast state (which changes
    the towers' output)."""
    data = pixels.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy(), digest_size=16).hexdigest()  # no copy of the bytes
    device = pixels.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return digest, tuple(data.shape), str(data.dtype), str(autocast)


class TowerCache:
    """``cache(pixels [N,3,S,S], towers) → [N, Q, H]``, calling ``towers`` only on the images not cached."""

    def __init__(self, modules: list[torch.nn.Module], max_bytes: int):
        self.modules = modules  # the towers whose weights the cached values depend on
        self.lru = TensorLRU(max_bytes=max_bytes)

    def frozen(self) -> bool:
        return all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in self.modules)

    def __call__(self, pixels: torch.Tensor, towers: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if not self.frozen():
            return towers(pixels)
        keys = [pixel_key(p) for p in pixels]
        found = {k: self.lru.get(k) for k in dict.fromkeys(keys)}
        todo = [k for k, v in found.items() if v is None]
        if todo:
            first = [keys.index(k) for k in todo]
            with torch.no_grad():
                fresh = towers(pixels[first])  # [len(todo), Q, H]
            for k, q in zip(todo, fresh.cpu()):
                found[k] = q.clone()  # its own storage: a view would keep the whole batch alive
                self.lru.put(k, found[k])
        device = next(self.modules[0].parameters()).device
        return torch.stack([found[k] for k in keys]).to(device)

    def stats(self) -> dict:
        total = self.lru.hits + self.lru.misses
        return {"tower_cache_hit_rate": self.lru.hits / total if total else 0.0,
                "tower_cache_mb": self.lru.nbytes / 2**20}
