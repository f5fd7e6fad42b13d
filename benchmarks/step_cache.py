"""Step caching (First-Block Cache, step_cache.py; MagCache, mag_cache.py): what it buys and what it costs.

1. The tiny model: the scene parser's accuracy and the time per image (and of it the denoising
   loop, the part a cache touches; the rest is text encoding, decoding and the PNG) with no cache, FBC at
   thresholds 0.05 / 0.1 / 0.2 and MagCache at 0.06 / 0.2 / 0.5 (`--caches` to choose), over `--n`
   train captions, each image generated alone (batch 1, as a user makes one; guidance batched as
   the pipeline runs it). Caption by caption the settings run one after another, so load from
   other processes hits them alike; the load average is printed before and after.
2. A full-width FLUX.1-dev-shaped step (D = 3072, 24 heads, guidance input; `--tokens` image
   tokens + `--text` text tokens, fp32, `--double` + `--single` blocks): the time of a full step, of
   a computed and of a skipped cached step, the first block, one double and one single block,
   and the check (two means and the host sync); then the same extrapolated to FLUX.1's 19 + 38
   blocks. Median of `--repeats`, the modes interleaved.

    python benchmarks/step_cache.py --n 200
    python benchmarks/step_cache.py --n 0 --tokens 1024          # only the full-width step
"""

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiny_imagegen  # noqa: E402,F401  (first: it chooses MLX's BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from tiny_imagegen.device import blas  # noqa: E402
from tiny_imagegen.diffusion.step_cache import FirstBlockCache, computed_fraction, relative_change  # noqa: E402

CACHES = ("none", "fbc:0.05", "fbc:0.1", "fbc:0.2", "mag:0.06", "mag:0.2", "mag:0.5")


