"""Multi-turn chat state over the engine, laid out like the training conversations (reference §5.6):

    user_format(<Img><ImageHere></Img> q1) a1<end> <BOS> user_format(q2) a2<end> <BOS> user_format(q3) …

Images belong to the turn they were added in. When the conversation no longer fits the model's context
(minus room for the answer), the oldest turns are dropped with a warning; their images move to the next
kept turn so the model still sees them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

from tinygptv.image import ImageInput
from tinygptv.infer.engine import Engine, Request
from tinygptv.infer.generate import GenerationConfig
from tinygptv.model.sequence import Example

log = logging.getLogger(__name__)


@dataclass
class Turn:
    question: str
    images: list[ImageInput] = field(default_factory=list)
    answer: str | None = None


class Conversation:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.turns: list[Turn] = []
        self.pending_images: list[ImageInput] = []
        self.dropped = 0

    def add_image(self, image: ImageInput) -> None:
        """Attach an image to the next question."""
        self.engine.image_embeddings([image])  # validate (and cache) now: a bad image fails here, not mid-answer
        self.pending_images.append(image)

    def reset(self) -> None:
        self.turns, self.pending_images, self.dropped = [], [], 0

    def request(self, turns: list[Turn]) -> Request:
        tpl = self.engine.template
        first, rest = turns[0], turns[1:]
        targets: list[tuple[str, bool]] = []
        bos_before = []
        if first.answer is not None:
            targets.append((first.answer + tpl.end_sym, False))
        for t in rest:
            bos_before.append(len(targets))
            targets.append((tpl.user_turn(t.question, bool(t.images)), False))
            if t.answer is not None:
                targets.append((t.answer + tpl.end_sym, False))
        images = [im for t in turns for im in t.images]
        return Request(Example(tpl.user_turn(first.question, bool(first.images)), targets, tuple(bos_before)), images)

    def _fit(self, max_new_tokens: int) -> list[Turn]:
        """The most recent turns whose prompt leaves ``max_new_tokens`` positions free."""
        limit = self.engine.model.cfg.lm.max_position_embeddings - max_new_tokens
        turns = list(self.turns)
        while True:
            length = self.engine.prompt_embeddings(self.request(turns))[0].shape[0]
            if length <= limit:
                return turns
            if len(turns) == 1:
                raise ValueError(f"the question alone is {length} tokens; at most {limit} fit with "
                                 f"{max_new_tokens} new tokens")
            dropped = turns.pop(0)
            turns[0] = Turn(turns[0].question, dropped.images + turns[0].images, turns[0].answer)
            self.dropped += 1
            log.warning("conversation too long for the context: dropped the oldest turn (%d dropped so far)",
                        self.dropped)

    def ask(self, question: str, cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Stream the answer to ``question`` (text deltas); the turn is recorded when the stream ends."""
        cfg = cfg or GenerationConfig()
        self.turns.append(Turn(question, self.pending_images))
        self.pending_images = []
        try:
            turns = self._fit(cfg.max_new_tokens)
        except ValueError:
            self.turns.pop()
            raise
        self.turns = turns
        parts = []
        for delta in self.engine.stream(self.request(turns), cfg):
            parts.append(delta)
            yield delta
        self.turns[-1].answer = "".join(parts)
