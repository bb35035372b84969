"""Typed model configuration: one dataclass per component, composed into :class:`ModelConfig`.

Every dimension is settable. Configs round-trip through YAML (``to_yaml`` / ``from_yaml``) and are saved
next to every checkpoint. Unknown keys are an error that names the key, never silently ignored.

Reference dims: ``shared/reference/tinygptv-official.md`` §1.2 (EVA ViT-g), §1.3 (Q-Former), §1.4
(projections), §1.6 (Phi-2), §2.5 (LoRA).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration is malformed: unknown key, wrong type or inconsistent dimensions."""


@dataclass
class VisionConfig:
    """EVA ViT (LAVIS ``create_eva_vit_g``) followed by ``ln_vision``."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39  # EVA-CLIP-g has 40 blocks; BLIP-2 uses the penultimate one's output
    heads: int = 16
    mlp_dim: int = 6144
    in_channels: int = 3
    ln_eps: float = 1e-6
    ln_vision_eps: float = 1e-5  # plain nn.LayerNorm default in LAVIS; HF BLIP-2 uses 1e-6
    qkv_bias: bool = True  # learned q_bias and v_bias, k bias fixed at zero

    def __post_init__(self) -> None:
        _check_divisible("vision.width", self.width, "vision.heads", self.heads)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size={self.image_size} is not a multiple of vision.patch_size={self.patch_size}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """CLS + patches."""
        return self.grid**2 + 1


@dataclass
class QFormerConfig:
    """Query path of the BLIP-2 Q-Former (BERT-base with cross-attention every ``cross_attention_freq`` layers)."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    num_queries: int = 32
    cross_attention_freq: int = 2
    ln_eps: float = 1e-12

    def __post_init__(self) -> None:
        _check_divisible("qformer.hidden", self.hidden, "qformer.heads", self.heads)


@dataclass
class ProjectorConfig:
    """``llama_proj`` (Q-Former → hidden) then ``llama_proj2`` (hidden → LM), no activation in between."""

    hidden: int = 4096


@dataclass
class LMConfig:
    """Phi decoder with the TinyGPT-V additions (per-head QK LayerNorm, post-attention RMSNorm)."""

    vocab_size: int = 51200
    hidden: int = 2560
    layers: int = 32
    heads: int = 32
    mlp_dim: int = 10240
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    ln_eps: float = 1e-5
    rms_eps: float = 1e-6
    qk_norm: bool = True
    post_attn_norm: bool = True
    resid_dropout: float = 0.1
    embd_dropout: float = 0.0
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: int = 50256

    def __post_init__(self) -> None:
        _check_divisible("lm.hidden", self.hidden, "lm.heads", self.heads)
        if int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ConfigError("lm.partial_rotary_factor * head_dim must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


LORA_TARGETS = ("qkv", "dense", "fc1", "fc2")


@dataclass
class LoRAConfig:
    """LoRA on the LM's linear layers (peft 0.2.0 semantics: y = Wx + b + alpha/r * B A dropout(x))."""

    r: int = 64  # 0 disables LoRA
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["qkv", "dense"])

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"lora.targets has unknown module(s) {bad}; valid: {list(LORA_TARGETS)}")
        if self.r < 0:
            raise ConfigError("lora.r must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.r if self.r else 0.0


class YamlConfig:
    """YAML round trip for the top-level config dataclasses (strict: unknown keys are errors naming them)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path_or_text: str | Path):
        """From a file, or from YAML text."""
        p = Path(path_or_text)
        is_file = (isinstance(path_or_text, Path) or "\n" not in str(path_or_text)) and p.is_file()
        data = yaml.safe_load(p.read_text() if is_file else str(path_or_text))
        if not isinstance(data, dict):
            raise ConfigError(f"{path_or_text}: expected a mapping at the top level")
        return cls.from_dict(data)


@dataclass
class ModelConfig(YamlConfig):
    """The whole TinyGPT-V: vision → Q-Former → two projections → Phi (+LoRA)."""

    name: str = "tinygptv-phi2"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    image_placeholder: str = "<ImageHere>"

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with dotted overrides applied, e.g. ``cfg.replace(**{"lm.layers": 2})``."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return ModelConfig.from_dict(data)


def _check_divisible(a_name: str, a: int, b_name: str, b: int) -> None:
    if b <= 0 or a % b:
        raise ConfigError(f"{a_name}={a} must be a positive multiple of {b_name}={b}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(hint, value, prefix + key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and out != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"unknown config section {part!r} in override {key!r}")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lm.layers=2", "lora.r=0"]`` → ``{"lm.layers": 2, "lora.r": 0}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _phi15_lm() -> LMConfig:
    # microsoft/phi-1_5: 24 layers, hidden 2048, 32 heads (head 64), partial rotary 0.5, mlp 8192
    return LMConfig(hidden=2048, layers=24, heads=32, mlp_dim=8192, partial_rotary_factor=0.5)


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        vision=VisionConfig(image_size=28, patch_size=14, width=32, depth=2, heads=4, mlp_dim=64),
        qformer=QFormerConfig(hidden=32, layers=2, heads=4, mlp_dim=64, num_queries=4),
        projector=ProjectorConfig(hidden=48),
        lm=LMConfig(vocab_size=320, hidden=64, layers=2, heads=4, mlp_dim=128, partial_rotary_factor=0.5,
                    max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        lora=LoRAConfig(r=4, alpha=8.0, dropout=0.0),
    )


def _small() -> ModelConfig:
    """A few-MB model (byte-level vocabulary) for demos and smoke runs on a laptop."""
    return ModelConfig(
        name="small",
        vision=VisionConfig(image_size=224, patch_size=14, width=128, depth=4, heads=4, mlp_dim=512),
        qformer=QFormerConfig(hidden=128, layers=2, heads=4, mlp_dim=512, num_queries=32),
        projector=ProjectorConfig(hidden=256),
        lm=LMConfig(vocab_size=512, hidden=256, layers=4, heads=8, mlp_dim=1024, partial_rotary_factor=0.5,
                    bos_token_id=0, eos_token_id=0, pad_token_id=0),
        lora=LoRAConfig(r=8, alpha=16.0),
    )


PRESETS: dict[str, typing.Callable[[], ModelConfig]] = {
    "tinygptv-phi2": ModelConfig,
    "tinygptv-phi1.5": lambda: ModelConfig(name="tinygptv-phi1.5", lm=_phi15_lm()),
    "small": _small,
    "tiny": _tiny,
}


def preset(name: str) -> ModelConfig:
    """A fresh config of a named preset; unknown names raise with the list of valid ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]()
