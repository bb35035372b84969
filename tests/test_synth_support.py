"""Shared helpers of the synthetic-world tests: one small generated world per test session, the scene of an
image, an oracle / wrong predictor answering from ``eval/meta.json``; plus the CLI tests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from tinygptv.synth import generate_world
from tinygptv.synth.cli import add_synth_parser, cmd_synth
from tinygptv.synth.world import Scene

SCALE, EVAL_SIZE, SEED = 0.06, 16, 7
_WORLDS: dict[tuple[int, float, int], Path] = {}


def small_world(tmp_path_factory: pytest.TempPathFactory, seed: int = SEED, scale: float = SCALE,
                eval_size: int = EVAL_SIZE) -> Path:
    """A generated world, built once per session and argument set."""
    key = (seed, scale, eval_size)
    if key not in _WORLDS:
        out = tmp_path_factory.mktemp(f"synth_{seed}")
        generate_world(out, seed=seed, scale=scale, eval_size=eval_size)
        _WORLDS[key] = out
    return _WORLDS[key]


def scene_index(root: Path, scenes_file: str = "scenes.jsonl") -> dict[str, Scene]:
    """Image (path relative to ``root``, or ``shard.tar:key``) → scene."""
    out = {}
    for line in (root / scenes_file).read_text().splitlines():
        rec = json.loads(line)
        out[rec["image"]] = Scene.from_dict(rec["scene"])
    return out


class MetaPredictor:
    """A :class:`tinygptv.eval.predictor.Predictor` that answers every eval item from ``meta.json``: the
    gold answer (``wrong=False``) or a wrong one (``wrong=True``)."""

    def __init__(self, eval_root: Path, wrong: bool = False):
        self.root, self.wrong = eval_root, wrong
        meta = json.loads((eval_root / "meta.json").read_text())
        self.by_image: dict[str, list[dict[str, Any]]] = {}
        for info in meta["sets"].values():
            for item in info["items"].values():
                self.by_image.setdefault(item["image"], []).append(item)

    def item(self, image: str, prompt: str) -> dict[str, Any]:
        rel = Path(image).relative_to(self.root).as_posix()
        candidates = [it for it in self.by_image[rel] if it["query"] in prompt]
        return max(candidates, key=lambda it: len(it["query"]))

    def generate(self, images: list[Any], prompts: list[str], max_new_tokens: int) -> list[str]:
        return ["nothing at all" if self.wrong else self.item(i, p)["answer"] for i, p in zip(images, prompts)]

    def loglikelihood(self, items: list[tuple[Any, str, str]]) -> list[float]:
        out = []
        for image, prompt, continuation in items:
            gold = continuation.rstrip("#\n") == self.item(image, prompt)["answer"]
            out.append(0.0 if gold != self.wrong else -10.0)
        return out

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [max(1, len(t)) for t in texts]


def test_cli_writes_a_world_and_refuses_to_overwrite(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_synth_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "world"
    args = parser.parse_args(["synth", "--out", str(out), "--seed", "3", "--scale", "0.01", "--eval-size", "3",
                              "--image-size", "96"])
    assert args.func is cmd_synth and args.func(args) == 0
    printed = capsys.readouterr().out
    assert "training images" in printed and "eval/gqa" in printed
    world = json.loads((out / "world.json").read_text())
    assert world["seed"] == 3 and world["image_size"] == 96 and world["eval_sets"]["vsr"]["size"] == 3
    assert {"circle", "red", "cat", "left", "yes"} <= set(world["text_vocabulary"])
    assert len((out / "corpus.txt").read_text().splitlines()) == world["corpus_lines"] > 100
    with pytest.raises(FileExistsError):
        cmd_synth(args)
    (out / "laion" / "laion_dataset" / "00099.tar").write_bytes(b"stale")
    (out / "mine.txt").write_text("not ours")
    args = parser.parse_args(["synth", "--out", str(out), "--scale", "0.01", "--eval-size", "3", "--force"])
    assert cmd_synth(args) == 0
    assert not (out / "laion" / "laion_dataset" / "00099.tar").exists() and (out / "mine.txt").exists()


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        generate_world(tmp_path / "w", scale=0)
