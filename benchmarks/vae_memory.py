"""Peak memory of decoding with the full-size FLUX VAE: the whole image at once vs tiles.

Random weights (memory and time do not depend on them), fp32, batch 1. Each decode starts from a
cleared cache and a reset peak counter; the peak is MLX's own count (mx.get_peak_memory), which
includes the decoder's weights (0.18 GB).

`AutoencoderKL.decode` limits how far MLX schedules ahead (vae_tiling.limited_run_ahead);
`--run-ahead` measures the same decode under MLX's default scheduling instead, which holds
several operations' buffers at once.

    LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/vae_memory.py
    python benchmarks/vae_memory.py --sizes 256 512 --run-ahead
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_imagegen.models.vae import vae_from_preset  # noqa: E402
from tiny_imagegen.models.vae_tiling import tiled_decode  # noqa: E402

GB = 2**30


def measure(vae, size: int, tiled: bool, tile: int, overlap: int, run_ahead: bool) -> dict:
    z = mx.random.normal((1, size // 8, size // 8, vae.config.latent_channels), key=mx.random.key(0))
    mx.eval(z)
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    if run_ahead:  # what decode does, minus limited_run_ahead
        image = tiled_decode(vae._decode, z, tile, overlap) if tiled else vae._decode(z)
    else:
        image = vae.decode(z, tiled=tiled, tile=tile, overlap=overlap)
    mx.eval(image)
    seconds = time.perf_counter() - start
    return {"peak": mx.get_peak_memory() / GB, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024], help="square image sizes in pixels")
    parser.add_argument("--modes", nargs="+", default=["tiled", "untiled"], choices=["tiled", "untiled"])
    parser.add_argument("--tile", type=int, default=64, help="tile size in latent positions (x8 pixels)")
    parser.add_argument("--overlap", type=int, default=16, help="tile overlap in latent positions")
    parser.add_argument("--run-ahead", action="store_true", help="MLX's default scheduling, not decode's limited run-ahead")
    args = parser.parse_args()

    vae = vae_from_preset("flux")
    mx.eval(vae.decoder.parameters())  # the encoder's weights are never evaluated, so never allocated
    weights = sum(v.nbytes for _, v in tree_flatten(vae.decoder.parameters())) / GB
    print(f"FLUX VAE decoder, fp32, random weights ({weights:.2f} GB), device {mx.default_device()}")
    print(f"{'image':>11} {'mode':>33} {'peak GB':>8} {'seconds':>8}")
    for size in args.sizes:
        for mode in args.modes:
            r = measure(vae, size, mode == "tiled", args.tile, args.overlap, args.run_ahead)
            label = f"tiled {args.tile * 8}px/{args.overlap * 8}px" if mode == "tiled" else "untiled"
            label += ", run-ahead" if args.run_ahead else ""
            print(f"{size:>5}x{size:<5} {label:>33} {r['peak']:>8.2f} {r['seconds']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
