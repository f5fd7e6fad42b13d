"""Weight memory of SD3.5 Large and Medium in bf16, 8-bit and 4-bit, computed exactly from the
full-size models without allocating them (as benchmarks/memory_table.py does for FLUX.1: the
converter's own `stored_tensors` on lazy models; every array's nbytes is known from its shape).

    python benchmarks/sd3_memory.py [--group-size 64]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tiny_imagegen import registry  # noqa: E402
from tiny_imagegen.checkpoints.components import COMPONENTS, import_ref  # noqa: E402
from tiny_imagegen.checkpoints.convert import stored_tensors  # noqa: E402

GB = 1e9
MODES = (("bf16", None), ("8-bit", 8), ("4-bit", 4))
TEXT = ("clip_l", "clip_g", "sd3_t5")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()
    print("| model | weights (convert) | transformer (denoising) | CLIP-L + bigG (--no-t5: all the text) | T5-XXL | VAE | "
          "text encoding (all three) | on disk |")
    print("|---" * 8 + "|")
    for name in ("sd3.5-large", "sd3.5-medium"):
        configs = registry.find(name).configs
        models = {c: import_ref(COMPONENTS[c].model)(configs[c]) for c in ("sd3_transformer", *TEXT, "vae")}
        if name == "sd3.5-large":
            counts = {c: sum(v.size for _, v in tree_flatten(m.parameters())) for c, m in models.items()}
            print(f"<!-- parameters: {counts} -->")
        for label, bits in MODES:
            size = {c: sum(v.nbytes for v in stored_tensors(c, m, bits, args.group_size, mx.bfloat16)[0].values())
                    for c, m in models.items()}
            clip, t5 = size["clip_l"] + size["clip_g"], size["sd3_t5"]
            print(f"| {name} | {label} | {size['sd3_transformer'] / GB:.2f} GB | {clip / GB:.2f} GB | {t5 / GB:.2f} GB | "
                  f"{size['vae'] / GB:.2f} GB | {(clip + t5) / GB:.2f} GB | {sum(size.values()) / GB:.2f} GB |")
    assert mx.get_peak_memory() < 1e9, "something was evaluated"


if __name__ == "__main__":
    main()
