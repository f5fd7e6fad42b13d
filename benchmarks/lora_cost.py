"""What a LoRA costs: merged into the weights vs an unmerged branch beside (quantized) layers.

    LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/lora_cost.py

A small FLUX-shaped MM-DiT (hidden 512 = 8 heads x 64, 2 double + 4 single blocks, 1024 image +
64 text tokens), random weights and a random rank-16 LoRA on every linear of the blocks. For each
way of running it: the bytes of the weights (adapter included) and the median time of a forward.
"""

import argparse
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from tiny_imagegen.checkpoints.quantize import quantize_component
from tiny_imagegen.checkpoints.lora import _linears
from tiny_imagegen.layers.lora import Update, apply_updates
from tiny_imagegen.layers.positions import flux_image_ids, flux_text_ids
from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig


def build(rank: int, bits: int | None, merge: bool | None, lora: bool):
    mx.random.seed(0)
    model = MMDiT(MMDiTConfig(in_channels=64, num_heads=8, head_dim=64, depth_double=2, depth_single=4,
                              context_dim=512, vec_dim=256, axes_dim=(8, 28, 28)))
    if bits:
        quantize_component("transformer", model, bits)
    if lora:
        updates = {}
        for path, layer in _linears(model):
            if "blocks" in path:
                out_f = layer.weight.shape[0]
                in_f = layer.weight.shape[1] * (32 // layer.bits if bits else 1)
                updates[("transformer", path)] = [Update(0.01 * mx.random.normal((rank, in_f)),
                                                         0.01 * mx.random.normal((out_f, rank)), 0, 1.0)]
        apply_updates({"transformer": model}, updates, merge)
    mx.eval(model.parameters())
    return model


def forward_time(model, repeats: int) -> float:
    img, txt = mx.random.normal((1, 1024, 64)), mx.random.normal((1, 64, 512))
    args = (img, flux_image_ids(32, 32), txt, flux_text_ids(64), mx.array([0.5]), mx.random.normal((1, 256)))
    mx.eval(model(*args))  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(model(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    rows = [("fp32, no LoRA", None, None, False), ("fp32, LoRA merged", None, None, True),
            ("fp32, LoRA as a branch", None, False, True), ("4-bit, no LoRA", 4, None, False),
            ("4-bit + LoRA branch", 4, None, True), ("8-bit, no LoRA", 8, None, False),
            ("8-bit + LoRA branch", 8, None, True)]
    print(f"| model (rank {args.rank} on every block linear) | weights MB | forward ms (median of {args.repeats}) |")
    print("|---|---|---|")
    for name, bits, merge, lora in rows:
        model = build(args.rank, bits, merge, lora)
        size = sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e6
        print(f"| {name} | {size:.1f} | {1000 * forward_time(model, args.repeats):.1f} |", flush=True)


if __name__ == "__main__":
    main()
