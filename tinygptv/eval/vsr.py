"""VSR, zero-shot split, test (evaluation.md §3.2; official reference §7.3).

Layout (``DATA_ROOT/vsr/``)::

    test.jsonl  (or test.json: JSON lines or a JSON list)   rows {image, caption, label (1/0), relation, …}
    images/train2017/{image}, images/val2017/{image}         COCO 2017 (TinyGPT-V's lookup order)
    images/{image}                                           flat (MiniGPT-v2's layout), tried last

Rows carry no id; a row's id is its 0-based position in the file.

Paper mode (``eval_scripts/eval_vqa.py``): prompt ``[vqa] Based on the image, is this statement true or false?
{caption}``; label → ``'true'``/``'false'``. Quirks kept:

- per item +1 if the label is a substring of ``answer.lower()`` **and** +1 more if (label true and ``yes`` in the
  answer) or (label false and ``no`` in the answer): one item can add 2 (``"yes, true"``), so the accuracy can
  exceed 100 %;
- substring tests on the untrimmed 20-token text: ``not``/``know``/``cannot`` count as "no", and ``"not true"``
  is counted correct for *both* labels (``true`` ⊂ it; ``no`` ⊂ ``not``).

``accuracy_root_script`` is the repository's top-level ``eval_vqa.py`` variant (label substring only).

Standard mode (same prompt and generation): cut at ``###``; word-level extraction with {true, yes} → 1 and
{false, no} → 0, a directly preceding negator flipping the word (``not true`` → 0); both or neither → unparsable,
scored wrong and counted in ``n_unparsable``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinygptv.eval.base import Benchmark, MalformedRecord, Request, Sample, first_existing, paper_prompt, require, \
    standard_answer, upstream_cleanup
from tinygptv.eval.metrics import FALSE_WORDS, TRUE_WORDS, extract_polarity

VSR_INSTRUCTION = "[vqa] Based on the image, is this statement true or false? {}"


class VSR(Benchmark):
    name = "vsr"
    title = "VSR (zero-shot test)"
    paper_key = "vsr"
    annotation_candidates = ("vsr/test.jsonl", "vsr/test.json")
    layout = "vsr/test.jsonl + vsr/images/{train2017,val2017}/<image>"

    def parse(self, index: str, raw: Any, root: Path) -> Sample:
        image = require(raw, "image", str)
        caption = require(raw, "caption", str)
        label = require(raw, "label", (int, bool))
        if int(label) not in (0, 1):
            raise MalformedRecord(f"label {label!r} is not 0/1")
        rel = first_existing(root, (f"vsr/images/train2017/{image}", f"vsr/images/val2017/{image}",
                                    f"vsr/images/{image}"))
        return Sample(id=index, image=rel, inputs={"caption": caption},
                      gt={"label": int(label), "label_text": "true" if label == 1 else "false"})

    def requests(self, inputs: dict[str, Any], mode: str) -> list[Request]:
        return [Request("gen", "generate", paper_prompt(VSR_INSTRUCTION.format(inputs["caption"])))]

    def score_record(self, record: dict[str, Any], mode: str) -> dict[str, float]:
        gen = record["outputs"]["gen"]
        gt = record["gt"]
        if mode == "paper":
            answer = upstream_cleanup(gen).lower()
            label = gt["label_text"]
            hit = float(label in answer)
            polar = "yes" if label == "true" else "no"
            extra = float(polar in answer)
            return {"accuracy": hit + extra, "accuracy_root_script": hit, "n_double_counted": float(hit and extra)}
        pred = extract_polarity(standard_answer(gen), TRUE_WORDS, FALSE_WORDS)
        return {"accuracy": float(pred == gt["label"]), "n_unparsable": float(pred is None)}

    def metric_names(self, mode: str) -> tuple[str, ...]:
        return ("accuracy", "accuracy_root_script") if mode == "paper" else ("accuracy",)

    def count_names(self, mode: str) -> tuple[str, ...]:
        return ("n_double_counted",) if mode == "paper" else ("n_unparsable",)
