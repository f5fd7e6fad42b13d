"""Size on disk and weight memory of FLUX.1-schnell in bf16, 8-bit and 4-bit, computed exactly
from the full-size models without allocating them.

MLX initialises parameters lazily: the full-size MMDiT, T5-XXL, CLIP-L and VAE are built, cast to
bf16 and quantized (`stored_tensors`, the converter's own code) as graphs that are never
evaluated, and every array's nbytes is known from its shape and dtype. The file size is the
safetensors header the converter would write plus those bytes; the memory of a loaded component
is the same bytes (MLX loads a safetensors file tensor for tensor). Activations are not included.

`--activations DTYPE` measures them instead (allocates ~6 GB in float32, ~75 s on 2 CPU cores):
one denoising step at 1024x1024 (4096 image + 256 text tokens) through a full-width MM-DiT with
one double and one single block. MLX frees each block's intermediates before the next block
runs, so the peak above the weights is that of the full 57-block model.

    python benchmarks/memory_table.py [--group-size 64] [--activations float32]
"""

import argparse
from dataclasses import replace
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tiny_imagegen.checkpoints.convert import file_metadata, stored_tensors  # noqa: E402
from tiny_imagegen.checkpoints.safetensors_io import safetensors_header  # noqa: E402
from tiny_imagegen.models.clip import CLIPTextModel  # noqa: E402
from tiny_imagegen import registry  # noqa: E402
from tiny_imagegen.models.mmdit import MMDiT  # noqa: E402
from tiny_imagegen.models.t5 import T5Encoder  # noqa: E402
from tiny_imagegen.models.vae import AutoencoderKL  # noqa: E402

GB = 1e9
# (label, bits, bits of the adaLN modulation layers): the last is convert's mixed mode
MODES = (("bf16", None, None), ("8-bit", 8, None), ("4-bit", 4, None), ("4-bit, adaLN 8-bit", 4, 8))


def full_size_models():
    return {
        "transformer": MMDiT(registry.find("flux1-schnell").configs["transformer"]),
        "t5": T5Encoder(),
        "clip": CLIPTextModel(),
        "vae": AutoencoderKL(),
    }


def measure_activations(dtype_name: str, side: int = 1024, text_tokens: int = 256):
    dtype = getattr(mx, dtype_name)
    model = MMDiT(replace(registry.find("flux1-schnell").configs["transformer"], depth_double=1, depth_single=1))
    model.set_dtype(dtype)
    n = side // 16  # packed latent grid: 8x VAE downsampling, 2x2 patches
    img_ids = np.stack([np.zeros((n, n)), *np.meshgrid(np.arange(n), np.arange(n), indexing="ij")], -1).reshape(-1, 3)
    inputs = dict(
        img=mx.random.normal((1, n * n, 64)).astype(dtype), img_ids=img_ids,
        txt=mx.random.normal((1, text_tokens, 4096)).astype(dtype), txt_ids=np.zeros((text_tokens, 3)),
        timesteps=mx.array([1.0]), y=mx.random.normal((1, 768)).astype(dtype),
    )
    mx.eval(model.parameters(), [v for v in inputs.values() if isinstance(v, mx.array)])
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    mx.eval(model(**inputs))
    print(f"one denoising step at {side}x{side} ({n * n} + {text_tokens} tokens), {dtype_name}, "
          f"{mx.default_device()}: activation peak {(mx.get_peak_memory() - base) / GB:.2f} GB above "
          f"{base / GB:.2f} GB of weights ({time.perf_counter() - start:.0f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--activations", choices=("float32", "bfloat16", "float16"),
                   help="measure the activation memory of one 1024x1024 step in this dtype instead")
    args = p.parse_args()
    if args.activations:
        return measure_activations(args.activations)

    models = full_size_models()
    counts = {n: sum(v.size for _, v in tree_flatten(m.parameters())) for n, m in models.items()}
    rows = {}
    for label, bits, mod_bits in MODES:
        for name, model in models.items():
            tensors, layers = stored_tensors(name, model, bits, args.group_size, mx.bfloat16, mod_bits)
            data = sum(v.nbytes for v in tensors.values())
            header = len(safetensors_header(tensors, file_metadata(name)))
            modules = dict(model.named_modules())
            kept = counts[name] - sum(modules[layer].weight.size for layer in layers)
            rows[label, name] = (header + data, data, kept)
    assert mx.get_peak_memory() < 1e9, "something was evaluated"

    print(f"FLUX.1-schnell, group size {args.group_size}; parameters: " + ", ".join(
        f"{n} {c:,}" for n, c in counts.items()))
    print(f"peak MLX memory while computing this table: {mx.get_peak_memory() / 1e6:.1f} MB\n")
    names = list(models)
    print("| weights | " + " | ".join(names) + " | total on disk | denoising (transformer) | text encoding (T5 + CLIP) | all resident |")
    print("|---" * (len(names) + 5) + "|")
    for label, _, _ in MODES:
        size = {n: rows[label, n][0] for n in names}
        mem = {n: rows[label, n][1] for n in names}
        print(f"| {label} | " + " | ".join(f"{size[n] / GB:.2f} GB" for n in names)
              + f" | {sum(size.values()) / GB:.2f} GB | {mem['transformer'] / GB:.2f} GB"
              + f" | {(mem['t5'] + mem['clip']) / GB:.2f} GB | {sum(mem.values()) / GB:.2f} GB |")
    print("\nkept in bf16 when quantized (parameters):")
    for n in names:
        print(f"  {n:12s} {rows['4-bit', n][2]:>14,} of {counts[n]:>14,} ({rows['4-bit', n][2] / counts[n]:.1%})")


if __name__ == "__main__":
    main()
