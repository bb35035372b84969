"""IconQA, multi-text-choice (``choose_txt``) sub-task, val split (evaluation.md §3.3; official reference §7.3).

Layout (``DATA_ROOT/iconqa/``), either of::

    choose_txt_val.json                 MiniGPT-v2 list [{image_id: pid, question, choices: [str], answer: int}]
    problems.json + pid_splits.json     official IconQA: pid → {question, choices, answer, ques_type, …} and
                                        {"choose_txt_val": [pid, …]}
    val/choose_txt/{pid}/image.png      images (or iconqa/val/choose_txt/{pid}/image.png, the official zip)

Scoring is likelihood ranking; the choices are **not** shown to the model. The prompt is
``###Human: <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short answer:
{question} ###Assistant: `` (the ``multi_select`` literal: spaces around ``###``), laid out like the training
forward (BOS first), and each candidate is scored by the **mean** token NLL of its continuation.

Paper mode (``eval_scripts/eval_vqa.py`` + ``MiniGPTBase.multi_select``). Quirks kept:

- candidates are ``'_'.join(choices).split('_')``: a choice containing ``_`` becomes several candidates, shifting
  the indices of the later ones, while the gold index is compared unchanged (``n_split_changed`` counts items);
- the continuation is ``candidate + '\\n'``: the eval config sets no ``end_sym``, so MiniGPT-v2's default ``'\\n'``
  applies (training used ``###``);
- prediction = argmin of the mean NLL; ties go to the lowest index (a stable sort; upstream's CUDA argsort
  leaves ties unspecified).

``accuracy_root_script`` is the top-level ``eval_vqa.py`` variant, which splits on ``|`` so every question has
one candidate: it measures the share of questions whose gold answer is option 0 (no model needed).

Standard mode (same prompt): the original choices (no ``_`` splitting), continuation ``choice + '###'`` (the
training ``end_sym``), mean NLL, argmin with ties to the lowest index. ``accuracy_sum`` ranks by summed NLL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tinygptv.eval.base import (Benchmark, MalformedRecord, PAPER_MULTI_SELECT_WRAPPER, Request, Sample,
                                VQA_SHORT_ANSWER, first_existing, require)

PAPER_END_SYM = "\n"
STANDARD_END_SYM = "###"


def paper_candidates(choices: list[str]) -> list[str]:
    """Upstream's candidate list: the choices joined with ``_`` and split on ``_``."""
    return "_".join(choices).split("_")


def argmin_first(values: list[float]) -> int:
    """Index of the smallest value; the lowest index wins ties."""
    return min(range(len(values)), key=lambda i: (values[i], i))


class IconQA(Benchmark):
    name = "iconqa"
    title = "IconQA (choose_txt, val)"
    paper_key = "iconqa"
    annotation_candidates = ("iconqa/choose_txt_val.json", "iconqa/problems.json")
    layout = ("iconqa/choose_txt_val.json (or problems.json + pid_splits.json) + "
              "iconqa/val/choose_txt/<pid>/image.png")

    def raw_records(self, path: Path) -> Iterable[tuple[str, Any]]:
        data = json.loads(path.read_text(encoding="utf-8"))
        if path.name == "problems.json":
            splits_path = path.with_name("pid_splits.json")
            if not splits_path.is_file():
                raise FileNotFoundError(f"{splits_path}: needed with {path.name} (key 'choose_txt_val')")
            pids = json.loads(splits_path.read_text(encoding="utf-8")).get("choose_txt_val")
            if not isinstance(pids, list):
                raise ValueError(f"{splits_path}: no 'choose_txt_val' list")
            return ((str(i), {**data[pid], "image_id": pid} if isinstance(data.get(pid), dict) else
                     {"__malformed__": f"pid {pid} not in problems.json", "image_id": pid})
                    for i, pid in enumerate(pids))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list")
        return ((str(i), raw) for i, raw in enumerate(data))

    def fallback_id(self, index: str, raw: Any) -> str:
        if isinstance(raw, dict) and raw.get("image_id") is not None:
            return str(raw["image_id"])
        return f"#{index}"

    def parse(self, index: str, raw: Any, root: Path) -> Sample:
        pid = str(require(raw, "image_id", (str, int)))
        question = require(raw, "question", str)
        choices = require(raw, "choices", list)
        answer = require(raw, "answer", int)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise MalformedRecord("'choices' must be a non-empty list of strings")
        if not 0 <= answer < len(choices):
            raise MalformedRecord(f"answer index {answer} out of range for {len(choices)} choices")
        image = first_existing(root, (f"iconqa/val/choose_txt/{pid}/image.png",
                                      f"iconqa/iconqa/val/choose_txt/{pid}/image.png"))
        return Sample(id=pid, image=image, inputs={"question": question, "choices": choices}, gt={"answer": answer})

    def requests(self, inputs: dict[str, Any], mode: str) -> list[Request]:
        prompt = PAPER_MULTI_SELECT_WRAPPER.format(VQA_SHORT_ANSWER.format(inputs["question"]))
        if mode == "paper":
            return [Request(f"paper_{i}", "loglikelihood", prompt, cand + PAPER_END_SYM)
                    for i, cand in enumerate(paper_candidates(inputs["choices"]))]
        return [Request(f"std_{i}", "loglikelihood", prompt, choice + STANDARD_END_SYM)
                for i, choice in enumerate(inputs["choices"])]

    def score_record(self, record: dict[str, Any], mode: str) -> dict[str, float]:
        outputs = record["outputs"]
        gold = record["gt"]["answer"]
        choices = record["inputs"]["choices"]
        if mode == "paper":
            n = len(paper_candidates(choices))
            mean_nll = [_mean_nll(outputs[f"paper_{i}"]) for i in range(n)]
            return {"accuracy": float(argmin_first(mean_nll) == gold), "accuracy_root_script": float(gold == 0),
                    "n_split_changed": float(n != len(choices))}
        mean_nll = [_mean_nll(outputs[f"std_{i}"]) for i in range(len(choices))]
        sum_nll = [-outputs[f"std_{i}"][0] for i in range(len(choices))]
        return {"accuracy": float(argmin_first(mean_nll) == gold), "accuracy_sum": float(argmin_first(sum_nll) == gold)}

    def metric_names(self, mode: str) -> tuple[str, ...]:
        return ("accuracy", "accuracy_root_script") if mode == "paper" else ("accuracy", "accuracy_sum")

    def count_names(self, mode: str) -> tuple[str, ...]:
        return ("n_split_changed",) if mode == "paper" else ()


def _mean_nll(output: list[float]) -> float:
    """A stored log-likelihood output is ``[sum log-prob, n continuation tokens]``."""
    logprob, n_tokens = output
    return -logprob / max(int(n_tokens), 1)
