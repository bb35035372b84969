"""``tinygptv <command>``: one console script, commands dispatched from a dict."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("tinygptv")

EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.png"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small",
                   help="checkpoint folder, config.yaml, or preset name (random weights): tiny, small, tinygptv-phi2")
    p.add_argument("--tokenizer", help="tokenizer folder (Phi-2 HF folder) overriding the checkpoint's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for presets, e.g. lm.layers=2")


def _load_model(args):
    import tinygptv
    from tinygptv.config import PRESETS, parse_overrides, preset

    if args.set:
        if args.model not in PRESETS:
            raise SystemExit("--set only applies to presets; edit the checkpoint's config.yaml instead")
        return tinygptv.load(preset(args.model).replace(**parse_overrides(args.set)), device=args.device,
                             tokenizer=args.tokenizer)
    return tinygptv.load(args.model, device=args.device, tokenizer=args.tokenizer)


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
    """Answer one question about an image (greedy)."""
    model = _load_model(args)
    image = None if args.no_image else (args.image or EXAMPLE_IMAGE)
    t0 = time.perf_counter()
    answer = model.generate(image, args.question, max_new_tokens=args.max_new_tokens)
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"answer": answer, "seconds": round(dt, 3), "model": model.cfg.name}))
    else:
        print(answer)
    return 0


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


def cmd_export(args) -> int:
    """Export the language model (LoRA merged) as a HF Phi folder, with the tokenizer."""
    import tinygptv
    from tinygptv.weights.phi import export_hf_phi

    model = tinygptv.load(args.model)
    export_hf_phi(model.lm, args.out, layout=args.layout)
    if model.tokenizer is not None:
        model.tokenizer.save(args.out)
    print(f"wrote {args.out} ({args.layout} layout)")
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
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")

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

    p = sub.add_parser("export", help=cmd_export.__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--layout", choices=["split", "fused"], default="split",
                   help="split: current transformers PhiForCausalLM; fused: the TinyGPT-V patched 4.36 layout")
    p.add_argument("--out", required=True)
    return parser


COMMANDS = {"info": cmd_info, "ask": cmd_ask, "import": cmd_import, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
