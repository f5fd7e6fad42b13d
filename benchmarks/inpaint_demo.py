"""The docs' inpainting picture and the known region's error, on the shipped tiny-shapes model.

A scene drawn by the training set's renderer (a red circle left of a blue square), a mask over the
square, and the tiny model repaints it from "a red circle to the left of a green triangle"
(strength 0.9, seed 0). Prints what the scene parser sees before and after, and the known
region's error against the VAE's own round trip (encode -> decode of the input, no sampling):

    python benchmarks/inpaint_demo.py [--out docs/images]

The known region (mask 0) of the final latents is the input's latents exactly (masked sampling
puts them back after the last step), so its pixels differ from the input only by the VAE's round
trip, plus the decoder's reach across the mask edge: the error is measured on all known pixels
and on those at least 8 pixels (one latent cell) from the mask.
"""

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from tiny_imagegen.models.pixels import to_pil
from tiny_imagegen.pipelines.pipeline import Pipeline
from tiny_imagegen.train.scene_parser import parse_image
from tiny_imagegen.train.shapes_dataset import Scene, SceneObject, render

PROMPT = "a red circle to the left of a green triangle"


def known_region_errors(out: np.ndarray, ref: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """(max, mean) absolute difference in 8-bit levels over the pixels `keep` selects."""
    d = np.abs(out.astype(np.int16) - ref.astype(np.int16))[keep]
    return float(d.max()), float(d.mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write before.png, mask.png, after.png and the strip here")
    args = p.parse_args()
    objects = (SceneObject("circle", "red", "large", 18, 32, 22), SceneObject("square", "blue", "large", 46, 32, 22))
    before = Image.fromarray(render(Scene("", None, objects, 64)))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 32:62] = 255
    pipe = Pipeline.from_pretrained("tiny-shapes", dtype=mx.float32)
    after = pipe.generate(PROMPT, seed=0, image=before, mask=Image.fromarray(mask), strength=0.9)[0]
    q = pipe.encode_image(before, 64, 64)
    round_trip = to_pil(pipe.vae.decode_latents(pipe.init_latents(q, None)))[0]  # the posterior's mode
    # the very latents the sampler kept in the known region: the posterior sampled with seed 0's ε
    kept = to_pil(pipe.vae.decode_latents(pipe.init_latents(q, pipe.posterior_noise(0, q.mean.shape))))[0]
    show = lambda im: [(f.colour, f.shape, round(f.x)) for f in parse_image(im)]  # noqa: E731
    print(f"before: {show(before)}\nafter:  {show(after)}")
    b, a, r, k = (np.asarray(im.convert("RGB")) for im in (before, after, round_trip, kept))
    keep = np.repeat((mask == 0)[..., None], 3, axis=-1)
    far = np.zeros((64, 64), bool)
    far[:8, :], far[56:, :], far[:, :24] = True, True, True  # >= 8 px from the masked box [16:48, 32:62]
    far = np.repeat(far[..., None], 3, axis=-1)
    for name, sel in (("all known pixels", keep), (">= 8 px from the mask", far)):
        out_max, out_mean = known_region_errors(a, b, sel)
        vae_max, vae_mean = known_region_errors(r, b, sel)
        print(f"{name}: output vs input max {out_max:.0f} / mean {out_mean:.2f} levels; "
              f"VAE round trip (mode) vs input max {vae_max:.0f} / mean {vae_mean:.2f}; output vs the decoded "
              f"kept latents max {known_region_errors(a, k, sel)[0]:.0f} / mean {known_region_errors(a, k, sel)[1]:.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        scale = 3
        tiles = [before, Image.fromarray(mask).convert("RGB"), after]
        strip = Image.new("RGB", (len(tiles) * 64 * scale + (len(tiles) - 1) * 4, 64 * scale), (255, 255, 255))
        for i, im in enumerate(tiles):
            strip.paste(im.convert("RGB").resize((64 * scale, 64 * scale), Image.NEAREST), (i * (64 * scale + 4), 0))
        strip.save(args.out / "inpaint-tiny-shapes.png")
        print(f"wrote {args.out / 'inpaint-tiny-shapes.png'} (before | mask | after)")


if __name__ == "__main__":
    main()
