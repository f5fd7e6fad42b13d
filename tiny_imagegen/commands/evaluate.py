"""Score tiny-shapes with the scene parser: generate one image per caption and print the accuracies.

    python examples/evaluate_tiny.py                      # 200 held-out captions (unseen colour-shape pairs)
    python examples/evaluate_tiny.py --split train --n 100 --grid /tmp/grid.png
    python examples/evaluate_tiny.py --reconstruct        # the VAE alone: encode + decode real images
    python examples/evaluate_tiny.py --prompt "a red circle" --n 20    # one prompt, 20 seeds

The held-out split holds only captions with at least one (colour, shape) pair that never appears
in training (purple circle, yellow square, blue triangle; see shapes_dataset.py), so it measures
composition. The captions come from a seed stream of their own (--caption-seed), not the
training pool's.
"""

import argparse
import time

import numpy as np

from ..train.scene_parser import evaluate
from ..train.shapes_dataset import make_batch, sample_scene, to_uint8
from ..train.tiny_shapes import generate_images, load_pipeline


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="weights/tiny-shapes")
    p.add_argument("--split", default="heldout", choices=("heldout", "train", "all"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--caption-seed", type=int, default=2026)
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first image (image i uses seed + i)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--grid", default=None, help="save the first 64 images as a PNG grid here")
    p.add_argument("--prompt", default=None, help="score this one prompt over --n seeds instead of the split")
    p.add_argument("--reconstruct", action="store_true",
                   help="score the VAE's reconstructions of the dataset's own images instead (the ceiling)")
    p.add_argument("--concept", default=None, metavar="'COLOUR SHAPE'",
                   help="score held-out captions that hold this pair and no other held-out one (a LoRA's subject)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="apply a LoRA file (repeatable), e.g. one written by examples/train_lora.py")
    args = p.parse_args(argv)

    pipe = load_pipeline(args.weights)
    if args.lora:
        from ..checkpoints.lora import apply_loras, parse_lora_spec
        from ..registry.hub import resolve_file

        for r in apply_loras(pipe.transformer, [parse_lora_spec(s) for s in args.lora], resolve=resolve_file):
            print(f"LoRA {r['name']} x {r['weight']} ({r['format']}, {r['layers']} layers {r['applied']}, "
                  f"sha256 {r['sha256'][:12]})")
    if args.reconstruct:
        captions, images = reconstructions(pipe.vae, args)
    else:
        if args.prompt:
            captions, args.split = [args.prompt] * args.n, repr(args.prompt)
        elif args.concept:
            from ..train.lora import concept_scenes

            captions = [s.caption for s in concept_scenes(args.caption_seed, args.n, *args.concept.split())]
            args.split = f"held-out {args.concept!r}"
        else:
            captions = [sample_scene(args.caption_seed, i, args.split).caption for i in range(args.n)]
        t0, images = time.perf_counter(), []
        for start in range(0, args.n, args.batch):
            chunk = captions[start : start + args.batch]
            seeds = [args.seed + start + i for i in range(len(chunk))]
            images.append(generate_images(pipe, chunk, seeds, args.steps, args.guidance))
        images = np.concatenate(images)
        elapsed = time.perf_counter() - t0
        steps = args.steps or pipe.defaults.steps
        guidance = pipe.defaults.guidance if args.guidance is None else args.guidance
        print(f"{args.n} {args.split} captions, {steps} Euler steps, guidance {guidance}: "
              f"{elapsed:.1f} s ({elapsed / args.n:.3f} s per image in batches of {args.batch})")
    accuracy = evaluate(captions, images)
    if args.grid:
        from PIL import Image

        k = min(64, len(images))
        cols = 8
        rows = -(-k // cols)
        grid = np.full((rows * 64, cols * 64, 3), 255, np.uint8)
        for i in range(k):
            grid[(i // cols) * 64 : (i // cols + 1) * 64, (i % cols) * 64 : (i % cols + 1) * 64] = images[i]
        Image.fromarray(grid).save(args.grid)
        print(f"grid of the first {k} images: {args.grid}; captions:")
        for i in range(k):
            print(f"  {i:2d} {captions[i]}")
    return accuracy


def reconstructions(vae, args) -> tuple[list[str], np.ndarray]:
    """The dataset's images for the captions, through the VAE (posterior mean, then decode)."""
    import mlx.core as mx

    images, captions, _ = make_batch(args.caption_seed, args.n, args.split, as_float=True)
    out = [to_uint8(vae.decode(vae.encode(mx.array(images[i : i + args.batch])).mean))
           for i in range(0, args.n, args.batch)]
    print(f"{args.n} {args.split} images through the VAE (encode, posterior mean, decode)")
    return captions, np.concatenate(out)

