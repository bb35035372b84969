"""Memory estimate before training (``tinygptv train --dry-run``).

- weights: every parameter at its training dtype (frozen weights in half precision on CUDA with AMP);
- gradients and AdamW state: fp32, trainable parameters only (grad + exp_avg + exp_avg_sq);
- activations kept for backward through the LM (gradients must reach the projections below layer 0):
  per layer ``s·b·h·(34 + 5·a·s/h)`` bytes at 16-bit (Korthikanti et al., 2022), doubled in fp32; with gradient
  checkpointing only each layer's input ``2·s·b·h`` plus one layer's full set; plus fp32 logits and their
  gradient ``2·4·s·b·V``;
- the frozen ViT + Q-Former run without a graph: one layer's transient activations, small next to the rest;
- the frozen towers' output cache (``run.tower_cache_mb``, host memory, at its bound): counted in the total on
  the CPU, shown apart on a GPU.

It is an estimate (allocator overhead and framework buffers come on top; 10 % is added).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tinygptv.config import ModelConfig
from tinygptv.train.config import StageConfig


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    seq_len: int
    batch: int
    tower_cache: int = 0  # host memory
    cache_in_total: bool = False  # True when the device is the CPU

    @property
    def total(self) -> int:
        cache = self.tower_cache if self.cache_in_total else 0
        return int(1.1 * (self.weights + self.gradients + self.optimizer + self.activations + cache))

    def table(self) -> str:
        rows = [("weights", self.weights), ("gradients (fp32, trainable)", self.gradients),
                ("AdamW state (fp32, trainable)", self.optimizer),
                (f"activations (batch {self.batch}, seq {self.seq_len})", self.activations)]
        if self.tower_cache:
            where = "" if self.cache_in_total else ", host RAM, not in the total"
            rows.append((f"frozen-tower cache (at most{where})", self.tower_cache))
        rows.append(("total (+10 %)", self.total))
        return "\n".join(f"  {name:<40} {v / 2**30:8.2f} GiB" for name, v in rows)


def estimate(model_cfg: ModelConfig, model, cfg: StageConfig, device: torch.device) -> MemoryEstimate:
    half = device.type == "cuda" and cfg.run.amp != "none"
    weights = 0
    trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
            weights += 4 * p.numel()
        else:
            weights += (2 if half else p.element_size()) * p.numel()
    batch = max((int(m.get("batch_size", 1)) for m in cfg.data.mixture.values()), default=1)
    lm = model_cfg.lm
    seq = 1 + 32 * 2 + model_cfg.qformer.num_queries + cfg.data.max_txt_len  # BOS + prompt + image + answer
    s, b, h, a = seq, batch, lm.hidden, lm.heads
    per_layer = s * b * h * (34 + 5 * a * s / h) * (1 if cfg.run.amp != "none" else 2)
    if cfg.run.grad_checkpointing:
        acts = lm.layers * 2 * s * b * h + per_layer
    else:
        acts = lm.layers * per_layer
    acts += 2 * 4 * s * b * lm.vocab_size
    frozen = not (cfg.trainable.vision or cfg.trainable.qformer)
    cache = cfg.run.tower_cache_mb * 2**20 if frozen else 0
    return MemoryEstimate(weights, 4 * trainable, 8 * trainable, int(acts), seq, batch, cache, device.type == "cpu")


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device, or ``None`` when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
