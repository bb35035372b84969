"""``tinygptv <command>``: one console script, commands dispatched from a dict."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("tinygptv")

EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.png"
FAST_DECODE_HELP = ("CPU: bf16 keys/values read by a compiled decode-attention kernel (compiled when the model loads, "
                    "seconds; faster decoding at batch > 1 and long contexts, slightly slower at batch 1)")


def default_model() -> str:
    """The bundled nano model when the package ships it, else the random ``small`` preset."""
    from tinygptv.checkpoint import BUNDLED

    return "nano" if (BUNDLED["nano"] / "config.yaml").is_file() else "small"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=default_model(),
                   help="checkpoint folder, 'nano' (bundled, the default), config.yaml, or a preset name with random "
                        "weights: tiny, small, tinygptv-phi2")
    p.add_argument("--tokenizer", help="tokenizer folder (Phi-2 HF folder) overriding the checkpoint's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["none", "bf16", "int8", "int4"], default=None,
                   help="weight quantization chosen at load time (default: as stored)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for presets, e.g. lm.layers=2")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, reproducible)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)


def _gen_config(args):
    from tinygptv.infer.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                            seed=args.seed)


def _load_model(args):
    import tinygptv
    from tinygptv.config import PRESETS, parse_overrides, preset

    if args.set:
        if args.model not in PRESETS:
            raise SystemExit("--set only applies to presets; edit the checkpoint's config.yaml instead")
        return tinygptv.load(preset(args.model).replace(**parse_overrides(args.set)), device=args.device,
                             tokenizer=args.tokenizer, quantize=args.quantize, inference=True)
    return tinygptv.load(args.model, device=args.device, tokenizer=args.tokenizer, quantize=args.quantize,
                         inference=True)


def cmd_info(args) -> int:
    """Print a model's configuration and parameter counts (presets are built on the meta device: instant)."""
    import tinygptv
    from tinygptv.config import PRESETS

    if args.model in PRESETS:
        model = tinygptv.build_empty(tinygptv.preset(args.model))
    else:
        model = tinygptv.load(args.model)
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters())
              for name in ("vision", "qformer", "projector", "lm")}
    counts["total"] = sum(counts.values())
    counts["trainable (LoRA + norms + projections)"] = model.set_trainable()
    if args.json:
        print(json.dumps({"name": model.cfg.name, "parameters": counts, "config": model.cfg.to_dict()}, indent=2))
        return 0
    print(f"model: {model.cfg.name}")
    for k, v in counts.items():
        print(f"  {k:<40} {v:>15,}")
    print(model.cfg.to_yaml())
    return 0


def cmd_ask(args) -> int:
    """Answer one question about an image."""
    from tinygptv.image import load_image
    from tinygptv.infer.engine import Engine
    from tinygptv.infer.grounding import draw_boxes, parse_boxes

    model = _load_model(args)
    engine = Engine(model, fast_decode=args.fast_decode)
    image = None if args.no_image else load_image(args.image or EXAMPLE_IMAGE)
    request = engine.chat_request(args.question, [image] if image is not None else [])
    result = engine.generate([request], _gen_config(args))[0]
    boxes = parse_boxes(result.text, *image.size) if image is not None else []
    if args.draw and boxes:
        draw_boxes(image, boxes).save(args.draw)
    elif args.draw:
        print(f"no box in the answer: nothing drawn to {args.draw}", file=sys.stderr)
    if args.json:
        print(json.dumps({"answer": result.text, "boxes": [b.to_dict() for b in boxes],
                          "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                          "completion_tokens": len(result.token_ids),
                          "timings": {k: round(v, 4) for k, v in result.timings.items()}, "model": model.cfg.name}))
    else:
        print(result.text)
    return 0


CHAT_HELP = "commands: /image PATH (attach an image to the next question), /reset, /quit"


def cmd_chat(args) -> int:
    """Interactive chat with streaming answers (/image PATH, /reset, /quit)."""
    from tinygptv.image import ImageError
    from tinygptv.infer.chat import Conversation
    from tinygptv.infer.engine import Engine

    conv = Conversation(Engine(_load_model(args), fast_decode=args.fast_decode))
    cfg = _gen_config(args)
    if args.image:
        conv.add_image(args.image)
    print(CHAT_HELP, flush=True)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            conv.reset()
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                conv.add_image(path)
                print(f"(image attached: {path})")
            except ImageError as exc:
                print(f"error: {exc}")
            continue
        if line.startswith("/"):
            print(CHAT_HELP)
            continue
        try:
            for delta in conv.ask(line, cfg):
                print(delta, end="", flush=True)
            print(flush=True)
        except ValueError as exc:
            print(f"\nerror: {exc}", flush=True)


