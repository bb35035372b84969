"""``tinygptv serve``: the OpenAI-compatible server (register with :func:`add_serve_parser`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

API_KEY_ENV = "TINYGPTV_API_KEY"
INSTALL_HINT = "the server needs FastAPI and uvicorn: pip install 'tinygptv[serve]'"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` sub-command to ``subparsers`` (sets ``func=cmd_serve``)."""
    from tinygptv.cli import FAST_DECODE_HELP, default_model

    p = subparsers.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    p.add_argument("--model", default=default_model(),
                   help="checkpoint folder, 'nano' (bundled, the default), config.yaml, or a preset name with random "
                        "weights: tiny, small, tinygptv-phi2")
    p.add_argument("--tokenizer", help="tokenizer folder overriding the checkpoint's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["none", "bf16", "int8", "int4"], default=None,
                   help="weight quantization chosen at load time (default: as stored)")
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    p.add_argument("--served-model-name", help="model id reported by the API (default: the --model name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together in one batch")
    p.add_argument("--batch-wait-ms", type=float, default=25.0,
                   help="how long a batch smaller than the previous one waits for more requests before it starts")
    p.add_argument("--queue-size", type=int, default=64, help="waiting requests beyond this get HTTP 429")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request, queueing included (then 504)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and / "
                        f"(default: ${API_KEY_ENV})")
    p.add_argument("--image-dir", type=Path, help="allow image paths / file:// URLs, only inside this folder")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MiB (then 413)")
    p.add_argument("--max-image-pixels", type=int, default=16_000_000,
                   help="largest image (width × height) accepted; protects against decompression bombs")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt in tokens, 32 per image included (default: the model's context)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.set_defaults(func=cmd_serve)
    return p


def settings_from_args(args, model_name: str):
    """:class:`~tinygptv.serve.app.ServeSettings` from parsed ``serve`` arguments."""
    from tinygptv.serve.app import ServeSettings
    from tinygptv.serve.protocol import Limits

    for name in ("max_batch", "queue_size", "max_image_pixels", "default_max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0 or args.max_body_mb <= 0 or args.batch_wait_ms < 0:
        raise ValueError("--timeout and --max-body-mb must be > 0, --batch-wait-ms >= 0")
    if args.image_dir is not None and not args.image_dir.is_dir():
        raise FileNotFoundError(f"--image-dir {args.image_dir} is not a folder")
    limits = Limits(max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
                    default_max_tokens=args.default_max_tokens, image_dir=args.image_dir)
    return ServeSettings(model_id=args.served_model_name or model_name, max_batch=args.max_batch,
                         batch_wait_s=args.batch_wait_ms / 1000, queue_size=args.queue_size,
                         timeout_s=args.timeout,
                         api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                         max_body_bytes=int(args.max_body_mb * 2**20), limits=limits)


def build_app(args):
    """Load the model named by ``args`` and wrap it in the application."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    import tinygptv
    from tinygptv.infer.engine import Engine
    from tinygptv.serve.app import create_app

    model = tinygptv.load(args.model, device=args.device, tokenizer=args.tokenizer, quantize=args.quantize,
                          inference=True)
    settings = settings_from_args(args, Path(str(args.model)).name)
    return create_app(Engine(model, fast_decode=args.fast_decode), settings)


def cmd_serve(args) -> int:
    """OpenAI-compatible HTTP server (/v1/chat/completions, streaming, images) with a web page at /."""
    app = build_app(args)
    import uvicorn

    settings = app.state.settings
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use the model", args.host)
    print(f"tinygptv serving {settings.model_id} on http://{args.host}:{args.port}/ (API: /v1/chat/completions)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=logging.getLevelName(log.getEffectiveLevel()).lower())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tinygptv.serve``: the ``serve`` command without the main CLI."""
    parser = argparse.ArgumentParser(prog="python -m tinygptv.serve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)
