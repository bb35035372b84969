"""The nano recipe end to end at a tiny step count, and the bundled model's accuracy on fresh held-out scenes."""

import pytest
import torch

import tinygptv
from tinygptv.checkpoint import BUNDLED


def test_nano_recipe_end_to_end_tiny(tmp_path, monkeypatch):
    """synth → stage 0 → stages 1-4 (every format, every stage's real readers and trainer) → evaluation."""
    from tinygptv.nano.evaluate import evaluate
    from tinygptv.nano.recipe import losses, run

    out = tmp_path / "nano"
    summary = run(out, steps_scale=0.004, world_scale=0.03, eval_size=4)
    amp = summary["amp"]
    assert amp in ("none", "bf16")  # "auto" is resolved once for the whole run
    assert set(summary["timings_s"]) >= {"synth", "stage0_lm", "stage0_lm_objects", "stage0_lm_grounding",
                                         "stage0_vision", "stage1", "stage2", "stage3", "stage4"}
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        assert (out / stage / "loss_curve.png").is_file()
        assert (out / stage / "metrics.jsonl").read_text().strip()
    assert all(v is not None for v in losses(out).values())
    assert not list((out / "stage0").glob("*progress*"))  # each phase's saved progress is gone once it is done
    model = tinygptv.load(summary["final"])
    assert model.cfg.vision.image_size == 128 and model.template.name == "stage4"
    res = evaluate(model, out / "world", out / "eval", limit=2, sets="gqa,vsr,refcoco_val")
    assert set(res["results"]["benchmarks"]) == {"gqa", "vsr", "refcoco_val"}
    assert (out / "eval" / "results.md").is_file()
    # a second call continues: nothing is retrained
    again = run(out, steps_scale=0.004, world_scale=0.03, eval_size=4)
    assert again["timings_s"]["stage4"] < 5
    assert again["step_times_s"] == summary["step_times_s"]  # the report keeps the times of the steps that ran
    assert set(summary["step_times_s"]) == set(summary["timings_s"])
    # stage 0 redone from the saved LM: the LM's recorded time is the training's, not the ~0 s load's
    import shutil

    shutil.rmtree(out / "stage0" / "base")
    third = run(out, steps_scale=0.004, world_scale=0.03, eval_size=4)
    for name in ("stage0_lm", "stage0_lm_objects", "stage0_lm_grounding"):
        assert third["step_times_s"][name] == summary["step_times_s"][name]
    from tinygptv.nano.report import write_report
    from tinygptv.system import cpu_name

    text = write_report(out / "nano.md", third, {"fp32": res}, losses(out), None, "test")
    assert f"Machine: {cpu_name()}" in text and f"training precision: {'fp32' if amp == 'none' else 'bf16'}" in text
    assert third["changed_settings"] == {} and "settings changed" not in text
    text = write_report(out / "nano.md", {**third, "changed_settings": {"IDENTIFY_ANSWER": "full"}}, {"fp32": res},
                        losses(out), None, "test")
    assert ("Produced by `test` with recipe settings changed from the committed ones: "
            "`IDENTIFY_ANSWER = 'full'`.") in text
    # the precision is fixed for the whole output: continuing at another one is refused before any work
    other = "bf16" if amp == "none" else "none"
    with pytest.raises(ValueError, match=f"was trained with amp='{amp}'.*--amp {amp}"):
        run(out, steps_scale=0.004, world_scale=0.03, eval_size=4, amp=other)
    # so is the stage-0 LM's norm choice, when the base is to be rebuilt from its saved LM
    assert third["stage0_norms"] == "inserted"
    shutil.rmtree(out / "stage0" / "base")
    with pytest.raises(ValueError, match="stage-0 LM was pretrained with --stage0-norms inserted"):
        run(out, steps_scale=0.004, world_scale=0.03, eval_size=4, new_norms=True)
    # and so are the recipe's settings: a knob patched for an experiment, or another step scale
    import tinygptv.nano.recipe as recipe

    monkeypatch.setattr(recipe, "IDENTIFY_ANSWER", "full")
    with pytest.raises(ValueError, match="IDENTIFY_ANSWER: 'shortest' when it began, 'full' now"):
        run(out, steps_scale=0.004, world_scale=0.03, eval_size=4)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="steps_scale: 0.004 when it began, 0.005 now"):
        run(out, steps_scale=0.005, world_scale=0.03, eval_size=4)


