"""One denoising step of a full-width FLUX MM-DiT: ours (MLX) against diffusers' FluxTransformer2DModel.

FLUX.1-dev's width (24 heads x 128, T5 width 4096, pooled CLIP 768, guidance input) with 2 double
+ 4 single blocks (1.31 B parameters, 5.2 GB in fp32 per framework), identical seeded weights in
both (drawn per tensor from numpy, keyed by the diffusers name; ours loads them through the
diffusers key table), batch 1, fp32 (or --dtype bfloat16: both models cast, inputs rounded to bf16,
t and guidance float32 as the pipeline gives them). Each framework runs in its own process, so that neither
sees the other's allocations: MLX with OpenBLAS preloaded (LD_PRELOAD, see the README), torch
without it (a preloaded OpenBLAS would take over torch's BLAS calls; torch uses its own MKL /
oneDNN). The steps are interleaved (ours, torch, ours, ...) after one warm-up step each, so load
from other processes on the machine hits both alike; the table gives the median of --runs.

Reported per size: the medians and ours/torch, the max abs difference of the two outputs, the
peak memory above the weights during a step (VmHWM from /proc/self/status, reset before each
step by writing 5 to /proc/self/clear_refs; MLX also mx.get_peak_memory, whose peak over the
weight bytes is the check that a step makes no weight-sized copies), and the share of this
machine's matmul peak each reaches (the step's FLOPs / its time, against a 4096^2 matmul in the
step's dtype measured in the same process).

    python benchmarks/transformer_step.py                    # 256+256 and 1024+512 tokens, 3 runs
    python benchmarks/transformer_step.py --sizes 256x256 --runs 5 --profile
    python benchmarks/transformer_step.py --sizes 256x256 --runs 1 --dtype bfloat16
    python benchmarks/transformer_step.py --runs 1 --linears   # the step's linears alone, and what is left
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MANIFEST = ROOT / "tests" / "fixtures" / "flux_transformer" / "manifest_flux1-dev_diffusers.json"
DOUBLE, SINGLE = 2, 4
OPENBLAS = "/lib/x86_64-linux-gnu/libopenblas.so.0"


# ---- shared by both workers ---------------------------------------------------------------------


def shapes() -> dict[str, list[int]]:
    """diffusers key -> shape of FLUX.1-dev, cut to the first DOUBLE double and SINGLE single blocks."""
    def kept(key):
        parts = key.split(".")
        if parts[0] == "transformer_blocks":
            return int(parts[1]) < DOUBLE
        if parts[0] == "single_transformer_blocks":
            return int(parts[1]) < SINGLE
        return True

    return {k: v for k, v in json.loads(MANIFEST.read_text()).items() if kept(k)}


def seeded_weights():
    """(diffusers key, float32 array) in sorted order: std 1/sqrt(fan in) for matrices (so the
    activations stay O(1) through the blocks), 1 + 0.1 N for norm scales, 0.02 N for biases."""
    for i, (key, shape) in enumerate(sorted(shapes().items())):
        noise = np.random.default_rng([7, i]).standard_normal(shape, dtype=np.float32)
        if len(shape) == 2:
            yield key, noise / np.float32(np.sqrt(shape[1]))
        elif "norm" in key and key.endswith("weight"):
            yield key, 1 + np.float32(0.1) * noise
        else:
            yield key, np.float32(0.02) * noise


def inputs(n_img: int, n_txt: int) -> dict[str, np.ndarray]:
    side = int(round(n_img ** 0.5))
    assert side * side == n_img, "image tokens: a square grid"
    rng = np.random.default_rng(1)
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return {
        "img": rng.standard_normal((1, n_img, 64), dtype=np.float32),
        "txt": rng.standard_normal((1, n_txt, 4096), dtype=np.float32),
        "y": rng.standard_normal((1, 768), dtype=np.float32),
        "t": np.array([0.7], np.float32), "g": np.array([3.5], np.float32),
        "img_ids": np.stack([np.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(np.float32),
        "txt_ids": np.zeros((n_txt, 3), np.float32),
    }


def step_flops(n_img: int, n_txt: int, D: int = 3072) -> float:
    """Multiply-adds x 2 of the linears and the attention products (the rest is < 1%)."""
    L = n_img + n_txt
    per_token_block = 2 * 12 * D * D  # double: qkv 3D^2 + proj D^2 + MLP 8D^2 per stream; single: 7D^2 + 5D^2
    attention = 2 * 2 * L * L * D  # Q K^T and P V
    blocks = (DOUBLE + SINGLE) * (per_token_block * L + attention)
    embed = 2 * n_txt * 4096 * D + 2 * n_img * 64 * D + 2 * n_img * D * 64
    return float(blocks + embed)


def linear_shapes(n_img: int, n_txt: int, D: int = 3072) -> list[tuple[int, int, int, int]]:
    """The step's linears as (rows, in, out, how many): each double block's four per stream, each
    single block's two, and the text embedding (the other embedders are < 0.1%)."""
    double = [(M, k, n, DOUBLE) for M in (n_img, n_txt) for k, n in ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D))]
    single = [(n_img + n_txt, k, n, SINGLE) for k, n in ((D, 7 * D), (5 * D, D))]
    return double + single + [(n_txt, 4096, D, 1)]


