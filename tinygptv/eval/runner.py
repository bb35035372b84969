"""Two-phase evaluation: predict (→ ``answers.jsonl``, resumable) then score (offline, from the answers alone).

Output folder::

    OUT/<benchmark>/answers.jsonl     one record per item (see :mod:`tinygptv.eval.answers`)
    OUT/results.json                  every metric, counts, failures with ids, settings, paper numbers
    OUT/results.md                    the comparison table with the paper's Table 2
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tinygptv.eval.answers import ANSWERS_FILE, append_answers, read_answers
from tinygptv.eval.base import MODES, Benchmark, Request, Sample
from tinygptv.eval.predictor import Predictor, as_predictor, batched, describe_predictor
from tinygptv.eval.registry import BENCHMARKS, resolve_benchmarks
from tinygptv.eval.report import write_results

log = logging.getLogger(__name__)

MODE_CHOICES = ("paper", "standard", "both")
DEFAULT_BATCH_SIZE = 8


def modes_for(mode: str) -> tuple[str, ...]:
    """``"both"`` → both scoring modes; ``"paper"``/``"standard"`` → that one."""
    if mode == "both":
        return MODES
    if mode in MODES:
        return (mode,)
    raise ValueError(f"unknown mode {mode!r}; valid: {list(MODE_CHOICES)}")


# ------------------------------------------------------------------------------------------------ predict phase
def predict(bench: Benchmark, samples: Sequence[Sample], predictor: Predictor, answers_path: str | Path,
            data_root: str | Path, modes: Sequence[str] = MODES,
            batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, int]:
    """Make sure ``answers_path`` holds every output ``modes`` need for ``samples``; only missing ones are computed.

    Returns counts: ``predicted`` (records written with new outputs), ``skipped`` (already complete),
    ``failed`` (records that could not be predicted: load errors and prediction errors).
    """
    answers_path = Path(answers_path)
    root = Path(data_root)
    existing = read_answers(answers_path)
    stats = {"predicted": 0, "skipped": 0, "failed": 0}
    errors: list[dict[str, Any]] = []
    todo: list[tuple[Sample, list[Request], dict[str, Any]]] = []
    for s in samples:
        rec = existing.get(s.id)
        if s.error:
            stats["failed"] += 1
            if rec is None or rec.get("error") != s.error:
                errors.append(_record(bench, s, {}, {}, s.error))
            continue
        have = dict(rec.get("outputs") or {}) if rec else {}
        missing = [r for r in bench.all_requests(s.inputs, modes) if r.key not in have]
        if missing or (rec and rec.get("error")):
            todo.append((s, missing, have))
        else:
            stats["skipped"] += 1
    append_answers(answers_path, errors)
    if stats["skipped"]:
        log.info("%s: %d records already complete in %s", bench.name, stats["skipped"], answers_path)
    t0, done = time.perf_counter(), 0
    for chunk in batched(todo, batch_size):
        lines = _predict_chunk(bench, list(chunk), predictor, root, batch_size)
        append_answers(answers_path, lines)
        for line in lines:
            stats["failed" if line["error"] else "predicted"] += 1
        done += len(lines)
        log.info("%s: %d/%d predicted (%.1fs)", bench.name, done, len(todo), time.perf_counter() - t0)
    return stats


def _predict_chunk(bench: Benchmark, chunk: list[tuple[Sample, list[Request], dict[str, Any]]],
                   predictor: Predictor, root: Path, batch_size: int) -> list[dict[str, Any]]:
    outputs = [dict(have) for _, _, have in chunk]
    failures: list[str | None] = [None] * len(chunk)
    pending = [(i, req) for i, (_, reqs, _) in enumerate(chunk) for req in reqs]
    image_of = [str(root / s.image) if s.image else None for s, _, _ in chunk]

    gen_groups: dict[int, list[tuple[int, Request]]] = {}
    for i, req in pending:
        if req.kind == "generate":
            gen_groups.setdefault(req.max_new_tokens, []).append((i, req))
    for max_new, group in gen_groups.items():
        for part in batched(group, batch_size):
            results = _call_isolated(
                lambda items, m=max_new: predictor.generate([image_of[i] for i, _ in items],
                                                            [r.prompt for _, r in items], m), list(part))
            _store(part, results, outputs, failures, lambda text: str(text))

    lls = [(i, req) for i, req in pending if req.kind == "loglikelihood"]
    for part in batched(lls, batch_size):
        def call(items: list[tuple[int, Request]]) -> list[list[float]]:
            values = predictor.loglikelihood([(image_of[i], r.prompt, r.continuation) for i, r in items])
            counts = predictor.count_tokens([r.continuation or "" for _, r in items])
            return [[float(v), int(n)] for v, n in zip(values, counts)]
        _store(part, _call_isolated(call, list(part)), outputs, failures, lambda v: v)

    lines = []
    for (s, reqs, _), outs, failure in zip(chunk, outputs, failures):
        line = _record(bench, s, outs, {r.key: r.prompt for r in reqs}, failure)
        if reqs and any(r.kind == "loglikelihood" for r in reqs):
            line["continuations"] = {r.key: r.continuation for r in reqs if r.kind == "loglikelihood"}
        lines.append(line)
    return lines


def _call_isolated(fn: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
    """``fn(items)``; if it raises, each item alone, so one bad item (e.g. a corrupt image) fails by itself."""
    try:
        values = fn(items)
        if len(values) != len(items):
            raise RuntimeError(f"predictor returned {len(values)} results for {len(items)} inputs")
        return list(values)
    except Exception as exc:  # noqa: BLE001 - isolate the failing item, report it in the results
        if len(items) == 1:
            log.warning("prediction failed: %s: %s", type(exc).__name__, exc)
            return [exc]
        log.warning("batch of %d failed (%s: %s); retrying items one by one", len(items), type(exc).__name__, exc)
        return [_call_isolated(fn, [item])[0] for item in items]


def _store(part: Sequence[tuple[int, Request]], results: list[Any], outputs: list[dict[str, Any]],
           failures: list[str | None], convert: Callable[[Any], Any]) -> None:
    for (i, req), value in zip(part, results):
        if isinstance(value, Exception):
            failures[i] = failures[i] or f"prediction failed: {type(value).__name__}: {value}"
        else:
            outputs[i][req.key] = convert(value)


def _record(bench: Benchmark, s: Sample, outputs: dict[str, Any], prompts: dict[str, str],
            error: str | None) -> dict[str, Any]:
    return {"id": s.id, "benchmark": bench.name, "image": s.image, "inputs": s.inputs, "gt": s.gt,
            "outputs": outputs, "prompts": prompts, "error": error}


# ------------------------------------------------------------------------------------------------ score phase
def score_records(bench: Benchmark, records: list[dict[str, Any]], modes: Sequence[str] = MODES) -> dict[str, Any]:
    """Scores of ``records`` per mode (see :meth:`Benchmark.score`)."""
    return {mode: bench.score(records, mode) for mode in modes}


def score_answers(answers_path: str | Path, benchmark: str, mode: str = "both",
                  ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Offline scoring from an answers file alone.

    ``ids`` restricts (and orders) the records; an id without a record counts as a failure.
    """
    bench = BENCHMARKS[resolve_benchmarks(benchmark)[0]]
    stored = read_answers(answers_path)
    if ids is None:
        records = list(stored.values())
    else:
        records = [stored.get(i) or {"id": i, "error": "no answer record (prediction not run or interrupted)"}
                   for i in ids]
    return score_records(bench, records, modes_for(mode))


