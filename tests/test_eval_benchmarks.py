"""Per-benchmark scoring on 5-record fixtures in the published layouts, with hand-computed expected scores,
plus byte-exact paper-mode prompts (golden strings of the upstream evaluator)."""

from __future__ import annotations

import pytest
from test_eval_support import HM_ROWS, ICONQA_ROWS, MAKERS, REFCOCO_ROWS

from tinygptv.eval import BENCHMARKS
from tinygptv.eval.answers import read_answers
from tinygptv.eval.runner import predict, score_answers


def run(tmp_path, name, mode="both"):
    """Build the fixture, predict with its scripted predictor, score offline from answers.jsonl."""
    predictor = MAKERS[name](tmp_path)
    bench = BENCHMARKS[name]
    samples = bench.load(tmp_path)
    path = tmp_path / "out" / name / "answers.jsonl"
    predict(bench, samples, predictor, path, tmp_path)
    records = list(read_answers(path).values())
    per_record = {m: [bench.score_record(r, m) for r in records] for m in ("paper", "standard")}
    return score_answers(path, name, mode), per_record, samples, predictor


def col(per_record, mode, key):
    return [v[key] for v in per_record[mode]]


def test_gqa(tmp_path):
    scores, per, samples, _ = run(tmp_path, "gqa")
    assert [s.id for s in samples] == ["q1", "q2", "q3", "q4", "q5"]
    # paper (label ⊂ answer.lower(), untrimmed):  red⊂red 1 | yes⊂"yes." 1 | "2"⊄"two" 0 | table⊂"the table" 1 |
    #   "no"⊂"nothing.###human: is it no?…" 1
    assert col(per, "paper", "accuracy") == [1, 1, 0, 1, 1]
    # standard (cut ###, lower, rstrip ., normalise, ==): red 1 | yes 1 | two→2 1 | the table→table 1 |
    #   "nothing" != "no" 0
    assert col(per, "standard", "accuracy") == [1, 1, 1, 1, 0]
    assert scores["paper"]["metrics"]["accuracy"] == pytest.approx(100 * 4 / 5)  # 80.0
    assert scores["standard"]["metrics"]["accuracy"] == pytest.approx(100 * 4 / 5)  # 80.0
    assert scores["paper"]["n_failed"] == 0


def test_gqa_official_dict_layout(tmp_path):
    from test_eval_support import image, write_json

    write_json(tmp_path / "gqa" / "testdev_balanced_questions.json",
               {"201": {"imageId": "n9", "question": "What is it?", "answer": "dog",
                        "types": {"structural": "query"}}})
    image(tmp_path / "gqa" / "images" / "n9.jpg")
    (sample,) = BENCHMARKS["gqa"].load(tmp_path)
    assert (sample.id, sample.image, sample.gt) == ("201", "gqa/images/n9.jpg", {"answer": "dog",
                                                                                   "structural": "query"})
    record = {"id": "201", "inputs": sample.inputs, "gt": sample.gt, "outputs": {"gen": "Dog."}}
    result = BENCHMARKS["gqa"].score([record], "standard")
    assert result["metrics"]["accuracy_by_structural_type"] == {"query": 100.0}


def test_vsr(tmp_path):
    scores, per, samples, _ = run(tmp_path, "vsr")
    assert samples[4].image == "vsr/images/val2017/000000000004.jpg"  # train2017 → val2017 fallback
    # paper: +1 label⊂answer, +1 yes(true)/no(false)⊂answer
    #   "true"(T): 1+0 | "yes"(T): 0+1 | "not true"(T): 1+0 (counted!) | "false"(F): 1+0 |
    #   "i cannot tell"(F): 0 + ("no"⊂"cannot") 1
    assert col(per, "paper", "accuracy") == [1, 1, 1, 1, 1]
    assert scores["paper"]["metrics"]["accuracy"] == pytest.approx(100.0)  # 5/5
    # root-script variant (label substring only): 1,0,1,1,0 → 3/5
    assert scores["paper"]["metrics"]["accuracy_root_script"] == pytest.approx(60.0)
    # standard (words; negator flips): true→1 ✓ | yes→1 ✓ | not true→0 ✗ | false→0 ✓ | none → unparsable ✗
    assert col(per, "standard", "accuracy") == [1, 1, 0, 1, 0]
    assert scores["standard"]["metrics"]["accuracy"] == pytest.approx(60.0)  # 3/5
    assert scores["standard"]["metrics"]["n_unparsable"] == 1


