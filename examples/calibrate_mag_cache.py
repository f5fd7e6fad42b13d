"""Calibrate MagCache for a model: the per-step magnitude ratios of its block stack's residual.

Generates `--n` images with `--cache mag:calibrate` (nothing skipped; each step records
mean |r_t| / |r_{t-1}|, diffusion/mag_cache.py), averages the ratios over the images and their
guidance passes, and prints them as the `mag_ratios` of the model's defaults (registry/catalog.py;
for a converted folder, model.json's pipeline.defaults). The tiny model's were made with

    python examples/calibrate_mag_cache.py --n 32

on train captions of another stream (seed 7) than the ones the benchmark scores (seed 2026).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "weights" / "tiny-shapes"),
                   help="a model folder (default: the shipped tiny model)")
    p.add_argument("--n", type=int, default=32, help="images (prompts: tiny-shapes train captions of stream --seed)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--steps", type=int, help="steps (default: the model's)")
    args = p.parse_args()

    import mlx.core as mx

    from tiny_imagegen.pipelines.pipeline import Pipeline
    from tiny_imagegen.train.shapes_dataset import sample_scene

    pipe = Pipeline.from_pretrained(args.model, dtype=mx.float32, keep_text_encoders=True)
    runs = []
    for i in range(args.n):
        pipe.generate(sample_scene(args.seed, i, "train").caption, seed=i, steps=args.steps, cache="mag:calibrate")
        runs += [state.measured for state in pipe.step_cache.states]
    ratios = np.mean(np.array(runs), axis=0)
    spread = np.std(np.array(runs), axis=0).max()
    print(f"{pipe.name}: {len(runs)} calibrated passes ({args.n} images), {len(ratios)} steps, "
          f"largest standard deviation of a step's ratio {spread:.4f}")
    print("mag_ratios=(" + ", ".join(f"{r:.5f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