def time_linears(shapes, linear) -> dict:
    """The step's linears alone: `linear(M, k, n)` returns a function that computes one product of
    that shape; each shape timed as the median of 3 after a warm-up, times how many the step has."""
    seconds = flops = 0.0
    for M, k, n, count in shapes:
        fn = linear(M, k, n)
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds += count * statistics.median(times)
        flops += count * 2 * M * k * n
    return {"seconds": seconds, "flops": flops}


def peak_rss_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# ---- workers: build once, then answer one json command per line ----------------------------------


class MLXWorker:
    def __init__(self, dtype: str):
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from tiny_imagegen.checkpoints.flux import DIFFUSERS
        from tiny_imagegen.checkpoints.mapping import load_checkpoint
        from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig

        self.mx, self.dtype = mx, getattr(mx, dtype)
        self.model = MMDiT(MMDiTConfig(guidance_embed=True, depth_double=DOUBLE, depth_single=SINGLE))  # FLUX.1-dev width
        source = {k: mx.array(v) for k, v in seeded_weights()}
        load_checkpoint(self.model, DIFFUSERS, source, self.dtype)  # as load_flux_transformer(dtype=) does
        mx.eval(self.model.parameters())
        del source
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))

    def matmul(self) -> float:
        mx = self.mx
        a, b = (mx.random.normal((4096, 4096)).astype(self.dtype) for _ in range(2))
        mx.eval(a, b, a @ b)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - start)
        return 2 * 4096**3 / statistics.median(times)

    def linears(self, shapes) -> dict:
        mx = self.mx

        def linear(M, k, n):
            x, w = mx.random.normal((M, k)).astype(self.dtype), mx.random.normal((n, k)).astype(self.dtype)
            mx.eval(x, w)
            return lambda: mx.eval(x @ w.T)  # as nn.Linear computes it

        return time_linears(shapes, linear)

    def step(self, n_img, n_txt, save, profile=False):
        mx = self.mx
        x = {k: (v if k.endswith("ids") else mx.array(v) if k in "tg" else mx.array(v).astype(self.dtype))
             for k, v in inputs(n_img, n_txt).items()}
        mx.eval([v for v in x.values() if isinstance(v, mx.array)])
        if profile:
            from benchmarks.profile_step import profile_step

            return {"profile": profile_step(self.model, x)}
        mx.reset_peak_memory()
        before = rss("VmRSS")
        peak_rss_reset()
        start = time.perf_counter()
        out = self.model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"])
        mx.eval(out)
        seconds = time.perf_counter() - start
        if save:
            np.save(save, np.array(out.astype(mx.float32)))
        return {"seconds": seconds, "peak_above_weights": rss("VmHWM") - before,
                "mlx_peak": mx.get_peak_memory(), "weights": self.weight_bytes}


class TorchWorker:
    def __init__(self, dtype: str):
        import torch
        from diffusers import FluxTransformer2DModel

        self.torch = torch
        with torch.device("meta"):
            model = FluxTransformer2DModel(num_layers=DOUBLE, num_single_layers=SINGLE, guidance_embeds=True)
        model = model.to_empty(device="cpu")
        params = dict(model.state_dict(keep_vars=True))
        with torch.no_grad():
            for k, v in seeded_weights():
                params[k].copy_(torch.from_numpy(v))
        self.dtype = getattr(torch, dtype)
        self.model = model.eval() if dtype == "float32" else model.eval().to(self.dtype)

    def matmul(self) -> float:
        torch = self.torch
        a, b = torch.randn(4096, 4096, dtype=self.dtype), torch.randn(4096, 4096, dtype=self.dtype)
        a @ b
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return 2 * 4096**3 / statistics.median(times)

    def linears(self, shapes) -> dict:
        torch = self.torch

        def linear(M, k, n):
            x, w = torch.randn(M, k, dtype=self.dtype), torch.randn(n, k, dtype=self.dtype)
            return lambda: torch.nn.functional.linear(x, w)

        with torch.inference_mode():
            return time_linears(shapes, linear)

    def step(self, n_img, n_txt, save, profile=False):
        torch = self.torch
        x = {k: torch.from_numpy(v) for k, v in inputs(n_img, n_txt).items()}
        x.update({k: x[k].to(self.dtype) for k in ("img", "txt", "y")})  # diffusers casts t itself
        before = rss("VmRSS")
        peak_rss_reset()
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                             timestep=x["t"], guidance=x["g"], img_ids=x["img_ids"], txt_ids=x["txt_ids"]).sample
            seconds = time.perf_counter() - start
        if save:
            np.save(save, out.float().numpy())
        return {"seconds": seconds, "peak_above_weights": rss("VmHWM") - before}


