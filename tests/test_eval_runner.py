"""Predict/score phases: resume after a simulated kill, failures kept in the denominator, results files, the
CLI end to end with the tiny model, the model adapter and the optional lmms-eval adapter."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch
from test_eval_support import GQA_ROWS, MAKERS, ScriptedPredictor, write_jsonl

import tinygptv
from tinygptv.eval import BENCHMARKS, ModelPredictor, resolve_benchmarks, run_eval
from tinygptv.eval.answers import append_answers, read_answers
from tinygptv.eval.cli import add_eval_parser, cmd_eval
from tinygptv.eval.runner import predict, rescore, score_answers


def test_resume_after_kill(tmp_path):
    predictor = MAKERS["gqa"](tmp_path)
    bench = BENCHMARKS["gqa"]
    samples = bench.load(tmp_path)
    path = tmp_path / "out" / "answers.jsonl"
    predict(bench, samples, predictor, path, tmp_path)
    full = path.read_text().splitlines(keepends=True)
    assert len(full) == 5 and predictor.n_calls("generate") == 5
    # kill simulation: 3 complete lines + a 4th cut in the middle (no newline)
    path.write_text("".join(full[:3]) + full[3][:40])
    assert list(read_answers(path)) == ["q1", "q2", "q3"]  # the partial last line is ignored

    rerun = MAKERS["gqa"](tmp_path)
    stats = predict(bench, bench.load(tmp_path), rerun, path, tmp_path)
    assert stats == {"predicted": 2, "skipped": 3, "failed": 0}
    assert [c[1] for c in rerun.calls] == [s for s in [c[1] for c in predictor.calls][3:]]  # only q4, q5
    assert GQA_ROWS[3][1] in rerun.calls[0][1] and GQA_ROWS[4][1] in rerun.calls[1][1]
    assert list(read_answers(path)) == ["q1", "q2", "q3", "q4", "q5"]
    assert score_answers(path, "gqa")["paper"]["metrics"]["accuracy"] == pytest.approx(80.0)
    # a third run has nothing left to do
    third = MAKERS["gqa"](tmp_path)
    assert predict(bench, bench.load(tmp_path), third, path, tmp_path)["skipped"] == 5 and not third.calls


def test_append_after_truncated_line_keeps_records_separate(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": "1", "outputs": {}}\n{"id": "2", "outp')
    append_answers(path, [{"id": "3", "outputs": {}}])
    assert list(read_answers(path)) == ["1", "3"]


def test_second_mode_only_adds_missing_outputs(tmp_path):
    bench = BENCHMARKS["hm"]
    path = tmp_path / "out" / "answers.jsonl"
    first = MAKERS["hm"](tmp_path)
    predict(bench, bench.load(tmp_path), first, path, tmp_path, modes=("paper",))
    assert first.n_calls("generate") == 5 and first.n_calls("loglikelihood") == 0
    second = MAKERS["hm"](tmp_path)
    predict(bench, bench.load(tmp_path), second, path, tmp_path, modes=("paper", "standard"))
    assert second.n_calls("generate") == 0 and second.n_calls("loglikelihood") == 10
    assert score_answers(path, "hm")["standard"]["metrics"]["accuracy"] == pytest.approx(80.0)


def test_missing_image_counts_as_failure(tmp_path):
    predictor = MAKERS["gqa"](tmp_path)
    (tmp_path / "gqa" / "images" / "n3.jpg").unlink()
    results = run_eval(predictor, "gqa", tmp_path, tmp_path / "out")
    entry = results["benchmarks"]["gqa"]
    for mode in ("paper", "standard"):
        score = entry["scores"][mode]
        assert score["n"] == 5 and score["n_failed"] == 1
        assert score["failures"] == [{"id": "q3", "error": "missing image: gqa/images/n3.jpg"}]
    # q3 ("two" vs "2") was a paper miss / standard hit: paper stays 4/5, standard drops to 3/5 (not 3/4)
    assert entry["scores"]["paper"]["metrics"]["accuracy"] == pytest.approx(80.0)
    assert entry["scores"]["standard"]["metrics"]["accuracy"] == pytest.approx(60.0)
    assert predictor.n_calls("generate") == 4
    md = (tmp_path / "out" / "results.md").read_text()
    assert "`q3`: missing image: gqa/images/n3.jpg" in md


def test_malformed_records_are_reported(tmp_path):
    predictor = MAKERS["vsr"](tmp_path)
    lines = (tmp_path / "vsr" / "test.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    del row["label"]
    lines[1] = json.dumps(row)
    lines[3] = lines[3][:25]  # a broken JSON line
    (tmp_path / "vsr" / "test.jsonl").write_text("\n".join(lines) + "\n")
    results = run_eval(predictor, "vsr", tmp_path, tmp_path / "out", mode="standard")
    score = results["benchmarks"]["vsr"]["scores"]["standard"]
    assert score["n"] == 5
    assert [f["id"] for f in score["failures"]] == ["#1", "#3"]
    assert score["failures"][0]["error"] == "malformed record: missing field 'label'"
    # remaining rows: "True"(T) ✓, "not true"(T) ✗, "I cannot tell" ✗ → 1 of 5
    assert score["metrics"]["accuracy"] == pytest.approx(20.0)
    assert "paper" not in results["benchmarks"]["vsr"]["scores"]


def test_prediction_error_is_isolated(tmp_path):
    class Flaky(ScriptedPredictor):
        def generate(self, images, prompts, max_new_tokens):
            if any("How many dogs" in p for p in prompts):
                raise ValueError("cannot decode image")
            return super().generate(images, prompts, max_new_tokens)

    base = MAKERS["gqa"](tmp_path)
    results = run_eval(Flaky(base.generations), "gqa", tmp_path, tmp_path / "out", mode="paper")
    score = results["benchmarks"]["gqa"]["scores"]["paper"]
    assert score["failures"] == [{"id": "q3", "error": "prediction failed: ValueError: cannot decode image"}]
    assert score["metrics"]["accuracy"] == pytest.approx(80.0)  # q3 was a paper miss anyway: 4/5


def test_run_eval_limit_and_rescore(tmp_path):
    predictors = {name: MAKERS[name](tmp_path) for name in ("gqa", "hm")}

    class Both(ScriptedPredictor):
        pass

    both = Both({**predictors["gqa"].generations, **predictors["hm"].generations}, predictors["hm"].logprobs)
    results = run_eval(both, ["gqa", "hateful_memes"], tmp_path, tmp_path / "out", limit=2)
    gqa = results["benchmarks"]["gqa"]
    assert (gqa["n_selected"], gqa["n_total"], gqa["partial"]) == (2, 5, True)
    assert gqa["scores"]["paper"]["n"] == 2
    md = (tmp_path / "out" / "results.md").read_text()
    assert "--limit 2: partial run" in md and "2 / 5 (partial)" in md
    assert "| 38.9 | 33.6 |" in md  # GQA, paper Table 2 (workshop / early arXiv)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["benchmarks"]["hm"]["scores"]["standard"]["metrics"] == \
        results["benchmarks"]["hm"]["scores"]["standard"]["metrics"]
    again = rescore(tmp_path / "out")
    assert again["benchmarks"]["gqa"]["scores"]["paper"]["metrics"] == gqa["scores"]["paper"]["metrics"]


def test_unknown_benchmark_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="valid: .*gqa.*vsr"):
        resolve_benchmarks("gqa,nope")
    assert resolve_benchmarks("refcocog") == ["refcocog_val", "refcocog_test"]
    with pytest.raises(FileNotFoundError, match="vizwiz/val.json"):
        run_eval(ScriptedPredictor(), "vizwiz", tmp_path, tmp_path / "out")


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from threads; one avoids thread contention on a loaded test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_model_predictor_layouts(tiny_model, red_image, one_thread):
    seen = []
    original = tiny_model.generate

    def spy(*args, **kwargs):
        seen.append((tiny_model.add_bos, tiny_model.template.stop_strings, kwargs.get("chat")))
        return original(*args, **kwargs)

    tiny_model.generate = spy
    predictor = ModelPredictor(tiny_model)
    prompt = "###Human: <Img><ImageHere></Img> hi###Assistant: "
    (text,) = predictor.generate([red_image], [prompt], 20)
    assert isinstance(text, str)
    assert seen == [(False, (), False)]  # no BOS, no stop strings, prompt verbatim
    assert tiny_model.add_bos is True and tiny_model.template.stop_strings == ("###",)  # restored
    (lp,) = predictor.loglikelihood([(red_image, prompt, "yes")])
    assert lp == pytest.approx(tiny_model.loglikelihood(red_image, prompt, "yes"))  # training layout (BOS)
    assert predictor.count_tokens(["yes", ""]) == [3, 0]


def test_cmd_eval_end_to_end(tmp_path, one_thread):
    for name in ("gqa", "iconqa", "hm", "refcoco_val"):
        MAKERS[name](tmp_path)
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "results"
    args = parser.parse_args(["eval", "--model", "tiny", "--benchmark", "gqa,iconqa,hm,refcoco_val",
                              "--data-root", str(tmp_path), "--out", str(out), "--batch-size", "4"])
    torch.manual_seed(0)
    assert args.func is cmd_eval and cmd_eval(args) == 0
    for name in ("gqa", "iconqa", "hm", "refcoco_val"):
        records = read_answers(out / name / "answers.jsonl")
        assert len(records) == 5 and all(r["error"] is None for r in records.values())
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"gqa", "iconqa", "hm", "refcoco_val"}
    assert results["predictor"]["generate_add_bos"] is False
    for entry in results["benchmarks"].values():
        for score in entry["scores"].values():
            assert score["n"] == 5 and score["n_failed"] == 0
            assert 0.0 <= score["metrics"]["accuracy"] <= 100.0
    assert "| Benchmark |" in (out / "results.md").read_text()
    # offline re-scoring from the answers files alone gives the same numbers
    rescored = parser.parse_args(["eval", "--benchmark", "gqa,iconqa,hm,refcoco_val", "--out", str(out),
                                  "--score-only"])
    assert cmd_eval(rescored) == 0
    again = json.loads((out / "results.json").read_text())
    for name, entry in results["benchmarks"].items():
        assert again["benchmarks"][name]["scores"] == entry["scores"]


def test_lmms_eval_adapter_without_lmms_eval():
    from tinygptv.eval import lmms_eval_adapter as adapter

    assert adapter.build_prompt("Q?", True) == "###Human: <Img><ImageHere></Img> Q?###Assistant: "
    assert adapter.build_prompt("Q?", False) == "###Human: Q?###Assistant: "
    assert adapter.cut_until(" red###Human: x", ["\n\n"]) == "red"
    scripted = ScriptedPredictor(logprobs={("Q?", "yes"): -1.5})
    assert adapter.mean_nll(scripted, None, adapter.build_prompt("Q?", False), "yes") == pytest.approx(0.5)
    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed; the missing-dependency error cannot be tested")
    with pytest.raises(ImportError, match="pip install lmms-eval"):
        adapter.TinyGPTVLmms(predictor=scripted)


def test_write_jsonl_helper_roundtrip(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"id": 1}])
    assert tinygptv.eval.base.read_json_or_jsonl(tmp_path / "x.jsonl") == [{"id": 1}]


def test_cmd_eval_defaults_to_the_bundled_model_and_quantizes(tmp_path, one_thread):
    MAKERS["gqa"](tmp_path)
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "results"
    args = parser.parse_args(["eval", "--benchmark", "gqa", "--data-root", str(tmp_path), "--out", str(out),
                              "--quantize", "int8", "--limit", "2"])
    assert args.model == "nano"
    assert cmd_eval(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "nano (int8)"
    assert results["benchmarks"]["gqa"]["scores"]["standard"]["n"] == 2
