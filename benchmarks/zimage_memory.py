"""Activation memory of one Z-Image-Turbo denoising step, measured (weights: `sizes.py`).

A full-width transformer (dim 3840, 30 heads, FFN 10240) with one block of each kind (noise
refiner, context refiner, main) and random weights runs one step; MLX frees a block's
intermediates before the next block runs, so the peak above the weights is that of the full
34-block model. Sequence: (H/16)·(W/16) image tokens plus the caption padded to a multiple of 32.

    python benchmarks/zimage_memory.py [--size 1024] [--caption 512] [--batch 1] [--dtype float32]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from tiny_imagegen.models.zimage import ZImageTransformer, preset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--caption", type=int, default=512, help="caption tokens (512: the longest prompt)")
    parser.add_argument("--batch", type=int, default=1, help="2 = one CFG step ([pos; neg])")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)

    model = ZImageTransformer(preset("z-image-turbo", n_layers=1, n_refiner_layers=1))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    side = args.size // 8
    latents = mx.random.normal((args.batch, side, side, 16)).astype(dtype)
    caps = mx.random.normal((args.batch, args.caption, 2560)).astype(dtype)
    t = mx.full((args.batch,), 0.5)
    mx.eval(latents, caps)
    inputs = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    mx.eval(model(latents, t, caps))
    seconds = time.perf_counter() - start
    tokens = (side // 2) ** 2 + args.caption + (-args.caption) % 32
    print(f"{args.size}x{args.size}, caption {args.caption}, batch {args.batch}, {args.dtype}: {tokens} tokens per sample; "
          f"weights of the 3 blocks {weights / 1e9:.2f} GB, peak activations above weights and inputs "
          f"{(mx.get_peak_memory() - inputs) / 1e9:.2f} GB; one step through 3 blocks {seconds:.1f} s")


if __name__ == "__main__":
    main()
