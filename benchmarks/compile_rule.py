"""What `mx.compile` costs and buys on the CPU, for the two sizes the rule (device/compilation.py)
tells apart: the shipped tiny model's transformer, and a full-width FLUX.1-dev-shaped one.

Each cell is a fresh process that builds the transformer (the shipped weights; seeded random ones at
full width; fp32, batch 2 as with batched guidance), runs `--steps` forwards at one shape and reports the first forward (which
traces and, compiled, builds the fused kernels unless MLX's cache has them) and the median of the
rest. "cold": an empty MLX kernel cache (`$TMPDIR/mlx/`, as after install or a reboot); "warm":
the same cache a second time. Compiled is the pipeline's path (`mx.compile` of the forward with the
weights as inputs); plain runs op by op with compilation off (`mx.disable_compile`, MLX's own
compiled helpers included). Cells interleaved, median of `--repeats`.

    python benchmarks/compile_rule.py                                  # tiny, and full width at 64 + 64 tokens
    python benchmarks/compile_rule.py --sizes full --tokens 256 --text 64 --steps 3
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(size: str, compiled: bool, tokens: int, text: int, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import tiny_imagegen  # noqa: F401  (first: it chooses MLX's BLAS)
    import mlx.core as mx

    from tiny_imagegen.checkpoints.convert import load_component
    from tiny_imagegen.models.mmdit import MMDiT
    from tiny_imagegen.registry import find

    if not compiled:
        mx.disable_compile()
    mx.random.seed(0)
    if size == "tiny":  # the shipped transformer itself
        model = load_component(ROOT / "weights" / "tiny-shapes", "transformer", dtype=mx.float32)
    else:  # FLUX.1-dev's width, one double and one single block
        model = MMDiT(replace(find("flux1-dev").configs["transformer"], depth_double=1, depth_single=1))
    config = model.config
    mx.eval(model.parameters())
    side = int(tokens ** 0.5)
    txt_ids, img_ids = model.position_ids(side, side, text)
    rope = model.rope_table(img_ids, txt_ids)
    img = mx.random.normal((2, side * side, config.in_channels))
    txt = mx.random.normal((2, text, config.context_dim))
    y, t = mx.random.normal((2, config.vec_dim)), mx.array([0.7, 0.7])
    g = mx.array([3.5, 3.5]) if config.guidance_embed else None
    fn = lambda img, txt, t, y, g, rope: model(img, None, txt, None, t, y, g, rope=rope)  # noqa: E731
    if compiled:
        fn = mx.compile(fn, inputs=model.state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(fn(img, txt, t, y, g, rope))
        times.append(time.perf_counter() - start)
    return {"first": times[0], "step": statistics.median(times[1:]) if steps > 1 else float("nan")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    p.add_argument("--tokens", type=int, default=64, help="image tokens of the full-width model (a square number)")
    p.add_argument("--text", type=int, default=64, help="text tokens of the full-width model")
    p.add_argument("--steps", type=int, default=4, help="forwards per process (the first, then the median of the rest)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--worker", nargs=2, metavar=("SIZE", "COMPILED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = {"tiny": (64, 16), "full": (args.tokens, args.text)}
    if args.worker:
        size, compiled = args.worker[0], args.worker[1] == "1"
        print(json.dumps(worker(size, compiled, *shape[size], args.steps)))
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for size in args.sizes:
                for compiled in (False, True):
                    cache = tempfile.mkdtemp(dir=folder)
                    for warmth in ("cold", "warm"):
                        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--tokens",
                                              str(args.tokens), "--text", str(args.text), "--worker", size,
                                              str(int(compiled))], env={**os.environ, "TMPDIR": cache},
                                             capture_output=True, text=True, check=True).stdout
                        results.setdefault((size, compiled, warmth), []).append(json.loads(out))
                    shutil.rmtree(cache)
    print("| transformer | tokens (image + text) | compiled | MLX cache | first forward | later forwards |")
    print("|---|---|---|---|---|---|")
    for (size, compiled, warmth), runs in results.items():
        first = statistics.median(r["first"] for r in runs)
        step = statistics.median(r["step"] for r in runs)
        print(f"| {size} | {shape[size][0]} + {shape[size][1]} | {'yes' if compiled else 'no'} | {warmth} | "
              f"{first:.3f} s | {step:.3f} s |", flush=True)


if __name__ == "__main__":
    main()