# ------------------------------------------------------------------------------------------------ run_eval
def run_eval(model_or_predictor: Any, benchmarks: str | Sequence[str], data_root: str | Path, out_dir: str | Path,
             limit: int | None = None, mode: str = "both", batch_size: int = DEFAULT_BATCH_SIZE,
             model_name: str | None = None) -> dict[str, Any]:
    """Predict (resumably) and score ``benchmarks``; write ``results.json`` and ``results.md`` into ``out_dir``.

    Args:
        model_or_predictor: a :class:`Predictor`, or a TinyGPT-V model (wrapped in :class:`ModelPredictor`).
        benchmarks: names or groups (``"gqa,vsr"``, ``["refcoco"]``…); unknown names raise ``ValueError``.
        limit: only the first ``limit`` records of each benchmark (stated as a partial run in the results).
        mode: ``paper``, ``standard`` or ``both``.
    Returns:
        the content of ``results.json``.
    """
    modes = modes_for(mode)
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    names = resolve_benchmarks(benchmarks)
    predictor = as_predictor(model_or_predictor)
    data_root, out_dir = Path(data_root), Path(out_dir)
    loaded = {name: BENCHMARKS[name].load(data_root) for name in names}  # fail fast on missing annotation files
    results: dict[str, Any] = {
        "model": model_name or describe_predictor(predictor).get("model"),
        "predictor": describe_predictor(predictor), "mode": mode, "limit": limit, "data_root": str(data_root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "benchmarks": {},
    }
    for name in names:
        bench = BENCHMARKS[name]
        samples = loaded[name]
        selected = samples if limit is None else samples[:limit]
        answers_path = out_dir / name / ANSWERS_FILE
        log.info("%s: %d of %d records → %s", name, len(selected), len(samples), answers_path)
        stats = predict(bench, selected, predictor, answers_path, data_root, modes, batch_size)
        scores = score_answers(answers_path, name, mode, ids=[s.id for s in selected])
        results["benchmarks"][name] = {
            "title": bench.title, "paper_key": bench.paper_key, "n_total": len(samples), "n_selected": len(selected),
            "partial": len(selected) < len(samples), "answers": str(Path(name) / ANSWERS_FILE),
            "prediction_stats": stats, "scores": scores,
        }
    write_results(out_dir, results)
    return results


def rescore(out_dir: str | Path, benchmarks: str | Sequence[str] | None = None, mode: str = "both") -> dict[str, Any]:
    """Score existing ``OUT/<benchmark>/answers.jsonl`` files again (no model, no data) and rewrite the results.

    Every record in each answers file is scored; the totals of the dataset are not known offline.
    """
    out_dir = Path(out_dir)
    names = resolve_benchmarks(benchmarks) if benchmarks else [n for n in BENCHMARKS
                                                                if (out_dir / n / ANSWERS_FILE).is_file()]
    if not names:
        raise FileNotFoundError(f"{out_dir}: no <benchmark>/{ANSWERS_FILE} to score")
    previous = out_dir / "results.json"
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    results.update({"mode": mode, "rescored": time.strftime("%Y-%m-%dT%H:%M:%S")})
    results.setdefault("benchmarks", {})
    for name in names:
        path = out_dir / name / ANSWERS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
        scores = score_answers(path, name, mode)
        entry = results["benchmarks"].setdefault(name, {})
        n_scored = next(iter(scores.values()))["n"]
        entry.update({"title": BENCHMARKS[name].title, "paper_key": BENCHMARKS[name].paper_key,
                      "answers": str(Path(name) / ANSWERS_FILE), "scores": scores})
        entry["n_selected"] = n_scored
        entry.setdefault("n_total", None)
        entry["partial"] = entry["n_total"] is None or n_scored < entry["n_total"]
    write_results(out_dir, results)
    return results