def cmd_import(args) -> int:
    """Convert official weights (Phi-2 folder, EVA ViT, BLIP-2, optional stage checkpoint) to our format."""
    import tinygptv
    from tinygptv.config import ModelConfig, parse_overrides, preset
    from tinygptv.templates import get_template
    from tinygptv.weights.official import import_official

    base = ModelConfig.from_yaml(args.config) if args.config else preset("tinygptv-phi2")
    if args.set:
        base = base.replace(**parse_overrides(args.set))
    model, report = import_official(args.llm, vit=args.vit, qformer=args.qformer,
                                    stage_checkpoint=args.stage_checkpoint, hf_blip2=args.hf_blip2, config=base)
    model.template = get_template(args.template)
    tinygptv.save(model, args.out)
    print(report.summary())
    if report.absent_expected:
        print(f"  initialised with the reference's initial values ({len(report.absent_expected)}): "
              + ", ".join(report.absent_expected[:8]) + (" …" if len(report.absent_expected) > 8 else ""))
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    """The bundled nano model answers questions about example images; a grounding answer is drawn as PNG."""
    from tinygptv.nano.demo import run_demo

    return run_demo(args.model, Path(args.out), args.quantize)


def cmd_ablate(args) -> int:
    """The paper's ablation (Table 4) at nano scale: without LoRA / input LayerNorm / RMSNorm / QK-norm."""
    from tinygptv.nano.ablate import ablate, markdown, plot

    out = Path(args.output)
    table = ablate(args.nano, out, steps_scale=args.steps_scale,
                   variants=args.variants.split(",") if args.variants else None)
    command = f"tinygptv ablate --nano {args.nano} --output {args.output} --steps-scale {args.steps_scale}"
    text = markdown(table, command)
    (out / "ablation.md").write_text(text)
    plot(table, out / "ablation.png")
    print(text)
    return 0


def cmd_export(args) -> int:
    """Export the language model (LoRA merged) as a HF Phi folder, with the tokenizer."""
    import tinygptv
    from tinygptv.weights.phi import export_hf_phi

    model = tinygptv.load(args.model)
    layout = args.layout
    if layout == "auto":  # stock transformers Phi has no post-attention RMSNorm: such models need the fused layout
        layout = "fused" if model.cfg.lm.post_attn_norm else "split"
    export_hf_phi(model.lm, args.out, layout=layout)
    if model.tokenizer is not None:
        model.tokenizer.save(args.out)
    print(f"wrote {args.out} ({layout} layout)")
    return 0


RECIPES = {"paper": ["stage1", "stage2", "stage3", "stage4"], "nano": []}
RECIPE_DIR = Path(__file__).parent / "configs" / "train"


def cmd_train(args) -> int:
    """Train one stage (--config) or a whole recipe (--recipe paper: stages 1→4, each from the previous)."""
    from tinygptv.config import parse_overrides
    from tinygptv.train.config import StageConfig

    overrides = parse_overrides(args.set)
    if bool(args.config) == bool(args.recipe):
        raise ValueError("give exactly one of --config FILE or --recipe NAME")
    if args.recipe == "nano":
        return _train_nano(args)
    if args.recipe and args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}; valid: {sorted(RECIPES)}")
    stages = [RECIPE_DIR / f"{s}.yaml" for s in RECIPES[args.recipe]] if args.recipe else [Path(args.config)]
    init = args.init
    out_root = Path(args.output)
    for i, path in enumerate(stages):
        cfg = StageConfig.from_yaml(path).with_overrides(overrides)
        if init:
            cfg = cfg.with_overrides({"init": str(init)})
        if not cfg.init:
            raise ValueError(f"{path}: no init checkpoint; pass --init (the imported base model, or a preset)")
        out = out_root / cfg.stage if len(stages) > 1 else out_root
        if _check_memory(cfg, args.dry_run, args.force) and not args.dry_run:
            from tinygptv.train.loop import train

            if len(stages) > 1 and (out / "final" / "config.yaml").is_file() and not args.resume:
                print(f"{cfg.stage}: already trained ({out / 'final'}), skipping")
            else:
                train(cfg, args.data_root, out, resume=args.resume)
            init = out / "final"
    return 0


