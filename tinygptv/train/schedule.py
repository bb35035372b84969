"""Learning-rate schedules of the reference (``minigpt4/common/optims.py``, reference §4.3).

``t`` = global step (epoch · iters_per_epoch + i), ``T`` = max_epoch · iters_per_epoch.

- ``linear_warmup_cosine``: while ``t < warmup_steps``: ``min(init, warmup_lr + (init − warmup_lr)·i/warmup_steps)``
  with ``i`` the *in-epoch* step (upstream's formula); afterwards ``(init − min)·½(1 + cos(π·t/T)) + min`` (the
  cosine spans the whole run, warm-up included).
- ``linear_warmup_step``: epoch 0 warms up the same way; later epochs ``max(min_lr, init·decay_rate^epoch)``.
- ``warmup_every_epoch``: the paper's stage 1 — every epoch restarts the linear warm-up by its in-epoch step.
"""

from __future__ import annotations

import math

from tinygptv.train.config import OptimConfig


def _warmup(o: OptimConfig, i: int) -> float:
    return min(o.init_lr, o.warmup_lr + (o.init_lr - o.warmup_lr) * i / max(o.warmup_steps, 1))


def lr_at(o: OptimConfig, epoch: int, i: int, iters_per_epoch: int, max_epoch: int) -> float:
    """Learning rate at in-epoch step ``i`` of ``epoch``."""
    t = epoch * iters_per_epoch + i
    if o.warmup_every_epoch and i < o.warmup_steps:
        return _warmup(o, i)
    if o.schedule == "linear_warmup_step":
        if epoch == 0 and i < o.warmup_steps:
            return _warmup(o, i)
        return max(o.min_lr, o.init_lr * o.lr_decay_rate ** epoch)
    if t < o.warmup_steps:
        return _warmup(o, i)
    if o.warmup_every_epoch:
        return o.init_lr
    total = max_epoch * iters_per_epoch
    return (o.init_lr - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t / total)) + o.min_lr
