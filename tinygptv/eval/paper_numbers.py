"""The TinyGPT-V paper's Table 2 numbers (accuracy, %), quoted — never recomputed.

Two versions of the paper are in ``shared/reference/paper/``, with different TinyGPT-V rows:

- ``000_bd525c2922465f93.txt``: the WANT@ICML 2024 workshop version. Its Table 2 has the LLaVA-Phi and
  MoE-LLaVA rows that ``evaluation.md`` §4 discusses, so it is the version the evaluation reference compares
  against; it is our primary column.
- ``001_c109aae37f86fa5a.txt``: the earlier arXiv version (named authors, "Grounding" column).

Neither version reports RefCOCO/RefCOCO+/RefCOCOg (the authors promised REC numbers in issue #16). The
baselines (InstructBLIP, BLIP-2, …) used other protocols (vocabulary ranking, beam search, VizWiz test-dev,
HM AUROC; evaluation.md §4) and are kept here for reference only.
"""

from __future__ import annotations

PAPER_SOURCES = {
    "workshop_2024": "TinyGPT-V paper, Table 2, WANT@ICML 2024 version (reference/paper/000_bd525c2922465f93.txt)",
    "arxiv_early": "TinyGPT-V paper, Table 2, earlier arXiv version (reference/paper/001_c109aae37f86fa5a.txt)",
}
BENCHMARK_COLUMNS = ("gqa", "vsr", "iconqa", "vizwiz", "hm")

TINYGPTV_TABLE2: dict[str, dict[str, float]] = {
    "workshop_2024": {"gqa": 38.9, "vsr": 54.7, "iconqa": 44.7, "vizwiz": 37.8, "hm": 54.0},
    "arxiv_early": {"gqa": 33.6, "vsr": 53.2, "iconqa": 43.3, "vizwiz": 24.8, "hm": 53.2},
}
TINYGPTV_PHI15_TABLE2 = {"gqa": 34.3, "vsr": 35.8, "iconqa": 37.2, "vizwiz": 28.4, "hm": 50.3}  # workshop version
BASELINES_TABLE2: dict[str, dict[str, float | None]] = {  # workshop version rows
    "InstructBLIP (13B)": {"gqa": 49.5, "vsr": 52.1, "iconqa": 44.8, "vizwiz": 33.4, "hm": 57.5},
    "BLIP-2 (13B)": {"gqa": 41.0, "vsr": 50.9, "iconqa": 40.6, "vizwiz": 19.6, "hm": 53.7},
    "LLaVA (13B)": {"gqa": 41.3, "vsr": 51.2, "iconqa": 43.0, "vizwiz": None, "hm": None},
    "LLaVA-Phi (2.8B)": {"gqa": None, "vsr": None, "iconqa": 54.1, "vizwiz": 37.6, "hm": None},
    "MoE-LLaVA (1.8Bx4)": {"gqa": 61.5, "vsr": None, "iconqa": None, "vizwiz": 32.6, "hm": None},
}


def paper_numbers(paper_key: str | None) -> dict[str, float | None]:
    """TinyGPT-V (Phi-2) Table 2 values for one benchmark column, per paper version (``None`` if absent)."""
    return {version: (table.get(paper_key) if paper_key else None) for version, table in TINYGPTV_TABLE2.items()}