def test_vsr_double_count_quirk():
    bench = BENCHMARKS["vsr"]
    record = {"inputs": {"caption": "x"}, "gt": {"label": 1, "label_text": "true"},
              "outputs": {"gen": "Yes, it is true."}}
    # paper: "true"⊂ → +1 and "yes"⊂ → +1 = 2 (accuracy can exceed 100 %); standard: yes+true → 1 → correct
    assert bench.score_record(record, "paper")["accuracy"] == 2
    assert bench.score_record(record, "standard")["accuracy"] == 1
    record["gt"] = {"label": 0, "label_text": "false"}
    record["outputs"]["gen"] = "not true"  # paper: "no"⊂"not" → correct for False too; standard: not true → 0 ✓
    assert bench.score_record(record, "paper")["accuracy"] == 1
    assert bench.score_record(record, "standard")["accuracy"] == 1


def test_iconqa(tmp_path):
    scores, per, _, predictor = run(tmp_path, "iconqa")
    # paper: candidates '_'.join(c).split('_'), continuation cand+"\n", mean NLL = -lp / len(chars)
    #  101 yes\n 2/4=.5, no\n 3/3=1 → 0 = gold 0 ✓
    #  102 1\n 4/2=2, 2\n 2/2=1, 3\n 1/2=.5 → 2 ✓
    #  103 a-d 4/2=2, e\n 1/2=.5 → 4 ✓
    #  104 [red, car, blue]: 4/4=1, 8/4=2, .5/5=.1 → 2 ("blue") but gold index 1 is now "car" ✗ (split quirk)
    #  105 cat\n 4/4=1, dog\n 4/4=1 → tie → lowest index 0 ✗
    assert col(per, "paper", "accuracy") == [1, 1, 1, 0, 0]
    assert scores["paper"]["metrics"]["accuracy"] == pytest.approx(60.0)  # 3/5
    assert scores["paper"]["metrics"]["accuracy_root_script"] == pytest.approx(20.0)  # gold==0: 1 of 5
    assert scores["paper"]["metrics"]["n_split_changed"] == 1
    # standard: original choices + "###", mean NLL
    #  101 yes### 4.8/6=.8, no### 4.5/5=.9 → 0 ✓ (sum: 4.8 > 4.5 → 1 ✗)
    #  102 8/4=2, 4/4=1, 2/4=.5 → 2 ✓ | 103 1,1,1,1,.5 → 4 ✓ | 104 red_car### 20/10=2, blue### 3.5/7=.5 → 1 ✓
    #  105 tie 1, 1 → 0 ✗
    assert col(per, "standard", "accuracy") == [1, 1, 1, 1, 0]
    assert col(per, "standard", "accuracy_sum") == [0, 1, 1, 1, 0]
    assert scores["standard"]["metrics"]["accuracy"] == pytest.approx(80.0)  # 4/5
    assert scores["standard"]["metrics"]["accuracy_sum"] == pytest.approx(60.0)  # 3/5
    # 2+3+5+3+2 paper candidates + 2+3+5+2+2 standard choices, no generation
    assert predictor.n_calls("loglikelihood") == 15 + 14 and predictor.n_calls("generate") == 0


