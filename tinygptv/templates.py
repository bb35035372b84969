"""Prompt templates of the four stages and of inference (reference §5, §7.2, §8.2).

A template is data and is saved with every checkpoint (``template.yaml``), so the CLI, API and
evaluation never ask the user which format a model was trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_PROMPT = "<Img><ImageHere></Img>"
TASK_TAGS = ("[vqa]", "[caption]", "[refer]", "[identify]", "[grounding]", "[detection]")


@dataclass(frozen=True)
class ChatTemplate:
    """How one user turn is written and how answers end.

    ``user_format`` wraps an instruction (``{}``); ``end_sym`` is appended to every supervised answer and
    is the stop string at inference; ``stop`` lists further stop strings.
    """

    name: str
    user_format: str
    end_sym: str
    stop: tuple[str, ...] = ()
    trailing_space: bool = True  # the datasets' "<Img><ImageHere></Img> {text} " (the eval wrapper has none)

    def instruction(self, text: str, with_image: bool) -> str:
        """The dataset-side instruction: ``"<Img><ImageHere></Img> {text} "`` (trailing space as upstream)."""
        if not with_image:
            return text
        return f"{IMAGE_PROMPT} {text}" + (" " if self.trailing_space else "")

    def user_turn(self, text: str, with_image: bool) -> str:
        return self.user_format.format(self.instruction(text, with_image))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in (self.end_sym.strip() or None, *self.stop) if s)

    def to_yaml(self, path: str | Path) -> None:
        data = asdict(self)
        data["stop"] = list(self.stop)
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ChatTemplate":
        data = yaml.safe_load(Path(path).read_text())
        unknown = set(data) - {"name", "user_format", "end_sym", "stop", "trailing_space"}
        if unknown:
            raise ValueError(f"{path}: unknown template key(s) {sorted(unknown)}")
        data["stop"] = tuple(data.get("stop", ()))
        return cls(**data)


TEMPLATES: dict[str, ChatTemplate] = {
    # stages 1-2: no prompt; the condition is just the image tokens; captions end with "\n"
    "pretrain": ChatTemplate("pretrain", "{}", "\n"),
    # stage 3 (MiniGPT-4 alignment) and the benchmark evaluation wrapper (CONV_VISION_minigptv2)
    "stage3": ChatTemplate("stage3", "###Human: {} ###Assistant: ", "###"),
    # stage 4 (MiniGPT-v2 chat template, no <s> text for Phi)
    "stage4": ChatTemplate("stage4", "[INST] {} [/INST]", "###"),
    # the benchmark evaluation wrapper of upstream (CONV_VISION_minigptv2): "###Human: <Img><ImageHere></Img> {q}###Assistant: "
    "eval": ChatTemplate("eval", "###Human: {}###Assistant: ", "###", trailing_space=False),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; valid: {sorted(TEMPLATES)}")
    return TEMPLATES[name]
