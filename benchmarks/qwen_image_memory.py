"""Qwen-Image's memory on a Mac: the weights of each phase in bf16, 8-bit and 4-bit, computed exactly
from the full-size models without allocating them, and the activation peak of one bf16 denoising
step measured on a full-width transformer with one block.

Weights: the full-size transformer (20.4 B), Qwen2.5-VL-7B's language model (7.07 B; the file's
vision tower and LM head are never read) and the VAE are built lazily and quantized as the converter
writes them (`stored_tensors`): every array's nbytes follows from its shape and dtype.

Phases (the pipeline's order; the text encoder is released before the transformer runs):
text = the language model's weights; denoise = the transformer's weights + the measured step peak
(x 2 with true CFG: the two forwards run one after the other, so the peak is one forward's);
decode = the VAE. A Mac needs the largest phase plus what macOS and the VAE decode keep (~4 GB).

The step: a full-width model (D = 3072, 24 heads) with one of the 60 blocks runs one step at
`--size` pixels with `--text` prompt tokens; MLX frees a block's intermediates before the next
block runs, so the peak above weights and inputs is the full model's.

    python benchmarks/qwen_image_memory.py [--size 1024] [--text 128] [--dtype bfloat16] [--group-size 64]
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tiny_imagegen.checkpoints.convert import stored_tensors  # noqa: E402
from tiny_imagegen.models.qwen3 import QWEN2_5_VL_7B, Qwen3Model  # noqa: E402
from tiny_imagegen.models.qwen_image import QwenImageConfig, QwenImageTransformer  # noqa: E402
from tiny_imagegen.models.vae_qwen import AutoencoderKLQwenImage  # noqa: E402

GB = 1e9
MODES = (("bf16", None), ("8-bit", 8), ("4-bit", 4))
COMPONENTS = {"qwen_image_transformer": lambda: QwenImageTransformer(QwenImageConfig()),
              "qwen3": lambda: Qwen3Model(QWEN2_5_VL_7B), "qwen_vae": AutoencoderKLQwenImage}
QUANTIZED = ("qwen_image_transformer", "qwen3")  # the pipeline's QUANTIZED_ON_LOAD


def weights(group_size: int) -> dict[tuple[str, str], int]:
    out = {}
    for name, build in COMPONENTS.items():
        model = build()
        for label, bits in MODES:
            tensors, _ = stored_tensors(name, model, bits if name in QUANTIZED else None, group_size, mx.bfloat16)
            out[label, name] = sum(v.nbytes for v in tensors.values())
    assert mx.get_peak_memory() < 1e9, "something was evaluated"
    return out


def step_peak(size: int, text: int, dtype_name: str) -> tuple[int, int, float]:
    dtype = getattr(mx, dtype_name)
    model = QwenImageTransformer(replace(QwenImageConfig(), depth=1))
    model.set_dtype(dtype)
    n = size // 16
    img = mx.random.normal((1, n * n, 64)).astype(dtype)
    txt = mx.random.normal((1, text, 3584)).astype(dtype)
    mx.eval(model.parameters(), img, txt)
    base = mx.get_active_memory()
    w = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    mx.reset_peak_memory()
    start = time.perf_counter()
    mx.eval(model(img, txt, mx.array([0.5]), (n, n)))
    return mx.get_peak_memory() - base, w, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--text", type=int, default=128, help="prompt tokens after the template (at most 512)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()

    table = weights(args.group_size)
    peak, block_weights, seconds = step_peak(args.size, args.text, args.dtype)
    n = (args.size // 16) ** 2
    print(f"one {args.dtype} step at {args.size}x{args.size} ({n} image + {args.text} text tokens), 1 of 60 blocks, "
          f"{mx.default_device()}: peak {peak / GB:.2f} GB above {block_weights / GB:.2f} GB of weights ({seconds:.0f} s)")
    print("\n| weights | transformer | text encoder | VAE | text phase | denoise phase (+ step peak) | largest phase |")
    print("|---|---|---|---|---|---|---|")
    for label, _ in MODES:
        t, te, vae = (table[label, c] for c in COMPONENTS)
        denoise = t + peak
        print(f"| {label} | {t / GB:.1f} GB | {te / GB:.1f} GB | {vae / GB:.2f} GB | {te / GB:.1f} GB | "
              f"{denoise / GB:.1f} GB | {max(te, denoise, vae) / GB:.1f} GB |")


if __name__ == "__main__":
    main()
