"""Benchmark registry: name → benchmark, plus group names that expand to several benchmarks."""

from __future__ import annotations

from typing import Iterable

from tinygptv.eval.base import Benchmark
from tinygptv.eval.gqa import GQA
from tinygptv.eval.hateful_memes import HatefulMemes
from tinygptv.eval.iconqa import IconQA
from tinygptv.eval.refcoco import SPLITS, refcoco_benchmarks
from tinygptv.eval.vizwiz import VizWiz
from tinygptv.eval.vsr import VSR

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (GQA(), VSR(), IconQA(), VizWiz(), HatefulMemes(),
                                                         *refcoco_benchmarks())}
GROUPS: dict[str, tuple[str, ...]] = {
    **{ds: tuple(f"{ds}_{s}" for s in splits) for ds, splits in SPLITS.items()},
    "table2": ("gqa", "vsr", "iconqa", "vizwiz", "hm"),
    "all": tuple(BENCHMARKS),
}
ALIASES: dict[str, str] = {"hateful_memes": "hm", "iconvqa": "iconqa"}


def valid_names() -> list[str]:
    return sorted(set(BENCHMARKS) | set(GROUPS) | set(ALIASES))


def resolve_benchmarks(names: str | Iterable[str]) -> list[str]:
    """Expand a comma-separated string or a list of names/groups into registry names (order kept, no repeats).

    Raises:
        ValueError: on an unknown name, listing the valid ones.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        item = ALIASES.get(item, item)
        if item in BENCHMARKS:
            expanded: Iterable[str] = (item,)
        elif item in GROUPS:
            expanded = GROUPS[item]
        else:
            raise ValueError(f"unknown benchmark {item!r}; valid: {', '.join(valid_names())}")
        out.extend(n for n in expanded if n not in out)
    if not out:
        raise ValueError(f"no benchmark given; valid: {', '.join(valid_names())}")
    return out


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark called ``name`` (aliases accepted)."""
    resolved = resolve_benchmarks(name)
    if len(resolved) != 1:
        raise ValueError(f"{name!r} is a group of {len(resolved)} benchmarks: {resolved}")
    return BENCHMARKS[resolved[0]]
