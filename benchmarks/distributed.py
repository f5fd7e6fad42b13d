"""Tensor parallelism (distributed.py): a full-width FLUX.1-shaped transformer, whole on one rank
and split over the ranks of `mlx.launch`: the time of a forward and the memory each rank holds.

    mlx.launch -n 2 --backend ring -- python benchmarks/distributed.py               # this machine
    mlx.launch --hostfile hosts.json --backend ring -- python benchmarks/distributed.py --double 19 --single 38

Every rank builds the same seeded weights, times the whole model (median of --repeats), shards it,
checks that the output is unchanged and times it again. Memory: the parameters each rank holds and
MLX's peak during the sharded forward.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiny_imagegen  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tiny_imagegen.pipelines.distributed import init, shard_mmdit  # noqa: E402
from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402


def timed(f, repeats):
    mx.eval(f())
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(f())
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256, help="image tokens")
    p.add_argument("--text", type=int, default=512, help="text tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    group = init()
    mx.random.seed(0)
    model = MMDiT(MMDiTConfig(depth_double=args.double, depth_single=args.single, guidance_embed=True))
    mx.eval(model.parameters())
    side = int(round(args.tokens ** 0.5))
    k = mx.random.key(0)
    img, txt = mx.random.normal((1, side * side, 64), key=k), mx.random.normal((1, args.text, 4096), key=k)
    y, t, g = mx.random.normal((1, 768), key=k), mx.array([0.5]), mx.array([3.5])
    txt_ids, img_ids = model.position_ids(side, side, args.text)
    rope = model.rope_table(img_ids, txt_ids)
    f = lambda: model(img, None, txt, None, t, y, g, rope=rope)  # noqa: E731
    whole_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    whole_s = timed(f, args.repeats)
    reference = f()
    mx.eval(reference)
    shard_mmdit(model, group)
    rank_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    mx.reset_peak_memory()
    sharded_s = timed(f, args.repeats)
    err = float(mx.abs(f() - reference).max())
    print(f"| {group.rank()} of {group.size()} | {args.double} + {args.single}, {side * side} + {args.text} tokens | {whole_s:.2f} s | {sharded_s:.2f} s | "
          f"{whole_bytes / 2**30:.2f} GiB | {rank_bytes / 2**30:.2f} GiB | {mx.get_peak_memory() / 2**30:.2f} GiB | "
          f"{err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
