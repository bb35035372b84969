"""``results.json`` / ``results.md``: our scores next to the paper's Table 2."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tinygptv.eval.paper_numbers import PAPER_SOURCES, paper_numbers

MAX_FAILURES_SHOWN = 10

MODE_NOTES = (
    "- **paper** reproduces TinyGPT-V's `eval_scripts/eval_vqa.py` / `eval_ref.py`: the `###Human: <Img><ImageHere>"
    "</Img> {instruction}###Assistant: ` prompt, greedy decoding of 20 new tokens without BOS and without a stop "
    "string, and the upstream matching rules with their quirks (substring matches, untrimmed GQA/VSR text, "
    "VizWiz `_` splitting, IconQA `_` candidate splitting, RefCOCO +1-pixel IoU > 0.5).\n"
    "- **standard** uses the same prompts and generations, with community metrics: generations cut at `###`; "
    "VQA normalisation + exact match (GQA); 10-choose-9 VQA accuracy (VizWiz); word-level yes/no extraction "
    "(VSR); P(yes) from the log-likelihoods of `yes`/`no` for accuracy and AUROC (HM); mean-NLL ranking of the "
    "original choices + `###` (IconQA); tolerant box parsing, continuous IoU ≥ 0.5 (RefCOCO).\n"
    "- Every item counts: missing images, malformed records and failed predictions score 0 and are listed.\n"
)


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.1f}"


def _headline(scores: dict[str, Any], mode: str, bench: str) -> str:
    if mode not in scores:
        return "not run"
    metrics = scores[mode]["metrics"]
    text = _fmt(metrics.get("accuracy"))
    if mode == "standard" and bench == "hm":
        text += f" (AUROC {_fmt(metrics.get('auroc'))})"
    return text


def format_table(results: dict[str, Any]) -> str:
    """The markdown comparison table (also printed by the CLI)."""
    head = ("| Benchmark | Paper T2 (WANT@ICML'24) | Paper T2 (early arXiv) | Ours: paper mode | Ours: standard "
            "| Scored / total | Failures |")
    rows = [head, "|" + "---|" * 7]
    for name, entry in results.get("benchmarks", {}).items():
        paper = paper_numbers(entry.get("paper_key"))
        scores = entry.get("scores", {})
        failed = max((s.get("n_failed", 0) for s in scores.values()), default=0)
        total = entry.get("n_total")
        scored = f"{entry.get('n_selected')} / {total if total is not None else '?'}"
        if entry.get("partial"):
            scored += " (partial)"
        rows.append(f"| {entry.get('title', name)} (`{name}`) | {_fmt(paper['workshop_2024'])} | "
                    f"{_fmt(paper['arxiv_early'])} | {_headline(scores, 'paper', name)} | "
                    f"{_headline(scores, 'standard', name)} | {scored} | {failed} |")
    return "\n".join(rows) + "\n"


def format_markdown(results: dict[str, Any]) -> str:
    lines = ["# TinyGPT-V evaluation", ""]
    lines.append(f"- model: `{results.get('model')}`; predictor: `{json.dumps(results.get('predictor'))}`")
    lines.append(f"- scoring mode: {results.get('mode')}; data root: `{results.get('data_root')}`")
    limit = results.get("limit")
    partial = [n for n, e in results.get("benchmarks", {}).items() if e.get("partial")]
    if limit is not None:
        lines.append(f"- **--limit {limit}: partial run**, only the first {limit} records of each benchmark; "
                     "the numbers are not comparable with the paper")
    elif partial:
        lines.append(f"- **partial run** for {', '.join(partial)}: not every record was scored")
    lines += ["", format_table(results), "Accuracies in %. Paper numbers are TinyGPT-V (Phi-2) rows, quoted from "
              + "; ".join(PAPER_SOURCES.values()) + ". The paper reports no RefCOCO numbers.", "", "## Modes", "",
              MODE_NOTES, "## Details", ""]
    for name, entry in results.get("benchmarks", {}).items():
        lines.append(f"### {entry.get('title', name)} (`{name}`)")
        lines.append("")
        lines.append(f"answers: `{entry.get('answers')}`; records scored: {entry.get('n_selected')} of "
                     f"{entry.get('n_total') if entry.get('n_total') is not None else 'unknown'}")
        for mode, score in entry.get("scores", {}).items():
            metrics = ", ".join(f"{k} {_fmt(v) if isinstance(v, float) else v}"
                                for k, v in score["metrics"].items() if not isinstance(v, dict))
            lines.append(f"- {mode}: {metrics} (n={score['n']}, failures={score['n_failed']})")
            for k, v in score["metrics"].items():
                if isinstance(v, dict):
                    lines.append(f"  - {k}: " + ", ".join(f"{kk} {_fmt(vv)}" for kk, vv in v.items()))
        failures = _failures(entry)
        if failures:
            lines.append(f"- failures ({len(failures)}):")
            for f in failures[:MAX_FAILURES_SHOWN]:
                lines.append(f"  - `{f['id']}`: {f['error']}")
            if len(failures) > MAX_FAILURES_SHOWN:
                lines.append(f"  - … {len(failures) - MAX_FAILURES_SHOWN} more in results.json")
        lines.append("")
    return "\n".join(lines)


def _failures(entry: dict[str, Any]) -> list[dict[str, str]]:
    seen: dict[str, str] = {}
    for score in entry.get("scores", {}).values():
        for f in score.get("failures", []):
            seen.setdefault(f["id"], f["error"])
    return [{"id": k, "error": v} for k, v in seen.items()]


def write_results(out_dir: str | Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.md`` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out_dir / "results.md", format_markdown(results))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
