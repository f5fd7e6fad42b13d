"""Size on disk and weight memory of Stable Diffusion 1.5 in fp32, bf16, 8-bit and 4-bit, computed
exactly from the full-size models without allocating them (as benchmarks/memory_table.py does
for FLUX): the U-Net, CLIP ViT-L/14 text and the SD VAE are built lazily from their published
configs, cast and quantized by the converter's own code (`stored_tensors`), and every array's
bytes are known from its shape and dtype. The file size adds the safetensors header. Activations
are not included.

    python benchmarks/sd15_sizes.py [--group-size 64]
"""

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tiny_imagegen.checkpoints.components import COMPONENTS  # noqa: E402
from tiny_imagegen.checkpoints.convert import file_metadata, stored_tensors  # noqa: E402
from tiny_imagegen.checkpoints.safetensors_io import safetensors_header  # noqa: E402
from tiny_imagegen.registry import find  # noqa: E402

GB = 1e9


def build(component: str, config):
    module, cls = COMPONENTS[component].model.split(":")
    return getattr(importlib.import_module(module), cls)(config)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()
    models = {n: build(n, cfg) for n, cfg in find("sd15").configs.items()}
    counts = {n: sum(v.size for _, v in tree_flatten(m.parameters())) for n, m in models.items()}
    print("SD 1.5 parameters: " + ", ".join(f"{n} {c:,}" for n, c in counts.items()))
    modules = dict(models["unet"].named_modules())
    _, layers = stored_tensors("unet", models["unet"], 4, args.group_size, mx.bfloat16)
    linear = sum(modules[p].weight.size for p in layers)
    print(f"U-Net parameters in quantized Linears: {linear:,} ({linear / counts['unet']:.1%}); the rest are convolutions, "
          "norms and biases, kept in bf16")
    print("| weights | " + " | ".join(models) + " | total on disk |")
    print("|---" * (len(models) + 2) + "|")
    for label, dtype, bits in (("fp32", mx.float32, None), ("bf16", mx.bfloat16, None),
                               ("8-bit", mx.bfloat16, 8), ("4-bit", mx.bfloat16, 4)):
        sizes = {}
        for name, model in models.items():
            tensors, _ = stored_tensors(name, model, bits, args.group_size, dtype)
            sizes[name] = len(safetensors_header(tensors, file_metadata(name))) + sum(v.nbytes for v in tensors.values())
        print(f"| {label} | " + " | ".join(f"{s / GB:.3f} GB" for s in sizes.values()) + f" | {sum(sizes.values()) / GB:.2f} GB |")
    assert mx.get_peak_memory() < 1e9, "something was evaluated"


if __name__ == "__main__":
    main()