def _train_nano(args) -> int:
    """Synthetic world + stage 0 + stages 1→4 + evaluation (+ bundling into the package with --bundle)."""
    from tinygptv.checkpoint import BUNDLED
    from tinygptv.nano import recipe
    from tinygptv.nano.evaluate import evaluate
    from tinygptv.nano.report import write_report

    out = Path(args.output if args.output != "runs/train" else "runs/nano")
    summary = recipe.run(out, seed=args.seed, steps_scale=args.steps_scale, world_scale=args.world_scale,
                         eval_size=args.eval_size, amp=args.amp, new_norms=args.stage0_norms == "pretrained")
    final = Path(summary["final"])
    runs = {q: evaluate(final, out / "world", out / f"eval-{q}", quantize=None if q == "fp32" else q)
            for q in args.eval_quantize.split(",") if q}
    size = None
    if args.bundle:
        dest = recipe.bundle(final, BUNDLED["nano"])
        size = sum(f.stat().st_size for f in dest.iterdir())
        print(f"bundled the model into {dest} ({size / 1e6:.1f} MB)")
    if runs:
        report = Path(args.report) if args.report else out / "nano.md"
        command = ("tinygptv train --recipe nano" + (f" --amp {args.amp}" if args.amp != "auto" else "")
                   + (" --stage0-norms pretrained" if args.stage0_norms == "pretrained" else "")
                   + (" --bundle" if args.bundle else ""))
        print(write_report(report, summary, runs, recipe.losses(out), size, command))
    return 0


def _check_memory(cfg, dry_run: bool, force: bool) -> bool:
    """Print the memory estimate for ``--dry-run``; refuse a run that cannot fit a known device."""
    from dataclasses import asdict

    import tinygptv
    from tinygptv.train.loop import pick_device
    from tinygptv.train.memory import available_bytes, estimate

    device = pick_device(cfg.run.device, 0)
    model_cfg = _stage_model_config(cfg)
    model = tinygptv.build_empty(model_cfg)
    model.set_trainable(**asdict(cfg.trainable))
    est = estimate(model_cfg, model, cfg, device)
    free = available_bytes(device)
    fits = free is None or est.total <= free
    if dry_run:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{cfg.stage}: {model_cfg.name}, {n:,} trainable parameters, device {device}")
        print(est.table())
        print(f"  {'available on the device':<40} " + (f"{free / 2**30:8.2f} GiB" if free else "unknown"))
        print("  fits" if fits else "  DOES NOT FIT")
    elif not fits and not force:
        raise ValueError(f"{cfg.stage}: estimated {est.total / 2**30:.1f} GiB > {free / 2**30:.1f} GiB available on "
                         f"{device}; lower the batch size, enable run.grad_checkpointing, or pass --force")
    return fits


def _stage_model_config(cfg):
    import tinygptv
    from tinygptv.config import ModelConfig

    if cfg.init in tinygptv.PRESETS:
        base = tinygptv.preset(cfg.init)
    elif cfg.init.endswith((".yaml", ".yml")):
        base = ModelConfig.from_yaml(cfg.init)
    else:
        base = ModelConfig.from_yaml(Path(cfg.init) / "config.yaml")
    return base.replace(**cfg.model)