def worker(kind: str, dtype: str):
    w = {"mlx": MLXWorker, "torch": TorchWorker}[kind](dtype)
    print(json.dumps({"ready": True, "rss": rss("VmRSS")}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "matmul":
            reply = {"flops": w.matmul()}
        elif cmd["op"] == "linears":
            reply = w.linears(linear_shapes(cmd["img"], cmd["txt"]))
        else:
            reply = w.step(cmd["img"], cmd["txt"], cmd.get("save"), cmd.get("profile", False))
        print(json.dumps(reply), flush=True)


# ---- the driver ---------------------------------------------------------------------------------


class Process:
    def __init__(self, kind: str, dtype: str):
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if kind == "mlx" and Path(OPENBLAS).exists():
            env["LD_PRELOAD"] = OPENBLAS
        self.kind = kind
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--dtype", dtype], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.ready = self.read()

    def read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker died (out of memory?)")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["256x256", "1024x512"], help="image x text tokens")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--frameworks", nargs="+", default=["mlx", "torch"], choices=["mlx", "torch"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--profile", action="store_true", help="also time ours per component (benchmarks/profile_step.py)")
    p.add_argument("--linears", action="store_true", help="also time the step's linears alone in each framework")
    p.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.dtype)

    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
    procs = {}
    for kind in args.frameworks:  # one after the other, so that only one builds its weights at a time
        start = time.perf_counter()
        procs[kind] = Process(kind, args.dtype)
        print(f"{kind}: weights built in {time.perf_counter() - start:.0f} s, RSS {procs[kind].ready['rss'] / 1e9:.2f} GB")
    peak = {k: procs[k].ask(op="matmul")["flops"] for k in procs}
    print(f"{args.dtype} 4096^2 matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            n_img, n_txt = map(int, size.split("x"))
            results = {k: [] for k in procs}
            for k, proc in procs.items():  # warm-up, and the outputs to compare
                results[k].append(proc.ask(op="step", img=n_img, txt=n_txt, save=f"{tmp}/{k}.npy"))
            for _ in range(args.runs):
                for k, proc in procs.items():
                    results[k].append(proc.ask(op="step", img=n_img, txt=n_txt))
            med = {k: statistics.median(r["seconds"] for r in v[1:]) for k, v in results.items()}
            mem = {k: max(r["peak_above_weights"] for r in v) for k, v in results.items()}
            err = (float(np.max(np.abs(np.load(f"{tmp}/mlx.npy") - np.load(f"{tmp}/torch.npy"))))
                   if len(procs) == 2 else float("nan"))
            flops = step_flops(n_img, n_txt)
            rows.append((size, med, mem, err, {k: flops / med[k] / peak[k] for k in procs}, results))
            print(f"{size}: " + ", ".join(f"{k} {med[k]:.2f} s (runs {[round(r['seconds'], 2) for r in results[k]]})"
                                          for k in procs), flush=True)
            if args.linears:  # the same products alone: is the gap in the matmuls or beside them?
                lin = {k: proc.ask(op="linears", img=n_img, txt=n_txt) for k, proc in procs.items()}
                print(f"  the step's linears alone ({lin[next(iter(lin))]['flops'] / 1e9:.0f} GFLOP): " + ", ".join(
                    f"{k} {v['seconds']:.2f} s = {v['flops'] / v['seconds'] / 1e9:.0f} GFLOP/s, the rest of the step "
                    f"{med[k] - v['seconds']:.2f} s" for k, v in lin.items()), flush=True)
            if args.profile and "mlx" in procs:
                prof = procs["mlx"].ask(op="step", img=n_img, txt=n_txt, profile=True)["profile"]
                total = sum(prof.values())
                print(f"  ours by component (each op evaluated alone, sum {total:.2f} s): " + ", ".join(
                    f"{k} {v:.2f} s ({v / total:.0%})" for k, v in sorted(prof.items(), key=lambda kv: -kv[1])))
    for proc in procs.values():
        proc.close()

    print(f"\nload average after: {os.getloadavg()[0]:.2f}; step FLOPs: " + ", ".join(
        f"{s} {step_flops(*map(int, s.split('x'))) / 1e9:.0f} G" for s in args.sizes))
    print("| tokens (image + text) | ours | torch | ours / torch | max abs diff | peak above weights, ours / torch | share of matmul peak, ours / torch |")
    print("|---|---|---|---|---|---|---|")
    for size, med, mem, err, share, _ in rows:
        if len(procs) < 2:
            print(f"| {size} | {med} | | | | {mem} | {share} |")
            continue
        print(f"| {size.replace('x', ' + ')} | {med['mlx']:.2f} s | {med['torch']:.2f} s | {med['mlx'] / med['torch']:.2f} "
              f"| {err:.1e} | {mem['mlx'] / 1e9:.2f} / {mem['torch'] / 1e9:.2f} GB "
              f"| {share['mlx']:.0%} / {share['torch']:.0%} |")
    for size, *_, results in rows:  # the step's peak against its weights: no weight-sized temporaries
        if "mlx" in results:
            r = max(results["mlx"], key=lambda r: r["mlx_peak"])
            print(f"ours {size} {args.dtype}: weights {r['weights'] / 1e9:.3f} GB, step peak (mx.get_peak_memory) "
                  f"{r['mlx_peak'] / 1e9:.3f} GB = {r['mlx_peak'] / r['weights']:.3f} x weights "
                  f"= weights + {(r['mlx_peak'] - r['weights']) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