@pytest.mark.skipif(not (BUNDLED["nano"] / "config.yaml").is_file(), reason="bundled nano model not built")
def test_bundled_model_accuracy_lower_bounds(tmp_path):
    """Fresh scenes from a world seed never used for training, 120 items per set (24 per GQA-style category). Bounds
    sit below the measured accuracy (benchmarks/results/nano.md: GQA-style 75 %, IconQA-style 92.5 %, identify
    42 %, caption object recall 63 %, referring boxes 63 % on refcoco_val; on this seed 72.5 / 95.8 / 35.8 /
    62.6 %, count 79.2 %, colour 87.5 %, boxes 55 % with mean IoU 48.3 %) and well above chance (GQA-style: about
    15 % over its colour/shape/count/yes-no/word questions; IconQA-style: 3-5 choices, at most 33 %; identify: an
    unparsable or absent object scores 0); the boxes' bounds are above the first grounding bundle's figures on
    this seed (Acc@0.5 15 %, mean IoU 18.9 %)."""
    from tinygptv.nano.evaluate import evaluate
    from tinygptv.synth.generate import generate_world

    generate_world(tmp_path / "w", seed=4242, scale=0.02, eval_size=120)
    res = evaluate("nano", tmp_path / "w", tmp_path / "e", sets="gqa,iconqa,refcoco_val")
    bench = res["results"]["benchmarks"]
    assert bench["gqa"]["scores"]["standard"]["metrics"]["accuracy"] >= 52
    assert bench["iconqa"]["scores"]["standard"]["metrics"]["accuracy"] >= 75
    assert res["categories"]["gqa"]["count"]["accuracy"] >= 65
    assert res["categories"]["gqa"]["colour"]["accuracy"] >= 62
    boxes = bench["refcoco_val"]["scores"]["standard"]["metrics"]
    assert boxes["accuracy"] >= 25 and boxes["mean_iou"] >= 30
    assert res["identify_accuracy"] >= 20
    assert res["caption_object_recall"] >= 45
    # every identify answer and caption is kept, and the files agree with the summary's figures
    import json

    rows = [json.loads(x) for x in (tmp_path / "e" / "identify.jsonl").read_text().splitlines()]
    assert len(rows) == res["identify_n"]
    assert 100.0 * sum(r["correct"] for r in rows) / len(rows) == pytest.approx(res["identify_accuracy"])
    caps = [json.loads(x) for x in (tmp_path / "e" / "captions.jsonl").read_text().splitlines()]
    assert len(caps) == res["caption_n"]
    recall = 100.0 * sum(c["words_found"] for c in caps) / sum(c["words_wanted"] for c in caps)
    assert recall == pytest.approx(res["caption_object_recall"])


