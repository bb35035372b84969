"""``answers.jsonl``: the crash-safe, resumable record of every prediction.

One JSON object per line::

    {"id": "...", "benchmark": "gqa", "image": "gqa/images/n1.jpg", "inputs": {...}, "gt": {...},
     "outputs": {"gen": "raw text", "paper_0": [sum_logprob, n_tokens], ...},
     "prompts": {"gen": "###Human: ..."}, "error": null}

- Appends are flushed and ``fsync``-ed; if the file does not end with a newline (a write cut short), a newline
  is written first so the partial line stays isolated.
- Reading ignores unparsable lines (a partially written last line, with a warning); for a repeated id the
  last complete line wins.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

ANSWERS_FILE = "answers.jsonl"


def read_answers(path: str | Path) -> dict[str, dict[str, Any]]:
    """id → the last complete record of that id (insertion order = first appearance)."""
    path = Path(path)
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    lines = path.read_bytes().split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError("not a record object")
        except (UnicodeDecodeError, ValueError) as exc:
            where = "last line (partially written)" if n == len(lines) else f"line {n}"
            log.warning("%s: ignoring unreadable %s: %s", path, where, exc)
            continue
        records[str(rec["id"])] = rec
    return records


def append_answers(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Append records durably (flush + fsync); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in records]
    if not lines:
        return 0
    needs_newline = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if needs_newline:
            f.write("\n")
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    return len(lines)
