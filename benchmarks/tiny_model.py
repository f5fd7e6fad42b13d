"""The shipped tiny model, text to PNG: latency of one image and images per second in batches.

Each row is timed in this process after one warm-up generation (the first image of a fresh
process also reads the weights and builds MLX's kernels: printed separately), as the median of
`--repeats` runs. An image is text encoding + 20 guided steps + decoding + the PNG file.

    LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/tiny_model.py
    python benchmarks/tiny_model.py --batches 1 8 50 --repeats 5
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from tiny_imagegen.pipelines.pipeline import Pipeline  # noqa: E402

PROMPTS = ["a red circle", "a blue square above a yellow circle", "two green triangles", "a large cyan square"]


def text_to_png(pipe, n: int, folder: str, seed: int) -> float:
    start = time.perf_counter()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    for i, image in enumerate(pipe.generate(prompts, seed=list(range(seed, seed + n)))):
        image.save(os.path.join(folder, f"{i}.png"))
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 50])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"device {mx.default_device()}, OpenBLAS preloaded: {'openblas' in os.environ.get('LD_PRELOAD', '')}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        pipe = Pipeline.from_pretrained("tiny-shapes", dtype=mx.float32, keep_text_encoders=True)
        loaded = time.perf_counter() - start
        first = text_to_png(pipe, 1, folder, 0)
        print(f"fresh process: load {loaded:.3f} s, first image {first:.3f} s")
        print("| batch | seconds per batch (median) | images / s | per image |")
        print("|---|---|---|---|")
        for n in args.batches:
            text_to_png(pipe, n, folder, 100)  # warm-up at this shape
            times = [text_to_png(pipe, n, folder, 1000 * r) for r in range(args.repeats)]
            t = statistics.median(times)
            print(f"| {n} | {t:.3f} | {n / t:.1f} | {1000 * t / n:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
