"""`tiny-imagegen serve`'s flags, the safety rules on them, and uvicorn."""

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from .params import Limits

DEFAULT_LIMITS = Limits()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve models kept loaded: OpenAI's images API, a job queue and a web page.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; any other needs --token)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--token", default=os.environ.get("TINY_IMAGEGEN_TOKEN"),
                   help="bearer token every API request must send (default: $TINY_IMAGEGEN_TOKEN)")
    p.add_argument("--output", type=Path, default=Path("serve-output"),
                   help="folder the images are written to (default %(default)s)")
    p.add_argument("--model", default="tiny-shapes", help="the default model (default %(default)s)")
    p.add_argument("--memory-budget", type=float, metavar="GIB",
                   help="GiB of loaded models before the least recently used is evicted "
                        "(default: three quarters of the device's memory)")
    p.add_argument("--lora-dir", type=Path, help="the folder requests may name LoRA files from (default: none)")
    p.add_argument("--keep-text-encoders", action="store_true",
                   help="keep text encoders loaded between jobs (default: freed after encoding, as generate does)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_LIMITS.queue,
                   help="jobs waiting before new ones get a 429 (default %(default)s)")
    p.add_argument("--max-images", type=int, default=DEFAULT_LIMITS.images, help="images per request (default %(default)s)")
    p.add_argument("--max-side", type=int, default=DEFAULT_LIMITS.side, help="pixels per side (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_LIMITS.steps, help="steps per job (default %(default)s)")
    p.add_argument("--max-prompt", type=int, default=DEFAULT_LIMITS.prompt_chars,
                   help="characters per prompt (default %(default)s)")
    p.add_argument("--max-body", type=int, default=DEFAULT_LIMITS.body_bytes,
                   help="bytes per request body (default %(default)s)")
    p.add_argument("--max-upload", type=int, default=DEFAULT_LIMITS.upload_bytes,
                   help="bytes per POST /v1/images/edits body: its image and mask (default %(default)s)")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from(args):
    """Flags -> Config, or SystemExit(2) with one line for an unsafe or impossible setting."""
    from ..pipelines.memory import device_memory
    from .app import Config

    def fail(message: str):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)

    if not is_loopback(args.host) and not args.token:
        fail(f"--host {args.host} listens beyond this machine: give --token (or $TINY_IMAGEGEN_TOKEN) so every "
             "request must carry it")
    if args.token is not None and len(args.token) < 16:
        fail("--token must be at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    for flag in ("max_queue", "max_images", "max_side", "max_steps", "max_prompt", "max_body", "max_upload"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        fail(f"--lora-dir {args.lora_dir}: no such folder")
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--output {args.output}: {e.strerror}")
    budget = int(args.memory_budget * 2**30) if args.memory_budget else int((device_memory() or 16 << 30) * 3 // 4)
    limits = Limits(body_bytes=args.max_body, upload_bytes=args.max_upload, prompt_chars=args.max_prompt, images=args.max_images,
                    side=args.max_side, steps=args.max_steps, queue=args.max_queue)
    return Config(output=args.output, default_model=args.model, limits=limits, token=args.token,
                  memory_budget=budget, lora_dir=args.lora_dir, keep_text_encoders=args.keep_text_encoders,
                  loopback_only=is_loopback(args.host))


def main(argv=None) -> int:
    import uvicorn

    from .app import create_app, runnable, available_models

    args = build_parser().parse_args(argv)
    config = config_from(args)
    if config.default_model not in runnable(available_models()):
        print(f"error: --model {config.default_model}: not a registered model whose weights are here "
              "(`tiny-imagegen models` lists them)", file=sys.stderr)
        return 2
    where = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tiny-imagegen serve: http://{where}:{args.port}/  (images in {args.output}, "
          f"{'token required' if config.token else 'no token: this machine only'})", file=sys.stderr)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0
