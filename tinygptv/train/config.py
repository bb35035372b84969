"""Typed stage configuration (``configs/train/stage{1..4}.yaml``), YAML round trip, dotted overrides.

Decisions on the reference's quirks (§9), defaults = the paper's stated method, upstream reachable by config:

- **LoRA in stage 1** (§9.2): the paper trains LoRA only after stage 1 → ``trainable.lora: false`` in stage 1.
  The adapters exist from the start with B = 0, so a frozen adapter is exactly "no LoRA". Upstream: set
  ``trainable.lora: true``.
- **Stage 1 schedule** (§9.3): the paper describes 17 epochs × 1000 iterations with the learning rate rising
  from 1e-5 to 1e-4 within every epoch → ``optim.warmup_every_epoch: true`` (upstream's "run the 5000-step
  yaml 17 times" restarted its scheduler each run, the same saw-tooth).
- **Stage 4 learning rate** (§9.1): upstream's min_lr 8e-5 > init_lr 1e-5 makes the "cosine decay" rise; the
  paper calls it a decay → default ``min_lr: 1e-6`` (a decay, MiniGPT-v2's value). Upstream: ``optim.min_lr=8e-5``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


from tinygptv.config import ConfigError, YamlConfig, _set_dotted


@dataclass
class Trainable:
    lora: bool = True
    norms: bool = True
    projector: bool = True
    qformer: bool = False
    vision: bool = False
    input_norm: bool = True  # False: the paper's "w/o input LayerNorm" ablation
    lm: bool = False  # the whole LM (nano stage 0 only)


@dataclass
class DataConfig:
    mixture: dict[str, Any] = field(default_factory=dict)  # {name: {batch_size, ratio, paths?, options?}}
    max_txt_len: int = 32
    num_workers: int = 0


@dataclass
class OptimConfig:
    schedule: str = "linear_warmup_cosine"  # or linear_warmup_step
    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 1000
    warmup_every_epoch: bool = False
    lr_decay_rate: float = 1.0  # linear_warmup_step
    weight_decay: float = 0.05
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.schedule not in ("linear_warmup_cosine", "linear_warmup_step"):
            raise ConfigError(f"optim.schedule {self.schedule!r}: use linear_warmup_cosine or linear_warmup_step")


@dataclass
class RunConfig:
    max_epoch: int = 1
    iters_per_epoch: int = 100
    accum_grad_iters: int = 1
    clip_grad_norm: float = 0.0  # 0 = off (upstream has none)
    amp: str = "none"  # none | bf16 | fp16 (fp16 needs CUDA; uses a GradScaler) | auto (bf16 where it is fast)
    grad_checkpointing: bool = False
    seed: int = 42
    save_every: int = 0  # steps; 0 = at the end of every epoch
    log_every: int = 10
    max_nonfinite: int = 10  # consecutive non-finite losses before stopping
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda
    tower_cache_mb: int = 1024  # frozen ViT + Q-Former outputs kept per image, on the CPU (0 = off)

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16", "fp16", "auto"):
            raise ConfigError(f"run.amp {self.amp!r}: use none, bf16, fp16 or auto")

    @property
    def total_steps(self) -> int:
        return self.max_epoch * self.iters_per_epoch


@dataclass
class StageConfig(YamlConfig):
    stage: str = "stage"
    init: str = ""  # checkpoint folder or preset the stage starts from (the recipe chains stages)
    model: dict[str, Any] = field(default_factory=dict)  # dotted ModelConfig overrides, e.g. vision.image_size
    template: str = "pretrain"
    trainable: Trainable = field(default_factory=Trainable)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def with_overrides(self, overrides: dict[str, Any]) -> "StageConfig":
        data = dataclasses.asdict(self)
        for key, value in overrides.items():
            if key.startswith("model."):  # ModelConfig overrides are kept as flat dotted keys
                data["model"][key[len("model."):]] = value
            elif key.startswith("data.mixture."):  # free-form nested mapping
                _set_nested(data["data"]["mixture"], key[len("data.mixture."):].split("."), value)
            else:
                _set_dotted(data, key, value)
        return StageConfig.from_dict(data)


def _set_nested(node: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