def tiny_model(n: int, caches: tuple[str, ...] = CACHES, stream: int = 2026) -> None:
    from tiny_imagegen.train.scene_parser import evaluate, score
    from tiny_imagegen.train.shapes_dataset import sample_scene
    from tiny_imagegen.train.tiny_shapes import load_pipeline

    pipe = load_pipeline(Path(__file__).resolve().parents[1] / "weights" / "tiny-shapes")
    captions = [sample_scene(stream, i, "train").caption for i in range(n)]
    caches = ("none", *(c for c in caches if c != "none"))  # the baseline first
    images = {c: [] for c in caches}
    seconds = {c: 0.0 for c in caches}
    denoising = {c: 0.0 for c in caches}  # the part a cache touches (pipe.timings["denoise"])
    computed = {c: [] for c in caches}
    for c in caches:  # warm-up
        pipe.generate(captions[0], seed=0, cache=None if c == "none" else c)
    load = os.getloadavg()[0]
    for i, caption in enumerate(captions):
        for c in caches:
            start = time.perf_counter()
            image = pipe.generate(caption, seed=i, cache=None if c == "none" else c)[0]
            seconds[c] += time.perf_counter() - start
            denoising[c] += pipe.timings["denoise"]
            images[c].append(np.asarray(image))
            if c != "none":
                computed[c].append(computed_fraction(pipe.step_cache.states))
    print(f"tiny-shapes, {n} train captions (stream {stream}), {pipe.defaults.steps} steps, guidance {pipe.defaults.guidance} "
          f"(batched [positive; negative]), one image at a time; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (1 min)")
    print("| cache | scene parser, per check | \"all\" vs none (95% interval) | images right->wrong / wrong->right "
          "| time per image | vs none | of it denoising | vs none | forwards running the blocks (fbc: after the first) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = seconds["none"] / n
    scores = {c: evaluate(captions, np.stack(images[c]), verbose=False) for c in caches}
    right = {c: np.array([bool(score(cap, im)["all"]) for cap, im in zip(captions, images[c])]) for c in caches}
    for c in caches:
        frac = f"{100 * statistics.mean(computed[c]):.0f}%" if computed[c] else "100%"
        lost = 100 * (scores[c]["all"] - scores["none"]["all"])
        worse, better = int(np.sum(right["none"] & ~right[c])), int(np.sum(~right["none"] & right[c]))
        print(f"| {c} | {_fmt(scores[c])} | {lost:+.1f} points ({_interval(worse, better, n)}) | {worse} / {better} "
              f"| {1000 * seconds[c] / n:.0f} ms | {base / (seconds[c] / n):.2f}x | {1000 * denoising[c] / n:.0f} ms "
              f"| {denoising['none'] / denoising[c]:.2f}x | {frac} |", flush=True)


def _interval(worse: int, better: int, n: int) -> str:
    """A 95% interval, in points, of the paired difference in "all" (the same captions and seeds with
    and without the cache): only the images whose verdict changed carry information, so its standard
    error is sqrt(changed - (better - worse)^2 / n) / n (the paired-proportions formula behind McNemar's test)."""
    d = (better - worse) / n
    se = math.sqrt(max(worse + better - (better - worse) ** 2 / n, 0.0)) / n
    return f"{100 * (d - 1.96 * se):+.1f} to {100 * (d + 1.96 * se):+.1f}"


def _fmt(score) -> str:
    if isinstance(score, dict):
        return ", ".join(f"{k} {100 * v:.1f}%" for k, v in score.items() if isinstance(v, float))
    return f"{100 * score:.1f}%"


def full_width_step(tokens: int, n_text: int, n_double: int, n_single: int, repeats: int) -> None:
    from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig

    model = MMDiT(MMDiTConfig(depth_double=n_double, depth_single=n_single, guidance_embed=True))
    mx.eval(model.parameters())
    side = int(round(tokens ** 0.5))
    k = mx.random.key(0)
    img, txt = mx.random.normal((1, side * side, 64), key=k), mx.random.normal((1, n_text, 4096), key=k)
    y, t, g = mx.random.normal((1, 768), key=k), mx.array([0.5]), mx.array([3.5])
    txt_ids, img_ids = model.position_ids(side, side, n_text)
    rope = model.rope_table(img_ids, txt_ids)
    mx.eval(img, txt, y, rope)
    c = model.conditioning(t, y, g)
    h_img, h_txt = model.img_in(img), model.txt_in(txt)
    mx.eval(c, h_img, h_txt)

    def full():
        return model(img, None, txt, None, t, y, g, rope=rope)

    def cached(state):
        return model(img, None, txt, None, t, y, g, rope=rope, cache=state)

    computed_state, skipped_state = FirstBlockCache(threshold=-1.0), FirstBlockCache(threshold=float("inf"))
    mx.eval(cached(skipped_state))  # the first call computes; later calls skip
    r = mx.random.normal(h_img.shape, key=k)
    mx.eval(r)
    modes = {
        "full step (no cache)": full,
        "cached step, computed": lambda: cached(computed_state),
        "cached step, skipped": lambda: cached(skipped_state),
        "first (double) block": lambda: model.double_blocks[0](h_img, h_txt, c, rope),
        "one single block": lambda: model.single_blocks[0](mx.concatenate([h_txt, h_img], axis=1), c, rope),
        "the check (2 means + sync)": lambda: relative_change(r, h_img),
    }
    times = {m: [] for m in modes}
    for m, f in modes.items():  # warm-up
        mx.eval(f())
    for _ in range(repeats):
        for m, f in modes.items():
            start = time.perf_counter()
            out = f()
            mx.eval(out) if not isinstance(out, float) else None
            times[m].append(time.perf_counter() - start)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"\nfull-width FLUX.1-dev-shaped step: D 3072, {side * side} image + {n_text} text tokens, fp32, "
          f"{n_double} double + {n_single} single blocks, median of {repeats}")
    print("| what | seconds |")
    print("|---|---|")
    for m, v in med.items():
        print(f"| {m} | {v:.3f} |")
    rest = med["full step (no cache)"] - n_double * med["first (double) block"] - n_single * med["one single block"]
    full57 = 19 * med["first (double) block"] + 38 * med["one single block"] + max(rest, 0.0)
    skip57 = med["cached step, skipped"]
    print(f"\nextrapolated to FLUX.1's 19 double + 38 single blocks: full step {full57:.2f} s, skipped step "
          f"{skip57:.2f} s ({100 * skip57 / full57:.1f}% of a full one; the check alone "
          f"{100 * med['the check (2 means + sync)'] / full57:.2f}%)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="train captions for the tiny model (0: skip)")
    p.add_argument("--caches", default=",".join(CACHES), help="the tiny model's settings, comma-separated")
    p.add_argument("--stream", type=int, default=2026, help="the train captions' stream (the MagCache ratios: 7)")
    p.add_argument("--tokens", type=int, default=256, help="image tokens of the full-width step (0: skip)")
    p.add_argument("--text", type=int, default=512, help="text tokens of the full-width step (FLUX.1-dev: 512)")
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"device {mx.default_device()}, BLAS: {blas.describe()}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    if args.n:
        tiny_model(args.n, tuple(args.caches.split(",")), args.stream)
    if args.tokens:
        full_width_step(args.tokens, args.text, args.double, args.single, args.repeats)


if __name__ == "__main__":
    main()
