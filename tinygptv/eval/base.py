"""Benchmark plumbing: samples, requests, the upstream prompt wrapper and text post-processing, scoring skeleton.

A benchmark turns its *published* annotation file into :class:`Sample` objects (``load``), says which model
calls each sample needs (``requests``: generations and/or log-likelihoods, per scoring mode) and scores the
stored answer records (``score``). Everything a scorer needs — inputs, ground truth, raw model outputs — is in
the answer record, so scoring runs offline from ``answers.jsonl`` alone.

Failures (missing image, malformed annotation record, a prediction that raised, an output a mode needs but the
answers file lacks) stay in every denominator: they score 0 and are listed with their ids.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

log = logging.getLogger(__name__)

MODES = ("paper", "standard")
Scored = list[tuple[dict[str, Any], dict[str, float] | None]]  # (answer record, per-record values or None)

# TinyGPT-V eval wrapper: CONV_VISION_minigptv2 via prepare_texts (evaluation.md §1, official reference §7.2):
# system "", sep "###", roles "Human: "/"Assistant: " → no space before the 2nd "###", one trailing space.
PAPER_WRAPPER = "###Human: <Img><ImageHere></Img> {}###Assistant: "
# The literal used for IconQA candidate ranking (multi_select): spaces around "###" (evaluation.md §3.3).
PAPER_MULTI_SELECT_WRAPPER = "###Human: <Img><ImageHere></Img> {} ###Assistant: "
PAPER_MAX_NEW_TOKENS = 20  # eval_configs/benchmark_evaluation.yaml, every benchmark
VQA_SHORT_ANSWER = "[vqa] Based on the image, respond to this question with a short answer: {}"


def paper_prompt(instruction: str) -> str:
    """The byte-exact upstream evaluation prompt around an instruction."""
    return PAPER_WRAPPER.format(instruction)


def upstream_cleanup(text: str) -> str:
    """Post-processing inside upstream ``MiniGPTBase.generate`` after decoding (Llama-2 leftovers kept):
    cut at ``</s>``, delete ``<s>``, keep the text after the last ``[/INST]``, strip."""
    return text.split("</s>")[0].replace("<s>", "").split("[/INST]")[-1].strip()


def cut_turn(text: str) -> str:
    """Upstream VizWiz / Hateful Memes trimming: text before the first ``###``, after the last ``Assistant:``."""
    return text.split("###")[0].split("Assistant:")[-1].strip()


def standard_answer(text: str) -> str:
    """``standard`` mode always truncates a generation at the first ``###`` (evaluation.md §1)."""
    return upstream_cleanup(text).split("###")[0].strip()


class MalformedRecord(ValueError):
    """An annotation record lacks a field or has one of the wrong type."""


@dataclass
class Sample:
    """One evaluation item.

    Attributes:
        id: stable, unique within the benchmark (annotation id, or file position when the layout has none).
        image: image path relative to the data root, or ``None``.
        inputs: what the prompts are built from (question, caption, choices…).
        gt: ground truth, everything the scorers need.
        error: why the item cannot be predicted (missing image, malformed record); it then scores 0.
    """

    id: str
    image: str | None
    inputs: dict[str, Any] = field(default_factory=dict)
    gt: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Request:
    """One model call a sample needs. ``key`` names its output in the answer record."""

    key: str
    kind: Literal["generate", "loglikelihood"]
    prompt: str
    continuation: str | None = None
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS


