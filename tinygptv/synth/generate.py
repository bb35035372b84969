"""Top level: :func:`generate_world` writes the whole synthetic world under one folder.

Layout of ``out`` (the training readers' data root; see :mod:`tinygptv.data.registry`)::

    laion/laion_dataset/0000{0..5}.tar, cc_sbu/cc_sbu_dataset/0000{0..2}.tar      stages 1-2
    cc_sbu_align/{filter_cap.json,image/}                                        stage 3
    coco/train2014/, coco_captions/, vqav2/, okvqa/, refcoco_annotations/, llava/, multitask_conversation/,
    coco/train2017/ + aokvqa/, gqa/, ocrvqa/, textcaps/, visual_genome/, flickr/, unnatural_instructions/, custom/
    eval/{gqa,vsr,vizwiz,hm,iconqa,refcoco,refcoco+,refcocog,coco}/ + eval/meta.json + eval/scenes.jsonl
    scenes.jsonl     every training image: {"dataset", "image" (path, or "shard.tar:key"), "scene"}
    corpus.txt       every training text line (captions, QA, instructions), deduplicated, in order
    world.json       vocabulary and dataset counts for the trainer
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tinygptv.synth import writers
from tinygptv.synth.context import WorldContext
from tinygptv.synth.evalsets import EVAL_DIR, write_eval_sets
from tinygptv.synth.text import CATEGORIES
from tinygptv.synth.world import COLOURS, PLURALS, POSITIONS, RELATIONS, SHAPES, SIZES, WORDS
from tinygptv.synth.writers_coco import write_coco

log = logging.getLogger("tinygptv.synth")

WORLD_VERSION = 1
DEFAULT_EVAL_SIZE = 200
# top-level entries this generator writes (and ``force`` may remove)
OUTPUTS = ("laion", "cc_sbu", "cc_sbu_align", "coco", "coco_captions", "vqav2", "okvqa", "aokvqa", "gqa", "ocrvqa",
           "textcaps", "refcoco_annotations", "visual_genome", "flickr", "llava", "multitask_conversation",
           "unnatural_instructions", "custom", EVAL_DIR, "scenes.jsonl", "corpus.txt", "world.json")


def generate_world(out: str | Path, seed: int = 0, scale: float = 1.0, eval_size: int = DEFAULT_EVAL_SIZE,
                   image_size: int = 128, force: bool = False) -> dict[str, Any]:
    """Write the synthetic world (training datasets, eval sets, corpus, ``world.json``) under ``out``.

    Args:
        out: output folder; must be empty or absent unless ``force`` (which first removes only the entries
            this function writes, see :data:`OUTPUTS`).
        seed: world seed; the same seed (and arguments) gives byte-identical files.
        scale: multiplies every training dataset size (:data:`tinygptv.synth.writers.SIZES`).
        eval_size: items per eval set (rows per RefCOCO split).
        image_size: nominal image side in pixels.
    Returns:
        the content of ``world.json`` (vocabulary, dataset counts, eval set sizes, seconds taken).
    """
    if scale <= 0 or eval_size < 1 or image_size < 64:
        raise ValueError("need scale > 0, eval_size >= 1 and image_size >= 64")
    out = Path(out)
    _prepare(out, force)
    t0 = time.perf_counter()
    ctx = WorldContext(out, seed, image_size, scale)
    writers.write_webdataset(ctx, "laion")
    writers.write_webdataset(ctx, "cc_sbu")
    writers.write_cc_sbu_align(ctx)
    write_coco(ctx, ctx.size(writers.SIZES["coco"]))
    writers.write_aokvqa(ctx)
    writers.write_gqa(ctx)
    writers.write_textcaps(ctx)
    writers.write_ocrvqa(ctx)
    writers.write_refvg(ctx)
    writers.write_flickr(ctx)
    writers.write_unnatural(ctx)
    writers.write_custom(ctx)
    t_train = time.perf_counter() - t0
    meta = write_eval_sets(ctx, eval_size)
    lines = list(dict.fromkeys(ctx.corpus))
    (out / "corpus.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (out / "scenes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ctx.scene_records), encoding="utf-8")
    world = {
        "version": WORLD_VERSION, "seed": seed, "scale": scale, "image_size": image_size, "eval_size": eval_size,
        "shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()}, "sizes": list(SIZES),
        "words": list(WORDS), "relations": list(RELATIONS), "positions": list(POSITIONS),
        "categories": [*CATEGORIES, "refer", "unanswerable"],
        "text_vocabulary": _vocabulary(lines),
        "corpus_lines": len(lines), "training_images": ctx.n_images, "datasets": ctx.counts,
        "eval_sets": {name: {"size": s["size"], "categories": s["categories"]} for name, s in meta["sets"].items()},
    }
    (out / "world.json").write_text(json.dumps(world, indent=1), encoding="utf-8")
    log.info("synthetic world in %s: %d training images, %d corpus lines, %d eval sets (%.1fs training data, "
             "%.1fs total)", out, ctx.n_images, len(lines), len(meta["sets"]), t_train, time.perf_counter() - t0)
    return {**world, "seconds": round(time.perf_counter() - t0, 2)}


def _vocabulary(lines: list[str]) -> list[str]:
    """Every lowercase word and number of the corpus and of the world's vocabulary."""
    world_words = " ".join([*SHAPES, *PLURALS.values(), *COLOURS, *SIZES, *WORDS, *RELATIONS, *POSITIONS])
    return sorted({w for line in [*lines, world_words] for w in re.findall(r"[a-z]+|\d+", line.lower())})


def _prepare(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; choose an empty folder or pass force=True (--force)")
        for name in OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