def cmd_data(args) -> int:
    """Validate a custom JSONL file (file:line errors + statistics) or convert LLaVA JSON to it."""
    from tinygptv.data.custom import check_jsonl, convert_llava_json

    if args.data_command == "check":
        tok = None
        if args.tokenizer:
            from tinygptv.tokenizer import Tokenizer

            tok = Tokenizer.from_folder(args.tokenizer)
        report = check_jsonl(args.file, args.image_root, tok)
        print(report.summary())
        return 0 if report.ok else 1
    result = convert_llava_json(args.src, args.dst)
    print(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygptv", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help=cmd_info.__doc__)
    p.add_argument("--model", default="tinygptv-phi2")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("ask", help=cmd_ask.__doc__)
    _add_model_args(p)
    p.add_argument("question")
    p.add_argument("--image", help="image path (default: a bundled example image)")
    p.add_argument("--no-image", action="store_true", help="text-only question")
    p.add_argument("--json", action="store_true", help="answer, boxes (pixels), token counts and timings as JSON")
    p.add_argument("--draw", metavar="PNG", help="draw grounding boxes of the answer on the image")

    p = sub.add_parser("chat", help=cmd_chat.__doc__)
    _add_model_args(p)
    p.add_argument("--image", help="image for the first question")

    p = sub.add_parser("import", help=cmd_import.__doc__)
    p.add_argument("--llm", required=True, help="Phi-2 / Phi-1.5 HF folder (fused, split or msft layout)")
    p.add_argument("--vit", help="LAVIS eva_vit_g.pth")
    p.add_argument("--qformer", help="LAVIS BLIP-2 checkpoint (Q-Former, query_tokens, ln_vision)")
    p.add_argument("--hf-blip2", help="HF Blip2ForConditionalGeneration folder or safetensors (instead of --vit/--qformer)")
    p.add_argument("--stage-checkpoint", help="TinyGPT-V_for_StageN.pth (LoRA, norms, projections)")
    p.add_argument("--config", help="base config YAML for what the files cannot tell (heads, image size…)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. vision.image_size=448")
    p.add_argument("--template", default="stage4", help="chat template saved with the checkpoint")
    p.add_argument("--out", required=True)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("--config", help="one stage's YAML (see configs/train/)")
    p.add_argument("--recipe", help="a whole recipe: " + ", ".join(RECIPES))
    p.add_argument("--init", help="checkpoint folder or preset the (first) stage starts from")
    p.add_argument("--data-root", default=".", help="root of the datasets' published layouts")
    p.add_argument("--output", default="runs/train", help="output folder (one sub-folder per stage for recipes)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. run.max_epoch=1")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--dry-run", action="store_true", help="print the memory estimate and stop")
    p.add_argument("--force", action="store_true", help="start even if the memory estimate does not fit")
    g = p.add_argument_group("nano recipe")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    g.add_argument("--world-scale", type=float, default=1.0, help="multiply the synthetic datasets' sizes")
    g.add_argument("--eval-size", type=int, default=200, help="items per held-out synthetic eval set")
    g.add_argument("--amp", choices=["auto", "none", "bf16"], default="auto",
                   help="training precision: auto = bf16 autocast where the CPU has fast bf16 (AMX, AVX-512-BF16), "
                        "fp32 elsewhere; none = fp32 everywhere; bf16 = bf16 autocast (the bundled model was trained "
                        "so)")
    g.add_argument("--stage0-norms", choices=["inserted", "pretrained"], default="inserted",
                   help="inserted (the bundle's recipe): the stage-0 LM trains without the paper's QK LayerNorm and "
                        "post-attention RMSNorm and the base inserts them at their initial values, as the official "
                        "code does with Phi-2; pretrained: the stage-0 LM trains with them in place")
    g.add_argument("--eval-quantize", default="fp32,int8", help="evaluate the final model at these precisions")
    g.add_argument("--bundle", action="store_true", help="write the final model into the package (the default model)")
    g.add_argument("--report", help="write the results table here (default: <output>/nano.md)")

    p = sub.add_parser("data", help=cmd_data.__doc__)
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("check", help="validate a custom JSONL file")
    q.add_argument("file")
    q.add_argument("--image-root", help="folder relative image paths resolve against (default: the file's folder)")
    q.add_argument("--tokenizer", help="tokenizer folder for token-length statistics")
    q = dsub.add_parser("convert-llava", help="LLaVA JSON → custom JSONL")
    q.add_argument("src")
    q.add_argument("dst")

    from tinygptv.eval.cli import add_eval_parser
    from tinygptv.serve.cli import add_serve_parser
    from tinygptv.synth.cli import add_synth_parser

    add_eval_parser(sub)
    add_synth_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("--model", default="nano")
    p.add_argument("--quantize", choices=["none", "bf16", "int8", "int4"], default=None)
    p.add_argument("--out", default="tinygptv-demo.png", help="where to draw the grounding answer")

    p = sub.add_parser("ablate", help=cmd_ablate.__doc__)
    p.add_argument("--nano", default="runs/nano", help="a nano recipe output (its world and stage-0 backbones)")
    p.add_argument("--output", default="runs/ablate")
    p.add_argument("--steps-scale", type=float, default=0.3)
    p.add_argument("--variants", help="comma-separated subset of: full, no_lora, no_input_norm, no_rmsnorm, no_qknorm")

    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("--model", default=default_model())
    p.add_argument("--layout", choices=["auto", "split", "fused"], default="auto",
                   help="split: current transformers PhiForCausalLM; fused: the TinyGPT-V patched 4.36 layout (the "
                        "only one for a LM with the post-attention RMSNorm); auto: split when the LM has none")
    p.add_argument("--out", required=True)
    return parser


COMMANDS = {"info": cmd_info, "ask": cmd_ask, "chat": cmd_chat, "import": cmd_import, "export": cmd_export,
            "train": cmd_train, "data": cmd_data, "demo": cmd_demo, "ablate": cmd_ablate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        handler = COMMANDS.get(args.command) or args.func
        return handler(args)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
