"""Why the nano model misses its targets: measurements on a nano recipe run (1–5) and on final models (6–9).

1. **Does the LM read the image?** Mean log-likelihood of the right answer to the held-out colour / shape
   questions (GQA-style set, in the evaluation wrapper) with the question's own image vs. another scene's image,
   and of the scenes' captions with their own vs. another image, for every stage's final checkpoint.
   A gap near 0 means the answer does not depend on the image.
2. **Do the Q-Former queries say *where* things are?** A linear probe, shared by all queries, trained to predict
   from query ``i`` the colour and shape of the object centred in cell ``i`` of a 4×4 grid (16 queries), on the
   world's training images, scored on held-out scenes. Accuracy on occupied cells at 0 means the queries carry
   no per-location attributes, so "what colour is the star?" has nothing to bind to.
3. **Can the stage-0 LM answer from its context?** Text only: a description of a fresh scene, then a colour or
   shape question about it; the answer ranked by likelihood among all colours / shapes. At chance the LM has no
   way to read answers out of what precedes them — image tokens included. ``--compare-lm`` scores another
   stage-0 LM (same tokenizer) beside it, e.g. one from an older recipe.

4. **Does the vision tower see shapes?** One object per fresh scene; linear probes trained on 1500 scenes and
   scored on 300 predict its shape from the mean of the ViT's patch features and from the flattened Q-Former
   queries of the stage-0 base. ``--compare-tower`` probes another checkpoint's (frozen, so unchanged since its
   stage 0) tower beside it, e.g. an older bundled model.

5. **Can the paper's trainable set learn to read the tower?** A fresh base from this run's stage-0 LM and a tower
   (this run's, and ``--compare-tower``'s), the paper's trainable set (LoRA, norms, projections), trained
   ``--qa-steps`` steps (batch 8) on colour / shape questions about fresh scenes in the evaluation wrapper, then
   scored on 120 held-out questions by ranking every colour / shape; with many objects per scene and with one.

Usage: ``python benchmarks/nano_diagnostics.py [--run runs/nano] [--compare-lm OTHER/lm.safetensors]
[--compare-tower OTHER_CHECKPOINT]`` (after
``tinygptv train --recipe nano --output runs/nano``); writes ``benchmarks/results/nano-diagnostics.{md,json}``.

``--towers CHECKPOINT`` instead asks whether a final model's frozen vision side holds what the questions need, in
scenes of 1–4 objects at the model's image size, and whether the model reads it out for a single object (writes
``benchmarks/results/nano-towers.md``):

6. **Per object, from the ViT:** linear probes on the patch feature at each object's centre predict its colour,
   shape and size (800 training scenes, 200 held-out).
7. **Across objects, from the Q-Former:** one attention hop over the (frozen) query outputs, keyed by a colour or a
   shape, must name the other attribute of the object that has it ("the star's colour", "the red one's shape"),
   the read an LM attention head would do (1500 training scenes, 300 held-out). High here but low in the model's
   answers means the LM side, not the tower, loses the information.
8. **One object, asked two ways:** scenes of a single object. A linear probe with one weight for every image token
   (the read the LM gets; per-token logits averaged) names its shape from the projected image tokens (1500 / 300
   scenes). Then the model itself, answers ranked by likelihood over all shapes / colours (120 scenes): continuing
   its own detailed description ("The image shows 1 object on a light background. A large red" → shape;
   "… A large" → colour), and answering "what shape / color is the … object?" in the evaluation wrapper. No
   binding is needed here, so a gap between the two is the question-answering path failing to read the image.
9. **Many objects, where the answer gets lost:** scenes of 2–4 objects, "what shape is the <colour> object?" (a
   colour only one object has) and "what color is the <shape>?" in the evaluation wrapper. Linear probes on the
   LM's residual stream after every layer, at the question's key word (the colour / shape it names) and at the
   position that predicts the answer, name the asked attribute (1200 training / 300 held-out items, half per
   question kind). Beside them: the model's own answers (ranked by likelihood) by object count, the same shapes
   read while continuing the scene's description ("… A large red" → shape), the model's own next-token prediction
   at the key word (best shape / colour), and a guess among the attributes present. A probe far above the model's
   answers means the information reaches that position and the read-out into the answer tokens is what fails.

``--boxes CHECKPOINT…`` asks where position is lost (writes ``benchmarks/results/nano-boxes-probe.md``):

10. **Where is the object?** Scenes of a single object at the model's image size. Probes predict its box
    ``[x1, y1, x2, y2]`` (0–100 grid) from the ViT patches (flattened, an MLP), from the flattened Q-Former
    queries and from the projected image tokens (ridge regression and an MLP); Acc@0.5 (IoU ≥ 0.5, the referring
    metric) and the mean absolute corner error on held-out scenes. The mean box of the training scenes is the
    floor: a probe at its level finds no position in those features.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import tinygptv
from tinygptv.eval.base import VQA_SHORT_ANSWER
from tinygptv.synth.text import caption
from tinygptv.synth.world import COLOURS, SHAPES, Scene
from tinygptv.templates import get_template

RESULTS = Path(__file__).parent / "results"
STAGES = ("stage1", "stage2", "stage3", "stage4")
GRID = 4


def _ranked_first(model, image, prompt: str, candidates: list[str], lead: str = "") -> str:
    """The candidate the model finds most likely after ``prompt`` (each continuation is ``lead + candidate``)."""
    return _best(candidates, [model.loglikelihood(image, prompt, lead + c) for c in candidates])


def _best(candidates: list[str], scores: list[float]) -> str:
    """The candidate with the highest score (the first on ties)."""
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]


def _scenes(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


@torch.no_grad()
def image_dependence(model, eval_root: Path, n: int) -> dict[str, float]:
    """Answer / caption log-likelihood with the true image and with the next item's image."""
    meta = json.loads((eval_root / "meta.json").read_text())
    items = [it for it in meta["sets"]["gqa"]["items"].values()
             if it.get("category") in ("colour", "shape")][:n]
    wrapper = get_template("eval")
    qa_true = qa_other = 0.0
    for i, it in enumerate(items):
        other = items[(i + 1) % len(items)]
        prompt = wrapper.user_turn(VQA_SHORT_ANSWER.format(it["query"]), True)
        qa_true += model.loglikelihood(eval_root / it["image"], prompt, it["answer"])
        qa_other += model.loglikelihood(eval_root / other["image"], prompt, it["answer"])
    scenes = _scenes(eval_root / "scenes.jsonl")[:n]
    rng = random.Random(0)
    caps = [caption(Scene.from_dict(r["scene"]), rng) for r in scenes]
    cap_true = cap_other = 0.0
    for i, (r, cap) in enumerate(zip(scenes, caps)):
        other = scenes[(i + 1) % len(scenes)]
        cap_true += model.loglikelihood(eval_root / r["image"], "<Img><ImageHere></Img> ", cap)
        cap_other += model.loglikelihood(eval_root / other["image"], "<Img><ImageHere></Img> ", cap)
    return {"answer_true": qa_true / len(items), "answer_other": qa_other / len(items),
            "caption_true": cap_true / len(scenes), "caption_other": cap_other / len(scenes), "n": len(items)}


