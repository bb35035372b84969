"""Conversation-style datasets of stage 4 (no task tag): LLaVA detail / reason / conversation,
multitask conversation, and the text-only Unnatural Instructions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tinygptv.data.processors import blip_caption
from tinygptv.data.readers.base import (AnnotatedImageReader, BadRecord, MapReader, PathLike, Sample, field, ident, read_json,
                                        records_of_list, text)
from tinygptv.model.sequence import multi_turn
from tinygptv.templates import ChatTemplate

HUMAN, GPT = "human", "gpt"


def clean_first_turn(value: str) -> str:
    """The first human turn as upstream uses it: ``<image>`` tags and every newline removed, then stripped."""
    return value.replace("<image>", "").replace("\n", "").strip()


def conversation_turns(rec: Any) -> list[str]:
    """The values of ``rec["conversations"]`` after checking roles alternate human/gpt from a human turn.

    A trailing unanswered human turn is dropped (upstream pairs questions with answers and ignores it).
    """
    conv = field(rec, "conversations", list)
    values = []
    for i, turn in enumerate(conv):
        role = field(turn, "from", str)
        want = HUMAN if i % 2 == 0 else GPT
        if role != want:
            raise BadRecord(f"turn {i} has role {role!r}, expected {want!r}")
        values.append(text(turn, "value"))
    if len(values) % 2:
        values.pop()
    if not values:
        raise BadRecord("no human/gpt turn pair")
    return values


class _LlavaBase(AnnotatedImageReader):
    """LLaVA-format json (``[{id, image, conversations: [{from, value}]}]``); image ``COCO_train2014_{id}.jpg``."""

    def load(self) -> list[Any]:
        return self.collect(records_of_list(self.ann_path, read_json(self.ann_path)),
                            lambda r: [(ident(r, "id"), conversation_turns(r))])

    def image(self, image_id: Any) -> str:
        return str(self.image_root / f"COCO_train2014_{image_id}.jpg")


class LlavaDetailReader(_LlavaBase):
    """LLaVA ``detail_23k.json``: instruction = processed first human turn (no ``<image>``, no newlines),
    answer = first gpt turn, raw."""

    default_name = "llava_detail"

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image_id, turns = entry
        example = self.instruct(blip_caption(clean_first_turn(turns[0])), turns[1])
        return Sample(self.image(image_id), example, {"image_id": image_id})


class LlavaReasonReader(LlavaDetailReader):
    """LLaVA ``complex_reasoning_77k.json``; same templating as :class:`LlavaDetailReader`."""

    default_name = "llava_reason"


class LlavaConversationReader(_LlavaBase):
    """LLaVA ``conversation_58k.json``, multi-turn (§5.6): first question ``<Img><ImageHere></Img> {turn} ``
    (tags/newlines removed), later questions ``{turn} `` raw, answers raw; each answer ends with ``###``."""

    default_name = "llava_conversation"

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image_id, turns = entry
        questions = [self.template.instruction(clean_first_turn(turns[0]), True)]
        questions += [q + " " for q in turns[2::2]]
        example = multi_turn(self.template, questions, turns[1::2])
        return Sample(self.image(image_id), example, {"image_id": image_id})


class MultitaskConversationReader(LlavaConversationReader):
    """``multitask_conversation.json`` (LLaVA structure, images ``COCO_train2014_{id}.jpg``), multi-turn."""

    default_name = "multitask_conversation"


class UnnaturalInstructionReader(MapReader):
    """Text-only ``filtered_unnatural_instruction.json``: ``[{instances: [{instruction_with_input, constraints,
    output}]}]``, ``instances[0]`` only; instruction = ``instruction_with_input + " " + constraints`` (when not
    null), processed; answer = processed ``output`` (lowercased, ≤ 50 words, as upstream)."""

    default_name = "unnatural_instruction"

    def __init__(self, ann_path: PathLike, *, template: ChatTemplate | str | None = None, name: str | None = None):
        self.ann_path = Path(ann_path)
        super().__init__(template=template, name=name)

    def layout(self) -> list[tuple[str, Path, str]]:
        return [("annotation file", self.ann_path, "file")]

    def load(self) -> list[Any]:
        def parse(r: Any) -> list[Any]:
            instances = field(r, "instances", list)
            if not instances:
                raise BadRecord("empty 'instances'")
            inst = instances[0]
            instruction = text(inst, "instruction_with_input")
            constraints = field(inst, "constraints", str, type(None))
            if constraints is not None:
                instruction = instruction + " " + constraints
            return [(instruction, text(inst, "output"))]

        return self.collect(records_of_list(self.ann_path, read_json(self.ann_path)), parse)

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        instruction, output = entry
        return Sample(None, self.instruct(blip_caption(instruction), blip_caption(output), with_image=False), {})