def test_vizwiz(tmp_path):
    scores, per, _, _ = run(tmp_path, "vizwiz")
    # paper: hits = gt==a or gt⊂a or a⊂gt over '_'-split answers; min(hits/3, 1)
    #  red: 10 hits → 1 | blue: 3 hits → 1 | "unanswerable" (cut at ###): 6 → 1 |
    #  "coca-cola" vs "coca cola"/"coke": 0 hits → 0 | "" ⊂ every answer: 10 → 1
    assert col(per, "paper", "accuracy") == [1, 1, 1, 0, 1]
    assert scores["paper"]["metrics"]["accuracy"] == pytest.approx(80.0)  # 4/5
    # standard: normalise, 10-choose-9
    #  red: 1 | blue 3/10: 3 humans × 2/3 + 7 × 1 → (2 + 7)/10 = 0.9 | unanswerable 6/10: all ≥ 3 → 1 |
    #  coca cola 2/10: 2 × 1/3 + 8 × 2/3 → 6/10 = 0.6 | "" matches nothing → 0
    assert col(per, "standard", "accuracy") == pytest.approx([1, 0.9, 1, 0.6, 0])
    assert scores["standard"]["metrics"]["accuracy"] == pytest.approx(100 * 3.5 / 5)  # 70.0
    # unanswerable subset (answerable == 0): rows 3 and 5 → (1 + 0) / 2
    assert scores["standard"]["metrics"]["accuracy_unanswerable"] == pytest.approx(50.0)
    assert scores["standard"]["metrics"]["n_unanswerable"] == 2


def test_hateful_memes(tmp_path):
    scores, per, _, _ = run(tmp_path, "hm")
    # paper: "yes"⊂ → 1, elif "no"⊂ → 0, else unmatched
    #  Yes→1 (gold 1 ✓) | No→0 (0 ✓) | "not hateful"→0 via "not" (0 ✓) | "i don't know"→0 via "know" (1 ✗) |
    #  Maybe → unmatched ✗
    assert col(per, "paper", "accuracy") == [1, 1, 1, 0, 0]
    assert scores["paper"]["metrics"]["accuracy"] == pytest.approx(60.0)
    assert scores["paper"]["metrics"]["n_unmatched"] == 1
    # standard: P(yes) = sigmoid(lp_yes - lp_no): .731, .269, .5, .731, .5 ; predict 1 iff > .5
    #  ✓ ✓ ✓(0.5 → 0 = gold 0) ✓ ✗(0.5 → 0, gold 1) → 4/5
    assert col(per, "standard", "p_yes") == pytest.approx([0.7310586, 0.2689414, 0.5, 0.7310586, 0.5])
    assert scores["standard"]["metrics"]["accuracy"] == pytest.approx(80.0)
    # AUROC: positives {.731, .731, .5} vs negatives {.269, .5}: .731 beats both (×2 → 4), .5 > .269 (1),
    #  .5 vs .5 tie (0.5) → 5.5 / 6
    assert scores["standard"]["metrics"]["auroc"] == pytest.approx(100 * 5.5 / 6)
    # word-level extraction of the generation: yes ✓, no ✓, the other three have no yes/no word → unparsable
    assert scores["standard"]["metrics"]["accuracy_generation"] == pytest.approx(40.0)
    assert scores["standard"]["metrics"]["n_unparsable"] == 3
    assert len(HM_ROWS) == 5


