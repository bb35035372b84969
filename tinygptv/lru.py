"""A least-recently-used map of keys to tensors, bounded by a number of entries and/or bytes.

Used for image embeddings at inference (:class:`tinygptv.infer.engine.Engine`) and for the frozen towers'
outputs during training (:class:`tinygptv.train.tower_cache.TowerCache`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch


class TensorLRU:
    """``key → tensor``; the least recently used entries go first when a bound is exceeded (``None`` = no bound,
    0 = keep nothing)."""

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: Hashable) -> torch.Tensor | None:
        value = self.items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.max_entries == 0 or (self.max_bytes is not None and size > self.max_bytes):
            return
        old = self.items.pop(key, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        self.items[key] = value
        self.nbytes += size
        while ((self.max_entries is not None and len(self.items) > self.max_entries)
               or (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            _, dropped = self.items.popitem(last=False)
            self.nbytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self.items.clear()
        self.nbytes = 0
