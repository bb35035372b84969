"""Hateful Memes, dev_seen (500 memes) (evaluation.md §3.5; official reference §7.3).

Layout (``DATA_ROOT/hm/``)::

    dev_seen.jsonl (or dev.jsonl, the same 500 memes)   lines {id, img: "img/42953.png", label: 0/1, text}
    img/*.png                                           the ``img`` field is relative to ``hm/``

Paper mode (``eval_scripts/eval_vqa.py``): prompt ``This is an image writting '{text}'. Is this image hateful?
Answer yes or no. Answer:`` (no task tag; typo verbatim). The answer is cut at ``###`` and after ``Assistant:``.
Quirks kept: ``yes`` anywhere in ``answer.lower()`` → 1, elif ``no`` anywhere → 0 (``not``, ``know``,
``nothing`` count as no; ``"I don't know"`` is a "no"), else unmatched (scored wrong, ``n_unmatched``).

Standard mode (same prompt): the probability of "hateful" is ``P(yes) = softmax([lp_yes, lp_no])[0]`` from the
log-likelihoods of the continuations ``"yes"`` and ``"no"`` — no leading space, because the prompt already ends
with ``"Assistant: "`` and upstream tokenises answers separately; no end symbol, so with the Phi-2 vocabulary
(one token each) this is exactly the next-token comparison. Reported:

- ``accuracy``: predict hateful iff ``P(yes) > 0.5`` (a tie predicts not hateful);
- ``auroc``: Mann–Whitney AUROC of ``P(yes)`` (ties 0.5). A failed item with a known label gets the worst
  score for its class (1 if not hateful, 0 if hateful), so failures lower the AUROC instead of vanishing;
- ``accuracy_generation``: word-level yes/no extraction of the generation (both/neither → wrong, counted in
  ``n_unparsable``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinygptv.eval.base import (Benchmark, MalformedRecord, Request, Sample, Scored, cut_turn, paper_prompt, require,
                                standard_answer, upstream_cleanup)
from tinygptv.eval.metrics import NO_WORDS, YES_WORDS, auroc, extract_polarity, p_yes

HM_INSTRUCTION = "This is an image writting '{}'. Is this image hateful? Answer yes or no. Answer:"
YES_CONTINUATION = "yes"
NO_CONTINUATION = "no"


class HatefulMemes(Benchmark):
    name = "hm"
    title = "Hateful Memes (dev_seen)"
    paper_key = "hm"
    annotation_candidates = ("hm/dev_seen.jsonl", "hm/dev.jsonl")
    layout = "hm/dev_seen.jsonl (or dev.jsonl) + hm/img/<id>.png"

    def fallback_id(self, index: str, raw: Any) -> str:
        if isinstance(raw, dict) and raw.get("id") is not None:
            return str(raw["id"])
        return f"#{index}"

    def parse(self, index: str, raw: Any, root: Path) -> Sample:
        ident = require(raw, "id", (int, str))
        img = require(raw, "img", str)
        text = require(raw, "text", str)
        label = require(raw, "label", (int, bool))
        if int(label) not in (0, 1):
            raise MalformedRecord(f"label {label!r} is not 0/1")
        return Sample(id=str(ident), image=f"hm/{img}", inputs={"text": text}, gt={"label": int(label)})

    def requests(self, inputs: dict[str, Any], mode: str) -> list[Request]:
        prompt = paper_prompt(HM_INSTRUCTION.format(inputs["text"]))
        gen = Request("gen", "generate", prompt)
        if mode == "paper":
            return [gen]
        return [gen, Request("ll_yes", "loglikelihood", prompt, YES_CONTINUATION),
                Request("ll_no", "loglikelihood", prompt, NO_CONTINUATION)]

    def score_record(self, record: dict[str, Any], mode: str) -> dict[str, float]:
        outputs = record["outputs"]
        label = record["gt"]["label"]
        if mode == "paper":
            answer = cut_turn(upstream_cleanup(outputs["gen"])).lower()
            pred = 1 if "yes" in answer else 0 if "no" in answer else None
            return {"accuracy": float(pred == label), "n_unmatched": float(pred is None)}
        prob = p_yes(outputs["ll_yes"][0], outputs["ll_no"][0])
        word = extract_polarity(standard_answer(outputs["gen"]), YES_WORDS, NO_WORDS)
        return {"accuracy": float(int(prob > 0.5) == label), "p_yes": prob,
                "accuracy_generation": float(word == label), "n_unparsable": float(word is None)}

    def metric_names(self, mode: str) -> tuple[str, ...]:
        return ("accuracy",) if mode == "paper" else ("accuracy", "accuracy_generation")

    def count_names(self, mode: str) -> tuple[str, ...]:
        return ("n_unmatched",) if mode == "paper" else ("n_unparsable",)

    def aggregate(self, scored: Scored, mode: str) -> dict[str, Any]:
        out = super().aggregate(scored, mode)
        if mode == "standard":
            scores, labels, unknown = [], [], 0
            for rec, values in scored:
                label = (rec.get("gt") or {}).get("label")
                if label not in (0, 1):
                    unknown += 1
                    continue
                scores.append(values["p_yes"] if values else float(1 - label))
                labels.append(label)
            value = auroc(scores, labels)
            out["auroc"] = 100.0 * value if value is not None else None
            out["n_excluded_from_auroc"] = unknown
        return out