def slot_targets(scene: Scene) -> torch.Tensor:
    """``[GRID², 2]`` (colour id, shape id) of the object centred in each cell, 0 = empty (larger object wins)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    out = torch.zeros(GRID * GRID, 2, dtype=torch.long)
    W, H = scene.size
    for o in sorted(scene.objects, key=lambda o: o.box[2] * o.box[3]):
        cx, cy = o.centre
        cell = min(GRID - 1, int(GRID * cy / H)) * GRID + min(GRID - 1, int(GRID * cx / W))
        out[cell] = torch.tensor([colours.index(o.colour) + 1, shapes.index(o.shape) + 1])
    return out


@torch.no_grad()
def query_features(model, rows: list[dict], root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    feats, targets = [], []
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        images = [Image.open(root / r["image"]).convert("RGB") for r in chunk]
        feats.append(model.qformer(model.vision(model.pixel_values(images))).float())
        targets += [slot_targets(Scene.from_dict(r["scene"])) for r in chunk]
    return torch.cat(feats), torch.stack(targets)


def slot_probe(model, world: Path, n_train: int, n_test: int, steps: int = 500) -> dict[str, float]:
    if model.cfg.qformer.num_queries != GRID * GRID:
        return {"skipped": f"needs {GRID * GRID} queries"}
    train_rows = [r for r in _scenes(world / "scenes.jsonl") if ":" not in r["image"]][:n_train]
    x_tr, y_tr = query_features(model, train_rows, world)
    x_te, y_te = query_features(model, _scenes(world / "eval" / "scenes.jsonl")[:n_test], world / "eval")
    nc, ns = len(COLOURS) + 1, len(SHAPES) + 1
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_tr.shape[-1], nc + ns)
    opt = torch.optim.Adam(probe.parameters(), 3e-3)
    for _ in range(steps):
        out = probe(x_tr)
        loss = (F.cross_entropy(out[..., :nc].reshape(-1, nc), y_tr[..., 0].reshape(-1))
                + F.cross_entropy(out[..., nc:].reshape(-1, ns), y_tr[..., 1].reshape(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = probe(x_te)
    occupied = y_te[..., 1] > 0
    colour_ok = (out[..., :nc].argmax(-1) == y_te[..., 0])[occupied].float().mean()
    shape_ok = (out[..., nc:].argmax(-1) == y_te[..., 1])[occupied].float().mean()
    return {"probe_train_loss": float(loss), "occupied_colour_acc": 100 * float(colour_ok),
            "occupied_shape_acc": 100 * float(shape_ok), "occupied_fraction": 100 * float(occupied.float().mean())}


@torch.no_grad()
@torch.no_grad()
def answer_from_context(lm, tok, context: str, candidates: list[str], prefix: torch.Tensor | None = None) -> str:
    """The candidate a text-only LM finds likeliest as the answer (`` <candidate>\\n``) after ``context``,
    itself after the input vectors ``prefix [P, C]`` if given (``lm`` must then be a ``PhiLM``)."""
    from tinygptv.model.sequence import IGNORE_INDEX, token_logprobs

    ids = tok.encode(context)
    lead = 0 if prefix is None else prefix.shape[0]
    scores = []
    for c in candidates:
        x = torch.tensor([ids + tok.encode(f" {c}\n")])
        labels = torch.cat([torch.full((1, lead), IGNORE_INDEX), x], 1)
        labels[:, :lead + len(ids)] = IGNORE_INDEX  # score the answer only
        logits = lm(x) if prefix is None else lm(inputs_embeds=torch.cat([prefix[None], lm.embed_tokens(x)], 1))
        scores.append(float(token_logprobs(logits, labels)[0]))
    return _best(candidates, scores)


def context_qa(lm_file: Path, tokenizer_dir: Path, n: int = 200) -> dict[str, float]:
    """Accuracy (%) of a stage-0 LM answering colour / shape questions about a description in its context."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from tinygptv.model.phi import PhiLM
    from tinygptv.nano.recipe import nano_config
    from tinygptv.synth.text import detail, questions
    from tinygptv.synth.world import sample_scene
    from tinygptv.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tokenizer_dir)
    cfg = nano_config(tok.vocab_size).lm
    lm = PhiLM(replace(cfg, qk_norm=False, post_attn_norm=False))
    lm.load_state_dict(load_file(str(lm_file)))
    lm.eval()
    rng = random.Random(99)
    right = {"colour": 0, "shape": 0}
    total = {"colour": 0, "shape": 0}
    for i in range(n):
        scene = sample_scene(rng, f"context-{i}")
        cat = ("colour", "shape")[i % 2]
        pool = questions(scene, rng)[cat]
        if not pool:
            continue
        qa = rng.choice(pool)
        cands = list(COLOURS) if cat == "colour" else list(SHAPES)
        right[cat] += answer_from_context(lm, tok, detail(scene) + "\n" + qa.question, cands) == qa.answer
        total[cat] += 1
    return {k: 100 * right[k] / max(1, total[k]) for k in right} | {"n": sum(total.values())}


