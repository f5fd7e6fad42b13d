"""The shipped tiny model, text to PNG: the first image after install, latency of one image and
images per second in batches.

First image: each cell is a fresh `tiny-imagegen generate --model tiny-shapes` process (imports,
load, one 20-step guided image, PNG) timed by this script from its start to its exit, the package
compiled to bytecode first as `pip install` leaves it, with MLX's compile cache (`$TMPDIR/mlx/`) empty ("cold": the first run
after install or a reboot) or filled by the run before ("warm"), for each BLAS (`TINY_IMAGEGEN_BLAS`:
the system OpenBLAS where installed, MLX's bundled reference BLAS) and compile setting
(`TINY_IMAGEGEN_COMPILE`: auto, the default, which does not compile the tiny model on a CPU; on).
Median of `--first-repeats` runs per cell, the cells interleaved so that load from other processes
hits them alike.

Batches: timed in this process after one warm-up generation, the median of `--repeats` runs. An
image is text encoding + 20 guided steps + decoding + the PNG file.

    python benchmarks/tiny_model.py
    python benchmarks/tiny_model.py --batches 1 8 50 --repeats 5 --first-repeats 3
    python benchmarks/tiny_model.py --batches 1 --first-repeats 9 --compile auto    # the default's cells only
"""

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tiny_imagegen  # noqa: E402,F401  (first: it chooses MLX's BLAS before MLX loads)
import mlx.core as mx  # noqa: E402

from tiny_imagegen.device import blas  # noqa: E402
from tiny_imagegen.pipelines.pipeline import Pipeline  # noqa: E402

# the command a user runs after install, `tiny-imagegen generate`, as `python -m tiny_imagegen`
FIRST_IMAGE = [sys.executable, "-m", "tiny_imagegen", "generate", "--model", "tiny-shapes", "--prompt", "a red circle",
               "--overwrite", "--output"]
BLAS_NAME = "import tiny_imagegen, tiny_imagegen.device.blas as b; print(b.describe())"

PROMPTS = ["a red circle", "a blue square above a yellow circle", "two green triangles", "a large cyan square"]


def machine_probe() -> str:
    """How fast this machine is right now, for comparing runs: MLX's cost per small elementwise op
    (what the tiny model's ~1,100-op steps are made of) and a 1024^2 float32 matmul (the BLAS).
    On a shared virtual machine both drift by tens of percent within an hour."""
    x = mx.random.normal((2, 80, 128))
    a = mx.random.normal((1024, 1024))
    mx.eval(x, a)

    def best(fn, repeats=5):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        return min(times)

    def chain():
        y = x
        for _ in range(1000):
            y = y + x
        return y

    op = best(chain) / 1000
    gflops = 2 * 1024**3 / best(lambda: a @ a) / 1e9
    return f"machine probe: {op * 1e6:.1f} us per elementwise op on (2, 80, 128), 1024^2 matmul {gflops:.0f} GFLOP/s"


def text_to_png(pipe, n: int, folder: str, seed: int) -> float:
    start = time.perf_counter()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    for i, image in enumerate(pipe.generate(prompts, seed=list(range(seed, seed + n)))):
        image.save(os.path.join(folder, f"{i}.png"))
    return time.perf_counter() - start


def first_image(env: dict, cache: str, png: str) -> float:
    """Seconds from starting a fresh `tiny-imagegen generate` process to its exit, PNG written."""
    env = {**os.environ, **env, "TMPDIR": cache, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(FIRST_IMAGE + [png], env=env, cwd=ROOT, capture_output=True, check=True)
    return time.perf_counter() - start


def import_seconds(env: dict) -> float:
    """A fresh process that only imports what `generate` imports (its share of the first image)."""
    code = "import tiny_imagegen.commands.generate, tiny_imagegen.pipelines.flux1"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, check=True)
    return time.perf_counter() - start


def first_image_table(repeats: int, folder: str, compiles: tuple[str, ...] = ("auto", "on")) -> None:
    here = os.environ.get(blas.ENV) or "auto"  # an explicit path stays as given
    blases = [here, "off"] if "openblas" in blas.describe().lower() else ["off"]
    cells = [(b, c) for b in blases for c in compiles]
    times = {(b, c, w): [] for b, c in cells for w in ("cold", "warm")}
    imports = {b: [] for b in blases}
    names = {b: subprocess.run([sys.executable, "-c", BLAS_NAME], env={**os.environ, "TINY_IMAGEGEN_BLAS": b},
                               cwd=ROOT, capture_output=True, text=True).stdout.strip() for b in blases}
    # `pip install` compiles the package to bytecode; a checkout run with PYTHONDONTWRITEBYTECODE=1
    # would instead compile ~100 modules from source in every process (~0.09 s here)
    compileall.compile_dir(str(ROOT / "tiny_imagegen"), quiet=1)
    for r in range(repeats):
        for b, c in cells:
            cache = tempfile.mkdtemp(dir=folder)  # an empty MLX compile cache
            env = {"TINY_IMAGEGEN_BLAS": b, "TINY_IMAGEGEN_COMPILE": c}
            for warmth in ("cold", "warm"):  # the second run finds the kernels the first one built
                times[(b, c, warmth)].append(first_image(env, cache, os.path.join(folder, "first.png")))
            shutil.rmtree(cache)
            if c == "auto":
                imports[b].append(import_seconds(env))
    for b in blases:
        print(f"{b}: {names[b]}")
    print("| BLAS | compile | MLX cache | first image (median) | of which imports |")
    print("|---|---|---|---|---|")
    for b, c in cells:
        for w in ("cold", "warm"):
            print(f"| {b} | {c} | {w} | {statistics.median(times[(b, c, w)]):.2f} s | "
                  f"{statistics.median(imports[b]):.2f} s |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 50])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--first-repeats", type=int, default=3, help="fresh processes per first-image cell (0: skip)")
    p.add_argument("--compile", default="auto,on", help="the first-image cells' TINY_IMAGEGEN_COMPILE settings: auto "
                   "alone keeps the compiler's 10 s builds from running between the default's cells")
    args = p.parse_args()
    print(f"device {mx.default_device()}, BLAS: {blas.describe()}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(machine_probe())
    with tempfile.TemporaryDirectory() as folder:
        if args.first_repeats:
            first_image_table(args.first_repeats, folder, tuple(args.compile.split(",")))
            print(machine_probe())
        start = time.perf_counter()
        pipe = Pipeline.from_pretrained("tiny-shapes", dtype=mx.float32, keep_text_encoders=True)
        loaded = time.perf_counter() - start
        first = text_to_png(pipe, 1, folder, 0)
        print(f"this process: load {loaded:.3f} s, first image {first:.3f} s")
        print("| batch | seconds per batch (median) | images / s | per image |")
        print("|---|---|---|---|")
        for n in args.batches:
            text_to_png(pipe, n, folder, 100)  # warm-up at this shape
            times = [text_to_png(pipe, n, folder, 1000 * r) for r in range(args.repeats)]
            t = statistics.median(times)
            print(f"| {n} | {t:.3f} | {n / t:.1f} | {1000 * t / n:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