def require(raw: dict, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """``raw[key]``, raising :class:`MalformedRecord` when absent or of the wrong type."""
    if not isinstance(raw, dict):
        raise MalformedRecord(f"record is a {type(raw).__name__}, not an object")
    if key not in raw or raw[key] is None:
        raise MalformedRecord(f"missing field {key!r}")
    value = raw[key]
    if kind is not None and not isinstance(value, kind):
        raise MalformedRecord(f"field {key!r} has type {type(value).__name__}")
    return value


def read_json_or_jsonl(path: Path) -> list[Any]:
    """A JSON array / object, or JSON lines; an unparsable JSON line becomes ``{"__malformed__": reason}``."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    rows: list[Any] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            rows.append({"__malformed__": f"line {n}: {exc.msg}"})
    return rows


def first_existing(root: Path, candidates: Iterable[str]) -> str:
    """The first candidate (relative to ``root``) that is a file, else the first candidate."""
    candidates = list(candidates)
    for rel in candidates:
        if (root / rel).is_file():
            return rel
    return candidates[0]


class Benchmark(ABC):
    """Base class: subclasses set the class attributes and implement the abstract methods."""

    name: str = ""
    title: str = ""
    paper_key: str | None = None  # column of the paper's Table 2, if it reports this benchmark
    annotation_candidates: tuple[str, ...] = ()  # relative to the data root, first existing wins
    layout: str = ""  # human description of the expected files (shown in errors and docs)

    # ------------------------------------------------------------------------------------------- loading
    def annotation_path(self, data_root: Path) -> Path:
        for rel in self.annotation_candidates:
            if (data_root / rel).is_file():
                return data_root / rel
        raise FileNotFoundError(f"{self.name}: no annotation file under {data_root}; expected one of "
                                f"{list(self.annotation_candidates)} ({self.layout})")

    def load(self, data_root: str | Path) -> list[Sample]:
        """All samples in file order; malformed records and missing images become failing samples."""
        root = Path(data_root)
        path = self.annotation_path(root)
        samples: list[Sample] = []
        seen: dict[str, int] = {}
        for index, raw in self.raw_records(path):
            try:
                if isinstance(raw, dict) and "__malformed__" in raw:
                    raise MalformedRecord(raw["__malformed__"])
                sample = self.parse(index, raw, root)
            except MalformedRecord as exc:
                sample = Sample(id=self.fallback_id(index, raw), image=None, error=f"malformed record: {exc}")
            if sample.error is None and sample.image is not None and not (root / sample.image).is_file():
                sample.error = f"missing image: {sample.image}"
            if sample.id in seen:
                seen[sample.id] += 1
                sample.id = f"{sample.id}#{seen[sample.id]}"
            else:
                seen[sample.id] = 0
            samples.append(sample)
        bad = [s for s in samples if s.error]
        if bad:
            log.warning("%s: %d of %d records cannot be predicted (first: %s: %s)", self.name, len(bad),
                        len(samples), bad[0].id, bad[0].error)
        return samples

    def raw_records(self, path: Path) -> Iterable[tuple[str, Any]]:
        """``(index, raw record)`` pairs; the default reads a JSON list or JSON lines."""
        return ((str(i), raw) for i, raw in enumerate(read_json_or_jsonl(path)))

    def fallback_id(self, index: str, raw: Any) -> str:
        """The id of a record that could not be parsed: its own id field if readable, else its position."""
        return f"#{index}"

    @abstractmethod
    def parse(self, index: str, raw: Any, root: Path) -> Sample:
        """One annotation record → :class:`Sample` (raise :class:`MalformedRecord` on bad records)."""

    # ------------------------------------------------------------------------------------------- predicting
    @abstractmethod
    def requests(self, inputs: dict[str, Any], mode: str) -> list[Request]:
        """The model calls one sample needs for ``mode`` (``paper`` or ``standard``)."""

    def all_requests(self, inputs: dict[str, Any], modes: Iterable[str]) -> list[Request]:
        out: dict[str, Request] = {}
        for mode in modes:
            for req in self.requests(inputs, mode):
                out.setdefault(req.key, req)
        return list(out.values())

    # ------------------------------------------------------------------------------------------- scoring
    @abstractmethod
    def score_record(self, record: dict[str, Any], mode: str) -> dict[str, float]:
        """Per-record values: keys starting with ``n_`` are counts (summed), the others are averaged ×100
        over all records, failures contributing 0."""

    def metric_names(self, mode: str) -> tuple[str, ...]:
        """The averaged metrics of ``mode`` (first = the headline metric)."""
        return ("accuracy",)

    def count_names(self, mode: str) -> tuple[str, ...]:
        return ()

    def score(self, records: list[dict[str, Any]], mode: str) -> dict[str, Any]:
        """Score answer records in ``mode``; every record counts, failures included."""
        if mode not in MODES:
            raise ValueError(f"unknown scoring mode {mode!r}; valid: {list(MODES)}")
        scored: Scored = []
        failures = []
        for rec in records:
            reason = rec.get("error")
            if not reason:
                needed = [r.key for r in self.requests(rec.get("inputs", {}), mode)]
                missing = [k for k in needed if k not in rec.get("outputs", {})]
                if missing:
                    reason = f"no prediction for {missing[:3]}{' …' if len(missing) > 3 else ''}"
            if reason:
                failures.append({"id": rec["id"], "error": reason})
                scored.append((rec, None))
            else:
                scored.append((rec, self.score_record(rec, mode)))
        metrics = self.aggregate(scored, mode)
        return {"n": len(records), "n_failed": len(failures), "metrics": metrics, "failures": failures}

    def aggregate(self, scored: Scored, mode: str) -> dict[str, Any]:
        """Mean metrics ×100 over every record (failures count 0) and summed counts."""
        n = len(scored)
        out: dict[str, Any] = {}
        for name in self.metric_names(mode):
            total = sum(v.get(name, 0.0) for _, v in scored if v is not None)
            out[name] = 100.0 * total / n if n else None
        for name in self.count_names(mode):
            out[name] = int(sum(v.get(name, 0) for _, v in scored if v is not None))
        return out


__all__ = ["Benchmark", "Scored", "Sample", "Request", "MalformedRecord", "MODES", "PAPER_WRAPPER",
           "PAPER_MULTI_SELECT_WRAPPER",
           "PAPER_MAX_NEW_TOKENS", "VQA_SHORT_ANSWER", "paper_prompt", "upstream_cleanup", "cut_turn",
           "standard_answer", "require", "read_json_or_jsonl", "first_existing"]
