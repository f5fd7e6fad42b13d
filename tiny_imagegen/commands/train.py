"""Train tiny-shapes from scratch: tokenizer, then the VAE, then the T5 + MM-DiT on its latents.

    python examples/train_tiny.py                      # the shipped weights (docs/tiny-shapes.md)
    python examples/train_tiny.py --resume             # continue an interrupted run from its checkpoints
    python examples/train_tiny.py --export-only --weights /tmp/partway   # export the latest checkpoint

Set `LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0` on x86-64 Linux: MLX's CPU matmuls are
~50x faster with it. Every stage checkpoints under --out and resumes bit-identically; the final
EMA weights are written to --weights (sample them with Pipeline.from_pretrained(folder) or --model folder).
"""

import argparse
from pathlib import Path

from ..train.recipe import run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tiny-shapes", help="checkpoints, logs and cached latents")
    p.add_argument("--weights", default="weights/tiny-shapes", help="where the final weights go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--vae-logvar-init", type=float, default=-6.0, help="initial log-variance of the VAE posterior")
    p.add_argument("--pool", type=int, default=16384, help="training images encoded for the MM-DiT stage")
    p.add_argument("--steps", type=int, default=5000, help="MM-DiT steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints under --out")
    p.add_argument("--export-only", action="store_true", help="write --weights from the latest checkpoint and stop")
    args = p.parse_args(argv)

    out = Path(args.out)
    if (out / "vae").exists() and not (args.resume or args.export_only):
        p.error(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    run(args)