def shape_probe(checkpoint: Path, n_train: int = 1500, n_test: int = 300, steps: int = 300,
                size: int = 64) -> dict[str, float]:
    """Accuracy (%) of linear probes reading a single object's shape from the vision tower of ``checkpoint``,
    at ``size`` px (the stage 1-3 resolution)."""
    from tinygptv.synth.render import render
    from tinygptv.synth.world import sample_scene

    model = tinygptv.load(checkpoint).eval()
    if model.image_size != size:
        model.vision.set_image_size(size)
    rng = random.Random(7)

    @torch.no_grad()
    def features(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scenes = [sample_scene(rng, f"shape-{i}", n_objects=1) for i in range(n)]
        vit, queries = [], []
        for start in range(0, n, 64):
            px = model.pixel_values([render(s) for s in scenes[start:start + 64]])
            feats = model.vision(px)
            vit.append(feats[:, 1:].mean(1).float())
            queries.append(model.qformer(feats).flatten(1).float())
        labels = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
        return torch.cat(vit), torch.cat(queries), labels

    vit_tr, q_tr, y_tr = features(n_train)
    vit_te, q_te, y_te = features(n_test)
    return {name: linear_probe(x_tr, y_tr, x_te, y_te, len(SHAPES), steps, weight_decay=1e-4)
            for name, x_tr, x_te in (("vit_mean", vit_tr, vit_te), ("qformer", q_tr, q_te))}


def linear_probe(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, classes: int,
                 steps: int = 300, weight_decay: float = 1e-4) -> float:
    """Held-out accuracy (%) of a linear classifier trained (full batch, Adam) on standardised features.

    Features ``[N, C]``, or ``[N, T, C]`` for one classifier shared by all ``T`` tokens of an item, whose logits
    are averaged over the tokens (statistics over items and tokens)."""
    dims = tuple(range(x_tr.dim() - 1))
    mu, sd = x_tr.mean(dims), x_tr.std(dims) + 1e-5
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_tr.shape[-1], classes)

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = probe((x - mu) / sd)
        return out.mean(1) if out.dim() == 3 else out

    opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(logits(x_tr), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return 100 * float((logits(x_te).argmax(-1) == y_te).float().mean())


def qa_probe(lm_file: Path, tower: Path, tokenizer_dir: Path, steps: int, single: bool, size: int = 64,
             n_test: int = 120) -> dict[str, float]:
    """Accuracy (%) on colour / shape questions after ``steps`` steps of the paper's trainable set on them."""
    import tempfile

    from safetensors.torch import load_file

    from tinygptv.model.sequence import Example
    from tinygptv.nano.recipe import nano_config
    from tinygptv.nano.stage0 import assemble_base
    from tinygptv.synth.render import render
    from tinygptv.synth.text import questions
    from tinygptv.synth.world import sample_scene
    from tinygptv.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.from_folder(tokenizer_dir)
    src = tinygptv.load(tower)
    if src.image_size != size:
        src.vision.set_image_size(size)
    with tempfile.TemporaryDirectory() as tmp:
        assemble_base(nano_config(tok.vocab_size), tok, load_file(str(lm_file)), src.vision.state_dict(),
                      src.qformer.state_dict(), Path(tmp))
        model = tinygptv.load(tmp)
    model.set_trainable()
    wrapper = get_template("eval")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.05)

    def item(rng: random.Random):
        while True:
            scene = sample_scene(rng, f"probe-{rng.random()}", n_objects=1 if single else None)
            cat = rng.choice(("colour", "shape"))
            pool = questions(scene, rng)[cat]
            if pool:
                return scene, cat, rng.choice(pool)

    rng = random.Random(1)
    model.train()
    model.vision.eval()
    model.qformer.eval()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 30)
        items = [item(rng) for _ in range(8)]
        examples = [Example(wrapper.user_turn(qa.question, True), [(qa.answer + "###", True)]) for _, _, qa in items]
        loss = model(examples, [model.pixel_values([render(sc)]) for sc, _, _ in items]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    rng = random.Random(99)
    right = {"colour": 0, "shape": 0}
    total = {"colour": 0, "shape": 0}
    with torch.no_grad():
        for _ in range(n_test):
            scene, cat, qa = item(rng)
            cands = list(COLOURS) if cat == "colour" else list(SHAPES)
            image = render(scene)
            prompt = wrapper.user_turn(qa.question, True)
            scores = [model.loglikelihood(image, prompt, c + "###") for c in cands]
            right[cat] += _best(cands, scores) == qa.answer
            total[cat] += 1
    return {k: 100 * right[k] / max(1, total[k]) for k in right} | {"n": n_test}


def _scene_features(model, n: int, seed: int):
    """(scene, ViT patch features [g², W], Q-Former outputs [Q, H]) of ``n`` fresh scenes at the model's size."""
    from tinygptv.image import preprocess
    from tinygptv.synth.render import render
    from tinygptv.synth.world import sample_scene

    rng = random.Random(seed)
    size = model.image_size
    for i in range(n):
        scene = sample_scene(rng, f"towers-{seed}-{i}", image_size=size)
        with torch.no_grad():
            feats = model.vision(preprocess(render(scene), size)[None])
            queries = model.qformer(feats)
        yield scene, feats[0, 1:].float(), queries[0].float()


def object_probe(model, n_train: int = 800, n_test: int = 200) -> dict[str, float]:
    """Measurement 6: accuracy (%) of linear probes reading each object's attributes at its centre patch."""
    from tinygptv.synth.world import SIZES

    grid = model.image_size // model.cfg.vision.patch_size
    names = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}

    def data(n: int, seed: int):
        xs, ys = [], []
        for scene, patches, _ in _scene_features(model, n, seed):
            W, H = scene.size
            for o in scene.objects:
                x, y, w, h = o.box
                col, row = min(grid - 1, int((x + w / 2) / W * grid)), min(grid - 1, int((y + h / 2) / H * grid))
                xs.append(patches[row * grid + col])
                ys.append([names["colour"].index(o.colour), names["shape"].index(o.shape), names["size"].index(o.size)])
        return torch.stack(xs), torch.tensor(ys)

    x_tr, y_tr = data(n_train, 1)
    x_te, y_te = data(n_test, 2)
    return {"objects": len(y_te)} | {key: linear_probe(x_tr, y_tr[:, j], x_te, y_te[:, j], len(values),
                                                       weight_decay=1e-3)
                                     for j, (key, values) in enumerate(names.items())}