def test_refcoco(tmp_path):
    scores, per, samples, _ = run(tmp_path, "refcoco_val")
    # two sentences of one referred object share an img_id: each is its own item
    assert [s.id for s in samples][-1] == "COCO_train2014_000000000001_1#1"
    assert samples[0].image == "coco/train2014/COCO_train2014_000000000001.jpg"
    # images 200x100 → x_px = 2·grid, y_px = grid
    # 1 "{<10><10><40><50>}###…": match at start, [20,10,80,50] = gt → IoU 1 ✓ (both modes)
    # 2 "{<0><0><12><49>}": [0,0,24,49] vs gt [0,0,49,49]: +1 IoU = 25·50 / 50·50 = 0.5 exactly → not > 0.5 ✗;
    #   continuous 24·49 / 49·49 = 24/49 < 0.5 ✗
    # 3 "{<0> <0> <25> <50>}": spaces removed → match; [0,0,50,50] vs [0,0,100,50]:
    #   +1 IoU = 51·51 / (51·51 + 101·51 − 51·51) = 51/101 > 0.5 ✓; continuous 2500/5000 = 0.5 exactly → ≥ 0.5 ✓
    # 4 "<10><20><30>": malformed → ✗ both (paper unmatched, standard unparsable)
    # 5 "<10><10><40><50>" (no braces): paper drops it ✗ (resample variant scores it ✓); standard parses ✓
    assert col(per, "paper", "accuracy") == [1, 0, 1, 0, 0]
    assert col(per, "paper", "accuracy_resample") == [1, 0, 1, 0, 1]
    assert col(per, "standard", "accuracy") == [1, 0, 1, 0, 1]
    assert scores["paper"]["metrics"]["accuracy"] == pytest.approx(40.0)
    assert scores["paper"]["metrics"]["accuracy_resample"] == pytest.approx(60.0)
    assert scores["paper"]["metrics"]["n_unmatched"] == 2
    assert scores["standard"]["metrics"]["accuracy"] == pytest.approx(60.0)
    assert scores["standard"]["metrics"]["mean_iou"] == pytest.approx(100 * (1 + 24 / 49 + 0.5 + 0 + 1) / 5)
    assert scores["standard"]["metrics"]["n_unparsable"] == 1
    assert len(REFCOCO_ROWS) == 5


# ------------------------------------------------------------------------------------ golden paper prompts
GOLDEN = {
    "gqa": ("What color is the car?",
            "###Human: <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short "
            "answer: What color is the car?###Assistant: "),
    "vsr": ("The cat is on the table.",
            "###Human: <Img><ImageHere></Img> [vqa] Based on the image, is this statement true or false? "
            "The cat is on the table.###Assistant: "),
    "vizwiz": ("What color is this shirt?",
               "###Human: <Img><ImageHere></Img> [vqa] The question is 'What color is this shirt?' Based on the "
               "image, answer the question with a single word or phrase. and reply 'unanswerable' when the "
               "provided information is insufficient###Assistant: "),
    "hm": ("you are all wonderful",
           "###Human: <Img><ImageHere></Img> This is an image writting 'you are all wonderful'. Is this image "
           "hateful? Answer yes or no. Answer:###Assistant: "),
    "refcoco_val": ("left dog",
                    "###Human: <Img><ImageHere></Img> [refer] give me the location of left dog###Assistant: "),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_paper_prompt_golden(tmp_path, name):
    MAKERS[name](tmp_path)
    marker, expected = GOLDEN[name]
    bench = BENCHMARKS[name]
    sample = next(s for s in bench.load(tmp_path) if marker in str(s.inputs))
    (req,) = [r for r in bench.requests(sample.inputs, "paper") if r.kind == "generate"]
    assert req.prompt.encode() == expected.encode()
    assert req.max_new_tokens == 20


def test_iconqa_prompt_golden(tmp_path):
    MAKERS["iconqa"](tmp_path)
    bench = BENCHMARKS["iconqa"]
    sample = bench.load(tmp_path)[3]
    assert sample.inputs["choices"] == ICONQA_ROWS[3][2]
    reqs = bench.requests(sample.inputs, "paper")
    expected = ("###Human: <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short "
                "answer: Which vehicle is shown? ###Assistant: ")  # multi_select literal: spaces around ###
    assert {r.prompt.encode() for r in reqs} == {expected.encode()}
    assert [r.continuation for r in reqs] == ["red\n", "car\n", "blue\n"]
    assert [r.continuation for r in bench.requests(sample.inputs, "standard")] == ["red_car###", "blue###"]


def test_hm_standard_continuations(tmp_path):
    MAKERS["hm"](tmp_path)
    sample = BENCHMARKS["hm"].load(tmp_path)[0]
    lls = [r for r in BENCHMARKS["hm"].requests(sample.inputs, "standard") if r.kind == "loglikelihood"]
    assert [(r.key, r.continuation) for r in lls] == [("ll_yes", "yes"), ("ll_no", "no")]
    assert lls[0].prompt.endswith("Answer:###Assistant: ")