@pytest.mark.skipif(not (BUNDLED["nano"] / "config.yaml").is_file(), reason="bundled nano model not built")
def test_demo_runs(tmp_path, capsys):
    from tinygptv.cli import main

    assert main(["demo", "--out", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    assert "answers exactly right" in out


def test_load_defaults_to_the_bundled_model():
    import tinygptv

    model = tinygptv.load()
    assert model.cfg.name == "tinygptv-nano" and model.tokenizer is not None
    assert model.template.name == tinygptv.load("nano").template.name


def test_identify_answers_in_either_form_pick_out_the_boxed_object():
    """``identify_answer``: the shortest form is the first unique attribute expression (as the stage-0 identify
    questions always answered), the full form names size, colour and shape; both pick out exactly the object under
    the identify metric, on scenes of one to four objects."""
    import random

    from tinygptv.nano.evaluate import refers_to
    from tinygptv.nano.recipe import grounding_questions, identify_answer
    from tinygptv.synth.world import sample_scene, unique_attribute_specs

    rng = random.Random(3)
    lengths = {"shortest": [], "full": []}
    for k in range(60):
        scene = sample_scene(rng, f"identify-{k}")
        for i, o in enumerate(scene.objects):
            assert identify_answer(scene, i) == unique_attribute_specs(scene, i)[0].text()
            assert identify_answer(scene, i, "full") == f"the {o.size} {o.colour} {o.shape}"
            for form in lengths:
                answer = identify_answer(scene, i, form)
                assert refers_to(answer, scene.objects) is o, (form, answer)
                lengths[form].append(len(answer.split()))
        asked = grounding_questions(scene, random.Random(k), "full")
        assert all(a.count(" ") == 3 for q, a in asked if q.startswith("[identify]"))
    assert sum(lengths["shortest"]) < sum(lengths["full"]) == 4 * len(lengths["full"])
    with pytest.raises(ValueError, match="'longest'"):
        identify_answer(scene, 0, "longest")


def test_identify_metric_resolves_referring_expressions():
    from tinygptv.nano.evaluate import refers_to
    from tinygptv.synth.world import Obj

    objs = [Obj("circle", "red", "small", (0, 0, 10, 10)), Obj("square", "red", "large", (50, 0, 10, 10)),
            Obj("square", "blue", "small", (20, 40, 10, 10))]
    assert refers_to("the circle", objs) is objs[0]
    assert refers_to("the red square", objs) is objs[1]
    assert refers_to("the square", objs) is None  # ambiguous
    assert refers_to("the square on the right", objs) is objs[1]
    assert refers_to("the object on the left", objs) is objs[0]
    assert refers_to("a green star", objs) is None


def test_stage0_retrieval_targets_and_head():
    """The one-hop retrieval head: targets name only unambiguous keys, and the head can read them from queries."""
    import torch

    from tinygptv.nano.stage0 import AuxHeads, dense_targets

    box = (0.0, 0.0, 10.0, 10.0)
    # colour ids / shape ids from 1: two red objects (colour 1) of shapes 2 and 3, one blue (2) of shape 2
    objects = [(box, 1, 2, 1), (box, 1, 3, 1), (box, 2, 2, 1)]
    t = dense_targets(objects, None, 0, (64, 64), 8)
    assert sorted(t["bind"]) == [(False, 2, 2), (True, 3, 1)]  # shape 2 and colour 1 are ambiguous keys
    # per patch, the box of the object there (units of the image size), zeros outside objects
    assert t["patch"]["box"].shape == (64, 4)
    assert torch.allclose(t["patch"]["box"][0], torch.tensor([0.0, 0.0, 10 / 64, 10 / 64]))
    assert t["patch"]["box"][63].abs().sum() == 0 and t["patch"]["colour"][63] == 0
    n = {"colour": 4, "shape": 4, "size": 3, "word": 2}
    torch.manual_seed(0)
    heads = AuxHeads(8, 8, 4, n, 2)
    # query 0 says "blue shape-2", query 1 "red shape-3": the head must learn to attend and read
    queries = torch.zeros(1, 4, 8)
    queries[0, 0, 0] = queries[0, 1, 1] = 3.0
    queries.requires_grad_(True)
    first = heads.bind_loss(queries, [t])
    first.backward()
    assert queries.grad.abs().sum() > 0
    opt = torch.optim.Adam(heads.parameters(), 0.05)
    for _ in range(100):
        opt.zero_grad()
        loss = heads.bind_loss(queries.detach(), [t])
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first.item()
    assert heads.bind_loss(queries, [{"bind": []}]).item() == 0.0


def test_stage0_box_head_reads_matched_queries():
    """The box head reads each object's box from the query it was matched to, and only from that one; tokens
    without a box (the rendered word) give no box loss; corner slots carry their object's box."""
    import torch

    from tinygptv.nano.stage0 import AuxHeads, token_boxes

    torch.manual_seed(0)
    heads = AuxHeads(8, 8, 5, {"colour": 2, "shape": 2, "size": 2, "word": 2}, 2)
    boxes = [[(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.8), None]]
    queries = torch.randn(1, 5, 8, requires_grad=True)
    matches = [[(3, 0), (1, 1), (4, 2)]]
    first = heads.box_loss(queries, matches, boxes)
    first.backward()
    assert queries.grad[0, [0, 2]].abs().sum() == 0 and queries.grad[0, [1, 3]].abs().sum() > 0
    opt = torch.optim.Adam(heads.parameters(), 0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = heads.box_loss(queries.detach(), matches, boxes)
        loss.backward()
        opt.step()
    assert loss.item() < 0.02 < first.item()
    assert heads.box_loss(queries, [[]], boxes).item() == 0.0
    a, b = (0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.8)
    assert token_boxes([["red", "star"], ["blue", "cube"], ["hi", "word"]], [a, b]) == [a, b, None] + [a] * 4 + [b] * 4


def test_stage0_lm_windows_start_at_line_starts():
    from tinygptv.nano.stage0 import line_windows
    from tinygptv.tokenizer import Tokenizer

    tok = Tokenizer.byte_level()
    lines = ["a red star.\nwhat color is the star? red", "short", "x" * 30, "the end"]
    data, starts = line_windows(tok, lines, seq_len=8)
    eos = tok.eos_id
    assert int((data == eos).sum()) == len(lines) and int(data[-1]) == eos
    ends = (data == eos).nonzero().flatten().tolist()
    assert starts.tolist() == [0, *[e + 1 for e in ends[:-1]]][: len(starts)]
    assert all(s + 9 <= len(data) for s in starts.tolist())
    assert len(starts) == 3  # the last line is too close to the end of the stream for a 9-token window
    with pytest.raises(ValueError, match="too small"):
        line_windows(tok, ["ab"], seq_len=8)


def test_stage0_lm_chat_documents_tokenize_answers_like_the_trainer():
    """Chat-formatted scene documents: each answer is tokenized on its own, exactly as build_batch tokenizes a
    prompt and its target, so the LM learns the answer tokens it will have to produce after a template."""
    import random

    from tinygptv.model.sequence import Example, build_batch
    from tinygptv.nano.recipe import chat_document
    from tinygptv.nano.stage0 import SEGMENT, line_windows
    from tinygptv.synth.world import sample_scene
    from tinygptv.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(BUNDLED["nano"])
    rng = random.Random(3)
    markers = set()
    for i in range(12):
        doc = chat_document(sample_scene(rng, f"t-{i}"), rng)
        head, answer, *rest = doc.split(SEGMENT)
        assert len(rest) % 2 == 0 and answer.endswith("###")  # then prompt / answer pairs
        prompt = head.split("\n", 1)[1]
        markers.add("[INST]" if prompt.startswith("[INST]") else "###Human:" if prompt.startswith("###Human:") else "")
        batch = build_batch([Example(prompt, [(answer, True)])], [None], tok, torch.nn.Embedding(tok.vocab_size, 4),
                            0, 0, add_bos=False)
        target = [t for t in batch.labels[0].tolist() if t != -100]
        data, _ = line_windows(tok, [doc], seq_len=8)
        n_head = len(tok.encode(head))
        assert data.tolist()[n_head:n_head + len(target)] == target  # the trainer's answer tokens ...
        assert target[0] != tok.encode(" " + answer)[0]  # ... which are not those of " answer"
    assert markers == {"[INST]", "###Human:"}


def test_object_tokens_and_their_matching_loss():
    """Stage 0's ideal object tokens (one slot per object, the rest near 0) and the DETR-style regression of the
    tower's tokens onto them: zero exactly when some tokens equal the objects (in any order) and the rest are 0."""
    import random

    from tinygptv.nano.stage0 import OBJECT_SLOTS_EMPTY, object_match_loss, object_slots, object_vectors
    from tinygptv.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(BUNDLED["nano"]) if (BUNDLED["nano"] / "tokenizer.json").is_file() else None
    if tok is None:
        pytest.skip("bundled tokenizer not built")
    table = torch.randn(tok.vocab_size, 16)
    rms = table.pow(2).mean().sqrt()
    vecs = object_vectors([["small", "red", "cross"], ["large", "blue", "star", "top", "left"]], table, tok)
    assert vecs.shape == (2, 16)
    assert torch.allclose(vecs.pow(2).mean(-1).sqrt(), rms.expand(2), rtol=1e-4)
    slots = object_slots(vecs, 8, rms, random.Random(0), torch.Generator().manual_seed(0))
    near = [(slots - v).pow(2).mean(-1).sqrt().argmin().item() for v in vecs]
    assert len(set(near)) == 2
    empty = [i for i in range(8) if i not in near]
    assert slots[empty].pow(2).mean().sqrt() < 2 * OBJECT_SLOTS_EMPTY * rms

    emb = torch.zeros(1, 8, 16)
    emb[0, 5], emb[0, 2] = vecs[0], vecs[1]
    loss, pairs = object_match_loss(emb, [vecs], rms)
    assert loss.item() < 1e-6 and sorted(pairs[0]) == [(2, 1), (5, 0)]
    emb[0, 0] = vecs[0]  # a second token on an object: pulled towards an empty slot
    assert object_match_loss(emb, [vecs], rms)[0].item() > 0.01
    moved = (emb + 0.1 * torch.randn(1, 8, 16)).requires_grad_()
    object_match_loss(moved, [vecs], rms)[0].backward()
    assert moved.grad.abs().sum() > 0


def test_stage0_base_keeps_or_redraws_the_projection(tmp_path):
    """``assemble_base`` takes stage 0's projection when given one (every tensor, loaded back exactly) and otherwise
    draws a fresh one, as the official stage 1 starts; the frozen parts are the ones handed in either way."""
    from dataclasses import replace

    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.nano.recipe import nano_config
    from tinygptv.nano.stage0 import assemble_base, train_tokenizer
    from tinygptv.weights.common import WeightImportError

    tok = train_tokenizer(["a small red cross on the left", "a large blue star at the top"] * 20, 300,
                          tmp_path / "tok")
    cfg = nano_config(tok.vocab_size)
    torch.manual_seed(0)
    plain = TinyGPTV(replace(cfg, lm=replace(cfg.lm, qk_norm=False, post_attn_norm=False),
                             lora=replace(cfg.lora, r=0)))
    parts = [{k: v.detach().clone() for k, v in m.state_dict().items()}
             for m in (plain.lm, plain.vision, plain.qformer, plain.projector)]
    for p in parts[3].values():
        p.normal_()  # unlike any fresh draw
    kept = tinygptv.load(assemble_base(cfg, tok, *parts[:3], tmp_path / "kept", projector_state=parts[3]))
    fresh = tinygptv.load(assemble_base(cfg, tok, *parts[:3], tmp_path / "fresh"))
    for name, value in parts[3].items():
        assert torch.equal(kept.projector.state_dict()[name], value)
        assert not torch.equal(fresh.projector.state_dict()[name], value)
    for model in (kept, fresh):
        assert torch.equal(model.qformer.state_dict()["query_tokens"], parts[2]["query_tokens"])
    with pytest.raises(WeightImportError, match=r"missing \(1\): projector\.proj2\.bias"):  # refused, named
        assemble_base(cfg, tok, *parts[:3], tmp_path / "bad",
                      projector_state={k: v for k, v in parts[3].items() if not k.endswith("proj2.bias")})


def test_stage0_lm_with_new_norms_trains_them_and_the_base_keeps_them(tmp_path):
    """With ``new_norms`` the stage-0 LM has the QK LayerNorms and the post-attention RMSNorm from its first step:
    their weights train, the QK biases stay frozen at 0, and ``assemble_base`` keeps the trained values instead of
    re-inserting the norms at LayerNorm(1, 0) / RMSNorm(1); without it the LM has none and the base inserts them."""
    from dataclasses import replace

    from tinygptv.model.tinygptv import TinyGPTV
    from tinygptv.nano.recipe import nano_config
    from tinygptv.nano.stage0 import assemble_base, pretrain_lm, stage0_lm, train_tokenizer

    lines = ["a small red cross on the left<|endoftext|>", "a large blue star at the top<|endoftext|>"] * 40
    tok = train_tokenizer(lines, 300, tmp_path / "tok")
    cfg = nano_config(tok.vocab_size)
    assert not any("norm" in k and "layernorm" not in k for k in stage0_lm(cfg).state_dict())
    normed = stage0_lm(cfg, new_norms=True)
    frozen = {k for k, p in normed.named_parameters() if not p.requires_grad}
    assert frozen == {f"layers.{i}.attn.{n}.bias" for i in range(cfg.lm.layers) for n in ("q_norm", "k_norm")}

    state = pretrain_lm(cfg, tok, lines, steps=3, batch=2, seq_len=16, amp="none", new_norms=True)
    assert (state["layers.0.post_attn_norm.weight"] != 1).any() and (state["layers.0.attn.q_norm.weight"] != 1).any()
    assert not state["layers.0.attn.q_norm.bias"].any()
    donor = TinyGPTV(replace(cfg, lora=replace(cfg.lora, r=0)))
    parts = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (donor.vision, donor.qformer)]
    base = tinygptv.load(assemble_base(cfg, tok, state, *parts, tmp_path / "base"))
    assert torch.equal(base.lm.layers[0].post_attn_norm.weight.float(), state["layers.0.post_attn_norm.weight"])
    plain = pretrain_lm(cfg, tok, lines, steps=1, batch=2, seq_len=16, amp="none")
    base = tinygptv.load(assemble_base(cfg, tok, plain, *parts, tmp_path / "plain"))
    assert torch.equal(base.lm.layers[0].post_attn_norm.weight, torch.ones(cfg.lm.hidden))


def test_keyed_last_moves_the_key_to_the_end():
    from tinygptv.synth.text import keyed_last

    assert keyed_last("what color is the cross?") == "what color is the cross"
    assert keyed_last("what shape is the red object?") == "what shape is the object that is red"
    assert keyed_last("how many crosses are there?") == "count the crosses"
    assert keyed_last("how many red objects are there?") == "count the objects that are red"
    assert keyed_last("how many objects are there?") == "count the objects"


def test_ablation_stage_stats_average_the_tail_and_count_events(tmp_path):
    import json

    from tinygptv.nano.ablate import TAIL, markdown, stage_stats

    rows = [{"step": 10 * i, "loss": float(i), "grad_norm": 1.0} for i in range(1, 21)]
    rows[3]["grad_norm"] = 1e-9  # a vanished gradient
    rows[4]["loss"] = None  # a non-finite step logs no loss
    rows[-1]["nonfinite_total"] = 1
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    st = stage_stats(tmp_path)
    finite = [float(i) for i in range(1, 21) if i != 5]
    tail = finite[-max(1, len(finite) // TAIL):]
    assert st["final_loss"] == pytest.approx(sum(tail) / len(tail)) and st["final_loss"] != finite[-1]
    assert st["vanished_steps"] == 1 and st["nonfinite"] == 1 and st["logged_steps"] == 20
    text = markdown({"full": {"stage1": st}}, "cmd")
    assert f"| full | {st['final_loss']:.3f} NaN×1 vanish×1 |" in text


def test_corner_slots_and_number_codes():
    """Each boxed object gets four corner slots whose code tells its coordinate apart from others (nearest code =
    right coordinate), and the number tokens get the code of their value, so a number's embedding lies closest to
    the code of its own value; grounding questions about a scene are well formed."""
    import random
    from dataclasses import replace

    from tinygptv.model.phi import PhiLM
    from tinygptv.nano.recipe import grounding_questions, nano_config, object_boxes, object_questions, object_words
    from tinygptv.nano.stage0 import CornerCode, object_tokens
    from tinygptv.synth.world import sample_scene
    from tinygptv.tokenizer import Tokenizer

    if not (BUNDLED["nano"] / "tokenizer.json").is_file():
        pytest.skip("bundled tokenizer not built")
    tok = Tokenizer.from_folder(BUNDLED["nano"])
    code = CornerCode(64)
    grid = torch.stack([code(t / 100) for t in range(101)])  # [101, 64]
    assert torch.allclose(grid.pow(2).mean(-1), torch.ones(101), atol=1e-5)
    picked = (grid @ torch.stack([code(t / 100) for t in (3, 37, 62, 98)]).T).argmax(0)
    assert picked.tolist() == [3, 37, 62, 98]

    scene = sample_scene(random.Random(5), "corners", n_objects=3, word=True)
    table = torch.randn(tok.vocab_size, 64)
    boxes = object_boxes(scene)
    assert all(0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 for x1, y1, x2, y2 in boxes)
    tokens = object_tokens(object_words(scene), boxes, table, tok, code)
    assert tokens.shape == (3 + 1 + 4 * 3, 64)  # objects, the word, corner slots
    rms = table.pow(2).mean().sqrt()
    assert torch.allclose(tokens.pow(2).mean(-1).sqrt(), rms.expand(len(tokens)), rtol=1e-4)

    lm = PhiLM(replace(nano_config(tok.vocab_size).lm, hidden=64, heads=4))
    before = lm.embed_tokens.weight.detach().clone()
    code.code_numbers_(lm, tok)
    ids = [tok.encode(str(n))[0] for n in range(0, 98, 7)]
    changed = (lm.embed_tokens.weight - before)[ids]  # what was added: the code of each number's value
    assert ((changed @ grid.T).argmax(-1) == torch.tensor(list(range(0, 98, 7)))).all()

    rng = random.Random(0)
    for q, a in grounding_questions(scene, rng):
        assert q.startswith(("[refer] give me the location of ", "[identify] what object is in this location {<"))
        assert a.startswith("{<") if q.startswith("[refer]") else a.startswith("the ")
    for grounding, low, high in (((0, 0.0), 0, 0), ((1, 0.5), 1, 2), ((2, 0.0), 2, 2)):
        asked = [object_questions(scene, rng, 3, False, grounding) for _ in range(20)]
        counts = [sum(q.startswith("[") for q, _ in qs) for qs in asked]
        assert all(len(qs) == 3 for qs in asked) and low == min(counts) and max(counts) == high


def test_stage0_vision_loop_goes_through_the_lm_every_nth_step(tmp_path, monkeypatch):
    """``lm_every``: the caption and question losses (one LM forward each) only on steps 0, n, 2n, …"""
    from tinygptv.model.phi import PhiLM
    from tinygptv.nano.recipe import SIZES, nano_config, scene_pairs
    from tinygptv.nano.stage0 import pretrain_lm, pretrain_vision, train_tokenizer

    lines = ["a small red cross on the left<|endoftext|>", "a large blue star at the top<|endoftext|>"] * 40
    tok = train_tokenizer(lines, 300, tmp_path / "tok")
    cfg = nano_config(tok.vocab_size)
    lm = pretrain_lm(cfg, tok, lines, steps=1, batch=2, seq_len=16, amp="none")
    calls = []
    forward = PhiLM.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(PhiLM, "forward", counted)
    vision = {}
    for every in (1, 3):
        calls.clear()
        vision[every], _, _ = pretrain_vision(cfg, tok, lm, scene_pairs(0, 64), steps=4, sizes=SIZES, batch=2,
                                              amp="none", lm_every=every)
        assert len(calls) == 2 * len(range(0, 4, every))
    calls.clear()  # captions on steps 0 and 3 only, questions on all four
    thinned, _, _ = pretrain_vision(cfg, tok, lm, scene_pairs(0, 64), steps=4, sizes=SIZES, batch=2, amp="none",
                                    caption_every=3)
    assert len(calls) == 2 + 4
    assert any(not torch.equal(vision[1][k], thinned[k]) for k in thinned)
    with pytest.raises(ValueError, match="lm_every=0"):
        pretrain_vision(cfg, tok, lm, scene_pairs(0, 64), steps=1, sizes=SIZES, batch=2, amp="none", lm_every=0)
    with pytest.raises(ValueError, match="caption_every=0"):
        pretrain_vision(cfg, tok, lm, scene_pairs(0, 64), steps=1, sizes=SIZES, batch=2, amp="none",
                        caption_every=0)
    # steps 1 and 2 trained without the LM's losses: the tower comes out different
    assert any(not torch.equal(vision[1][k], vision[3][k]) for k in vision[1])


def test_stage0_loops_resume_exactly_after_an_interruption(tmp_path, monkeypatch):
    """Each stage-0 loop saves its progress (``every_s=0``: after every step); killed mid-step and started again
    with the same arguments, it continues from the last saved step and returns the weights of a run that was
    never interrupted. The vision phase is interrupted once in its ViT warm-up and once in its joint loop.
    One thread: with two, two uninterrupted runs of the vision loop already differ in the last bits on CPU."""
    import tinygptv.nano.stage0 as s0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_checks(tmp_path, monkeypatch, s0)
    finally:
        torch.set_num_threads(threads)


def _resume_checks(tmp_path, monkeypatch, s0):
    from tinygptv.nano.recipe import SIZES, nano_config, scene_objects, scene_pairs

    lines = ["a small red cross on the left<|endoftext|>", "a large blue star at the top<|endoftext|>"] * 40
    tok = s0.train_tokenizer(lines, 300, tmp_path / "tok")
    cfg = nano_config(tok.vocab_size)

    def interrupted(fn, patch_name, owner, raise_at, **kwargs):
        """``fn(**kwargs)`` run until it completes, raising KeyboardInterrupt at the given calls of
        ``owner.patch_name`` (counted over all tries); returns its result and the number of tries."""
        calls, tries = [0], 0
        original = getattr(owner, patch_name) if owner is not None else kwargs["pairs"]

        def counted(*a, **k):
            calls[0] += 1
            if calls[0] in raise_at:
                raise KeyboardInterrupt
            return original(*a, **k)

        if owner is not None:
            monkeypatch.setattr(owner, patch_name, counted)
        else:
            counted.classes = original.classes
            kwargs["pairs"] = counted
        path = tmp_path / f"{patch_name}.progress.pt"
        while True:
            tries += 1
            try:
                out = fn(progress=s0.Progress(path, every_s=0), **kwargs)
                break
            except KeyboardInterrupt:
                assert path.is_file()
        if owner is not None:
            monkeypatch.setattr(owner, patch_name, original)
        return out, tries

    def same(a, b):
        return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    lm_args = dict(cfg=cfg, tok=tok, lines=lines, steps=4, batch=2, seq_len=16, amp="none")
    lm = s0.pretrain_lm(**lm_args)
    resumed, tries = interrupted(s0.pretrain_lm, "sample_windows", s0, {3}, **lm_args)
    assert tries == 2 and same(lm, resumed)

    obj_args = dict(cfg=cfg, tok=tok, lm_state=lm, lines=lines, scenes=scene_objects(0, grounding=(2, 0.0)), steps=3,
                    batch=2, text_batch=1, boxes=True, amp="none")
    grounded = s0.pretrain_lm_objects(**obj_args)
    resumed, tries = interrupted(s0.pretrain_lm_objects, "object_slots", s0, {5}, **obj_args)
    assert tries == 2 and same(grounded, resumed)

    vis_args = dict(cfg=cfg, tok=tok, lm_state=lm, pairs=scene_pairs(0, 64), steps=3, sizes=SIZES, batch=2,
                    vit_steps=3, amp="none")
    reference = s0.pretrain_vision(**vis_args)
    # calls of pairs: warm-up steps 0-2 are calls 1-3, the joint loop's steps 0-2 calls 4-6; raising at call 2 (warm-up
    # step 1) and at call 6 (the second try redoes warm-up steps 1 and 2, then joint step 0 is call 5, step 1 call 6)
    resumed, tries = interrupted(s0.pretrain_vision, "pairs", None, {2, 6}, **vis_args)
    assert tries == 3 and all(same(a, b) for a, b in zip(reference, resumed))

    # a saved state of another length is refused with the file's name, not silently mixed in
    progress = s0.Progress(tmp_path / "lm.progress.pt", every_s=0)
    progress.save("lm", 2, 4, {}, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), {})
    with pytest.raises(ValueError, match=r"lm\.progress\.pt.*4 steps.*of 6"):
        s0.pretrain_lm(**{**lm_args, "steps": 6}, progress=s0.Progress(tmp_path / "lm.progress.pt"))