def retrieval_probe(model, n_train: int = 1500, n_test: int = 300, steps: int = 1500) -> dict[str, float]:
    """Measurement 7: accuracy (%) of one attention hop over the frozen queries, keyed by a colour or a shape."""
    colours, shapes = list(COLOURS), list(SHAPES)
    nc = len(colours)

    def data(n: int, seed: int):
        qs, rows = [], []
        for i, (scene, _, queries) in enumerate(_scene_features(model, n, seed)):
            qs.append(queries)
            cs, ss = [o.colour for o in scene.objects], [o.shape for o in scene.objects]
            for o in scene.objects:  # (scene, key id, label id, objects): shape ids follow colour ids
                if ss.count(o.shape) == 1:
                    rows.append((i, nc + shapes.index(o.shape), colours.index(o.colour), len(cs)))
                if cs.count(o.colour) == 1:
                    rows.append((i, colours.index(o.colour), nc + shapes.index(o.shape), len(cs)))
        return torch.stack(qs), torch.tensor(rows)

    torch.manual_seed(0)
    q_tr, r_tr = data(n_train, 1)
    q_te, r_te = data(n_test, 2)
    hidden = q_tr.shape[-1]
    mu, sd = q_tr.mean((0, 1)), q_tr.std((0, 1)) + 1e-5
    key = torch.nn.Embedding(nc + len(shapes), hidden)
    wq, wk, wv = (torch.nn.Linear(hidden, hidden) for _ in range(3))
    head = torch.nn.Linear(hidden, nc + len(shapes))
    modules = (key, wq, wk, wv, head)
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], 3e-3)

    def forward(qs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        q = (qs[rows[:, 0]] - mu) / sd  # [P, Q, H]
        attn = torch.softmax(torch.einsum("pqh,ph->pq", wk(q), wq(key(rows[:, 1]))) / hidden ** 0.5, -1)
        return head(torch.einsum("pq,pqh->ph", attn, wv(q)))

    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = r_tr[torch.randint(0, len(r_tr), (256,), generator=g)]
        loss = F.cross_entropy(forward(q_tr, pick), pick[:, 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ok = (forward(q_te, r_te).argmax(-1) == r_te[:, 2]).float()
    by_colour = r_te[:, 1] < nc
    return {"all": 100 * float(ok.mean()), "shape_of_colour": 100 * float(ok[by_colour].mean()),
            "colour_of_shape": 100 * float(ok[~by_colour].mean()), "n": len(r_te),
            **{f"objects_{k}": 100 * float(ok[r_te[:, 3] == k].mean()) for k in (2, 3, 4)
               if bool((r_te[:, 3] == k).any())}}


def _single_object_scenes(n: int, seed: int, size: int) -> list[Scene]:
    from tinygptv.synth.world import sample_scene

    rng = random.Random(seed)
    return [sample_scene(rng, f"one-{seed}-{i}", image_size=size, n_objects=1) for i in range(n)]


def reading_probe(model, n: int = 120, n_train: int = 1500, n_test: int = 300) -> dict[str, float]:
    """Measurement 8: a single object's shape from the LM's image tokens, and the model's own answers (%)."""
    from tinygptv.synth.render import render

    size = model.image_size

    @torch.no_grad()
    def tokens(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat([model.encode_images(model.pixel_values([render(s) for s in scenes[i:i + 64]])).float()
                         for i in range(0, len(scenes), 64)])
        return emb, torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])  # [N, Q, C], [N]

    probe = linear_probe(*tokens(_single_object_scenes(n_train, 1, size)),
                         *tokens(_single_object_scenes(n_test, 2, size)), len(SHAPES))
    describe = model.template.user_turn("Describe this image in detail.", True)
    wrapper = get_template("eval")
    hits = dict.fromkeys(("describe_shape", "describe_colour", "ask_shape", "ask_colour"), 0)
    scenes = _single_object_scenes(n, 3, size)
    with torch.no_grad():
        for scene in scenes:
            o, image = scene.objects[0], render(scene)
            lead = f"{describe}The image shows 1 object on a light background. A {o.size}"
            asks = {"shape": VQA_SHORT_ANSWER.format(f"what shape is the {o.colour} object?"),
                    "colour": VQA_SHORT_ANSWER.format(f"what color is the {o.shape}?")}
            for key, cands, gold, prefix in (("shape", list(SHAPES), o.shape, f"{lead} {o.colour}"),
                                              ("colour", list(COLOURS), o.colour, lead)):
                hits[f"describe_{key}"] += _ranked_first(model, image, prefix, cands, " ") == gold
                hits[f"ask_{key}"] += _ranked_first(model, image, wrapper.user_turn(asks[key], True), cands) == gold
    return {"probe_shape": probe, "n": n, **{k: 100 * v / n for k, v in hits.items()}}


def _binding_items(n: int, seed: int, size: int) -> list[tuple[Scene, str, object]]:
    """(scene, kind, object) for scenes of 2–4 objects: kind ``shape`` asks the shape of the object with a colour
    no other object has, ``colour`` the colour of the object with a unique shape (alternating)."""
    from tinygptv.synth.world import sample_scene

    rng = random.Random(seed)
    items = []
    while len(items) < n:
        scene = sample_scene(rng, f"bind-{seed}-{len(items)}", image_size=size, n_objects=2 + len(items) % 3)
        kind = ("shape", "colour")[len(items) % 2]
        keys = [o.colour if kind == "shape" else o.shape for o in scene.objects]
        unique = [o for o, k in zip(scene.objects, keys) if keys.count(k) == 1]
        if unique:
            items.append((scene, kind, rng.choice(unique)))
    return items


def question_path_probe(model, n_train: int = 1200, n_test: int = 300) -> dict[str, dict]:
    """Measurement 9: where the asked object's attribute is in the question-answering path (2–4 objects)."""
    from tinygptv.model.sequence import Example
    from tinygptv.synth.render import render
    from tinygptv.synth.text import detail, indefinite

    wrapper, tok = get_template("eval"), model.tokenizer
    vocab = {"shape": list(SHAPES), "colour": list(COLOURS)}
    acts: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda _m, _i, out, i=i: acts.__setitem__(i, out))
             for i, block in enumerate(model.lm.layers)]

    def prompt(kind: str, o) -> tuple[str, str]:  # (prompt in the evaluation wrapper, the key word it names)
        key = o.colour if kind == "shape" else o.shape
        question = f"what shape is the {key} object?" if kind == "shape" else f"what color is the {key}?"
        return wrapper.user_turn(VQA_SHORT_ANSWER.format(question), True), key

    @torch.no_grad()
    def run(items):
        feats: dict[tuple[str, str, int], list[torch.Tensor]] = {}
        labels: dict[str, list[int]] = {"shape": [], "colour": []}
        guesses: dict[str, list[int]] = {"shape": [], "colour": []}
        for scene, kind, o in items:
            text, key = prompt(kind, o)
            post = text.split("<ImageHere>", 1)[1]
            upto = post[:post.index(f" {key}") + len(key) + 1]
            ids, head = tok.encode(post), tok.encode(upto)
            if ids[:len(head)] != head:
                raise RuntimeError(f"the key word does not end a token in {post!r}")
            batch = model.prepare([Example(text, [("x", True)])], [model.pixel_values([render(scene)])])
            model.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
            last = int((batch.labels[0] != -100).nonzero()[0]) - 1  # predicts the answer's first token
            at = {"key": last - (len(ids) - len(head)), "answer": last}
            guess = model.lm.lm_head(model.lm.final_layernorm(acts[len(acts) - 1][0, at["key"]]))[cand_ids[kind]]
            guesses[kind].append(int(guess.argmax()))
            for layer, h in acts.items():
                for where, pos in at.items():
                    feats.setdefault((kind, where, layer), []).append(h[0, pos].float())
            labels[kind].append(vocab[kind].index(getattr(o, kind)))
        return ({k: torch.stack(v) for k, v in feats.items()}, {k: torch.tensor(v) for k, v in labels.items()},
                {k: torch.tensor(v) for k, v in guesses.items()})

    cand_ids = {}
    for kind, words in vocab.items():
        ids = [tok.encode(" " + w) for w in words]
        if any(len(i) != 1 for i in ids):
            raise RuntimeError(f"a {kind} word is not one token: {words}")
        cand_ids[kind] = [i[0] for i in ids]
    size = model.image_size
    train, test = _binding_items(n_train, 11, size), _binding_items(n_test, 12, size)
    try:
        (x_tr, y_tr, _), (x_te, y_te, g_te) = run(train), run(test)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict] = {}
    describe = model.template.user_turn("Describe this image in detail.", True)
    for kind in ("shape", "colour"):
        cands = vocab[kind]
        row: dict = {f"{where}_layer{layer + 1}": linear_probe(x_tr[kind, where, layer], y_tr[kind],
                                                               x_te[kind, where, layer], y_te[kind], len(cands))
                     for (k, where, layer) in x_tr if k == kind}
        asked, said, guess = {}, {}, []
        with torch.no_grad():
            for scene, k, o in test:
                if k != kind:
                    continue
                n, image, gold = len(scene.objects), render(scene), getattr(o, kind)
                asked.setdefault(n, []).append(_ranked_first(model, image, prompt(kind, o)[0], cands) == gold)
                guess.append(1 / n)
                if kind == "shape":  # continuing the scene's own description up to "… a large red"
                    desc, phrase = detail(scene), indefinite(o)
                    end = desc.lower().index(phrase.lower()) + len(phrase) - len(o.shape) - 1
                    said.setdefault(n, []).append(
                        _ranked_first(model, image, describe + desc[:end], cands, " ") == gold)
        row["asked"] = {n: 100 * sum(v) / len(v) for n, v in sorted(asked.items())}
        row["describing"] = {n: 100 * sum(v) / len(v) for n, v in sorted(said.items())}
        row["present_guess"] = 100 * sum(guess) / len(guess)
        row["key_next_token"] = 100 * float((g_te[kind] == y_te[kind]).float().mean())
        row["n_train"], row["n_test"] = len(y_tr[kind]), len(y_te[kind])
        out[kind] = row
    return out


def _box_features(model, n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """([ViT patches, Q-Former queries, image tokens], each ``[n, …]`` flattened; boxes ``[n, 4]`` on the 0–100
    grid) of ``n`` fresh single-object scenes."""
    from tinygptv.image import preprocess
    from tinygptv.synth.render import render

    feats, boxes = [[], [], []], []
    size = model.image_size
    scenes = _single_object_scenes(n, seed, size)
    for i in range(0, n, 100):
        chunk = scenes[i:i + 100]
        with torch.no_grad():
            patches = model.vision(torch.stack([preprocess(render(sc), size) for sc in chunk]))
            queries = model.qformer(patches)
            tokens = model.projector(queries)
        for out, t in zip(feats, (patches[:, 1:], queries, tokens)):
            out.append(t.float().flatten(1))
        for sc in chunk:
            (x, y, w, h), (W, H) = sc.objects[0].box, sc.size
            boxes.append([100 * x / W, 100 * y / H, 100 * (x + w) / W, 100 * (y + h) / H])
    return [torch.cat(f) for f in feats], torch.tensor(boxes)


def _box_scores(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Acc@0.5 (%) and mean absolute corner error (grid units) of predicted boxes."""
    lo, hi = torch.maximum(pred[:, :2], truth[:, :2]), torch.minimum(pred[:, 2:], truth[:, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)

    def area(b: torch.Tensor) -> torch.Tensor:
        return (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)

    iou = inter / (area(pred) + area(truth) - inter).clamp(min=1e-6)
    return {"acc50": 100 * float((iou >= 0.5).float().mean()), "mae": float((pred - truth).abs().mean())}


def _ridge(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, lam: float = 10.0) -> torch.Tensor:
    mu, ym = x_tr.mean(0), y_tr.mean(0)
    xc = x_tr - mu
    w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(xc.shape[1]), xc.T @ (y_tr - ym))
    return (x_te - mu) @ w + ym


def _mlp(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, steps: int = 3000) -> torch.Tensor:
    torch.manual_seed(0)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-5
    net = torch.nn.Sequential(torch.nn.Linear(x_tr.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 4))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.01)
    xn = (x_tr - mu) / sd
    for _ in range(steps):
        i = torch.randint(0, len(xn), (128,))
        loss = (net(xn[i]) - y_tr[i]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net((x_te - mu) / sd)


def box_probe(model, n_train: int = 3000, n_test: int = 500) -> dict[str, dict[str, float]]:
    """Measurement 10: single-object boxes read from each stage of the vision side."""
    (tr, y_tr), (te, y_te) = _box_features(model, n_train, 10), _box_features(model, n_test, 11)
    out = {"mean box": _box_scores(y_tr.mean(0).expand_as(y_te), y_te)}
    for j, name in enumerate(("ViT patches", "Q-Former queries", "image tokens")):
        if name != "ViT patches":  # 32768 features: the ridge's solve takes many minutes
            out[f"{name}, ridge"] = _box_scores(_ridge(tr[j], y_tr, te[j]), y_te)
        out[f"{name}, MLP"] = _box_scores(_mlp(tr[j], y_tr, te[j]), y_te)
    return out


def boxes_report(checkpoints: list[str]) -> None:
    """Measurement 10 for each checkpoint → ``benchmarks/results/nano-boxes-probe.{md,json}``."""
    command = "python benchmarks/nano_diagnostics.py --boxes " + " ".join(checkpoints)
    report = {ck: box_probe(tinygptv.load(ck).eval()) for ck in checkpoints}
    lines = ["# Where the nano model's vision side keeps position", "",
             f"Produced by `{command}`. Single-object scenes at each model's image size, 3000 training / 500 "
             "held-out; boxes on the 0–100 grid. Acc@0.5: IoU ≥ 0.5; MAE: mean absolute corner error.", "",
             "| checkpoint | features, probe | Acc@0.5 % | MAE |", "|---|---|---|---|"]
    lines += [f"| {ck} | {name} | {r['acc50']:.1f} | {r['mae']:.1f} |"
              for ck, rows in report.items() for name, r in rows.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nano-boxes-probe.json").write_text(json.dumps(report, indent=1))
    (RESULTS / "nano-boxes-probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def towers_report(checkpoints: list[str]) -> None:
    """Measurements 6, 7, 8 and 9 for each checkpoint → ``benchmarks/results/nano-towers.md``."""
    command = "python benchmarks/nano_diagnostics.py --towers " + " ".join(checkpoints)
    lines = ["# What the nano model's frozen vision side holds", "",
             f"Produced by `{command}`. Fresh scenes of 1–4 objects at each model's image size.", "",
             ("| checkpoint | ViT, per object: colour % | shape % | size % | Q-Former, one hop: all % | "
              "shape of the <colour> one % | colour of the <shape> % | 2 / 3 / 4 objects % |"),
             "|---|---|---|---|---|---|---|---|"]
    reading, paths = [], []
    for ck in checkpoints:
        model = tinygptv.load(ck).eval()  # 'nano' is the bundled model
        obj, ret, read = object_probe(model), retrieval_probe(model), reading_probe(model)
        path = question_path_probe(model)
        print(ck, obj, ret, read, path, flush=True)
        layers = len(model.lm.layers)
        for kind, r in path.items():
            probes = " | ".join(f"{r[f'key_layer{i}']:.0f} / {r[f'answer_layer{i}']:.0f}" for i in range(1, layers + 1))
            asked = " / ".join(f"{v:.0f}" for v in r["asked"].values())
            said = " / ".join(f"{v:.0f}" for v in r["describing"].values()) or "—"
            question = "shape of the <colour> one" if kind == "shape" else "colour of the <shape>"
            paths.append(f"| {ck} | {question} | {probes} | {r['key_next_token']:.0f} | {asked} | {said} | "
                         f"{r['present_guess']:.0f} |")
        per_n = " / ".join(f"{ret[f'objects_{k}']:.0f}" for k in (2, 3, 4) if f"objects_{k}" in ret)
        lines.append(f"| {ck} | {obj['colour']:.1f} | {obj['shape']:.1f} | {obj['size']:.1f} | {ret['all']:.1f} | "
                     f"{ret['shape_of_colour']:.1f} | {ret['colour_of_shape']:.1f} | {per_n} |")
        reading.append(f"| {ck} | {read['probe_shape']:.1f} | {read['describe_shape']:.1f} | "
                       f"{read['ask_shape']:.1f} | {read['describe_colour']:.1f} | {read['ask_colour']:.1f} |")
    lines += ["", (f"Chance: colour {100 / len(COLOURS):.1f} %, shape {100 / len(SHAPES):.1f} %. ViT probes: 800 "
                   "training / 200 held-out scenes; one-hop probe: 1500 / 300."),
              "", "One object per scene (measurement 8): what the LM is given, and what the model says.", "",
              ("| checkpoint | shape from the image tokens, one shared linear probe % | model, describing: shape % "
               "| model, asked: shape % | describing: colour % | asked: colour % |"),
              "|---|---|---|---|---|---|", *reading, "",
              "Probe: 1500 training / 300 held-out scenes; the model's answers: 120 scenes, ranked by likelihood.",
              "", ("2–4 objects, asked in the evaluation wrapper (measurement 9): the asked attribute read by a linear "
                   "probe from the LM's residual stream after each layer, at the question's key word / at the "
                   "position that predicts the answer; then the model's answers and its description by object count."),
              "",
              ("| checkpoint | question | " + " | ".join(f"layer {i}: key / answer %" for i in range(1, layers + 1))
               + " | the model's next token at the key word % | model, asked: 2 / 3 / 4 objects % "
               "| describing: 2 / 3 / 4 objects % | guess among present % |"),
              "|---|---|" + "---|" * layers + "---|---|---|---|", *paths, "",
              ("Probes: 1200 training / 300 held-out items (half per question); answers ranked by likelihood. "
               "Next token at the key word: the model's own prediction there (after \"… the red\" in the question), "
               "the best of the shapes / colours.")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nano-towers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/nano", help="output folder of `tinygptv train --recipe nano`")
    ap.add_argument("--n", type=int, default=40, help="held-out items for the likelihood gaps")
    ap.add_argument("--probe-train", type=int, default=3000)
    ap.add_argument("--compare-lm", help="another stage-0 lm.safetensors (same tokenizer) for measurement 3")
    ap.add_argument("--compare-tower", help="another checkpoint whose vision tower measurement 4 probes too")
    ap.add_argument("--qa-steps", type=int, default=400, help="training steps of measurement 5 (0 skips it)")
    ap.add_argument("--towers", nargs="+", metavar="CHECKPOINT",
                    help="only measurements 6-9 on these final models ('nano' = the bundled one)")
    ap.add_argument("--boxes", nargs="+", metavar="CHECKPOINT",
                    help="only measurement 10 on these models ('nano' = the bundled one)")
    args = ap.parse_args()
    if args.boxes:
        boxes_report(args.boxes)
        return
    if args.towers:
        towers_report(args.towers)
        return
    torch.manual_seed(0)
    run = Path(args.run)
    world = run / "world"
    report = {"run": str(run), "stages": {}}
    for stage in STAGES:
        model = tinygptv.load(run / stage / "final").eval()
        report["stages"][stage] = image_dependence(model, world / "eval", args.n)
        print(stage, report["stages"][stage], flush=True)
    report["slot_probe"] = slot_probe(model, world, args.probe_train, 400)
    print("slot probe", report["slot_probe"], flush=True)
    lms = {"this run": run / "stage0" / "lm.safetensors"}
    if args.compare_lm:
        lms[args.compare_lm] = Path(args.compare_lm)
    report["context_qa"] = {name: context_qa(path, run / "stage0" / "tokenizer") for name, path in lms.items()}
    print("context QA", report["context_qa"], flush=True)
    towers = {"this run": run / "stage0" / "base"}
    if args.compare_tower:
        towers[args.compare_tower] = Path(args.compare_tower)
    report["shape_probe"] = {name: shape_probe(path) for name, path in towers.items()}
    print("shape probe", report["shape_probe"], flush=True)
    report["qa_probe"] = {}
    if args.qa_steps:
        for name, path in towers.items():
            for single in (False, True):
                key = f"{name}, {'one object' if single else '1-4 objects'}"
                report["qa_probe"][key] = qa_probe(run / "stage0" / "lm.safetensors", path,
                                                   run / "stage0" / "tokenizer", args.qa_steps, single)
                print("QA probe", key, report["qa_probe"][key], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "nano-diagnostics.json").write_text(json.dumps(report, indent=1))
    lines = ["# Nano model diagnostics", "", f"Run: `{run}`. Produced by `python benchmarks/nano_diagnostics.py`.", "",
             "Mean log-likelihood (nats) with each item's own image vs. another scene's image:", "",
             "| stage | colour/shape answer, own image | other image | gap | caption, own image | other image | gap |",
             "|---|---|---|---|---|---|---|"]
    for stage, r in report["stages"].items():
        lines.append(f"| {stage} | {r['answer_true']:.3f} | {r['answer_other']:.3f} | "
                     f"{r['answer_true'] - r['answer_other']:.3f} | {r['caption_true']:.2f} | "
                     f"{r['caption_other']:.2f} | {r['caption_true'] - r['caption_other']:.2f} |")
    p = report["slot_probe"]
    lines += ["", "Per-query probe (query i → colour / shape of the object centred in grid cell i, final Q-Former): "
              + (p["skipped"] if "skipped" in p else
                 f"occupied-cell accuracy colour {p['occupied_colour_acc']:.1f} %, shape "
                 f"{p['occupied_shape_acc']:.1f} % ({p['occupied_fraction']:.0f} % of cells occupied; a probe "
                 f"that always answers 'empty' scores 0).")]
    lines += ["", "Stage-0 LM answering from its context (text only: a scene description, then a colour / shape "
              "question; chance 12.5 % / 16.7 %):", "", "| LM | colour % | shape % | items |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['colour']:.1f} | {r['shape']:.1f} | {r['n']} |"
              for name, r in report["context_qa"].items()]
    lines += ["", "Vision tower seeing shapes (one object per scene; linear probes, 1500 train / 300 test scenes; "
              f"chance {100 / len(SHAPES):.1f} %):", "", "| tower | from mean ViT patch % | from Q-Former queries % |",
              "|---|---|---|"]
    lines += [f"| {name} | {r['vit_mean']:.1f} | {r['qformer']:.1f} |" for name, r in report["shape_probe"].items()]
    if report["qa_probe"]:
        lines += ["", f"The paper's trainable set learning to read a tower ({args.qa_steps} steps, batch 8, colour / "
                  "shape questions only, this run's stage-0 LM; chance 12.5 % / 16.7 %):", "",
                  "| tower, scenes | colour % | shape % | items |", "|---|---|---|---|"]
        lines += [f"| {k} | {r['colour']:.1f} | {r['shape']:.1f} | {r['n']} |" for k, r in report["qa_probe"].items()]
    (RESULTS / "nano-diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
