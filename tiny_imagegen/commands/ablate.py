"""Train and score the tiny-shapes ablation table (train/ablations/runner.py), one run at a time.

    python examples/ablate.py                        # every run not yet in the results file
    python examples/ablate.py --only unet            # one row (both seeds)
    python examples/ablate.py --table                # rewrite the table and grid from the results file
    python examples/ablate.py --list                 # the variants and their parameter counts
    python examples/ablate.py --time-steps 5         # s/step of each variant, and the table's estimated wall time
    python examples/ablate.py --smoke --results /tmp/abl/results.json --work /tmp/abl   # the CI smoke run

Each finished run is appended to the results file (JSON) and skipped when the command runs
again, so the table can be built over several sittings; a run in progress checkpoints under
--work and resumes. After every run the table (table.md) and the sample grid (grid.png) beside
the results file are rewritten. The shipped recipe's variant runs first: if its seed-0 run does
not reach half the shipped model's train-split object accuracy, the command stops and asks for a
larger --budget-steps (--no-budget-check runs on anyway).

Set `LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0` on x86-64 Linux (MLX's CPU matmuls ~50x faster).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..train.ablations import runner as ab
from ..train.ablations.report import format_table, legend, write_grid

DEFAULT_RESULTS = "benchmarks/ablations/results.json"
SHIPPED_SECONDS_PER_STEP = 99.6 * 60 / 5000  # the shipped MM-DiT's training on 2 unshared cores (docs/tiny-shapes.md)


def budget_verdict(records: list[dict], budget: ab.Budget) -> bool | None:
    """Whether the shipped recipe's seed-0 run reached the required accuracy (None: not run yet)."""
    ref = ab.find_record(records, ab.RunSpec(ab.VARIANTS[ab.REFERENCE], 0), budget)
    if ref is None:
        return None
    return ref["metrics"]["train"]["object"] >= ab.SHIPPED_TRAIN_OBJECT / 2


def write_report(results: Path, budget: ab.Budget, command: str) -> str:
    records = ab.read_results(results)
    captions = write_grid(results.parent / "samples", list(ab.VARIANTS), results.parent / "grid.png",
                          budget.eval_captions, budget.binding_captions)
    table = format_table(records, budget.key(), ab.GROUPS, {n: v.description for n, v in ab.VARIANTS.items()},
                         ab.REFERENCE, ab.SHIPPED_TRAIN_OBJECT / 2, command)
    table += "\n" + legend(captions) + "\n"
    (results.parent / "table.md").write_text(table)
    return table


def run_table(args, budget: ab.Budget, results: Path, work: Path, command: str) -> int:
    """Every planned run not in the results file and not running in another process: a run is
    claimed by a lock under --work, so several processes (--jobs, or commands started by hand)
    share one table, each taking the next free run."""
    specs = ab.plan_runs(args.only, tuple(args.seeds))
    data = None
    for i, spec in enumerate(specs, 1):
        records = ab.read_results(results)
        if args.budget_check and budget_verdict(records, budget) is False:
            print(f"stopping: `{ab.REFERENCE}` seed 0 reaches less than {ab.SHIPPED_TRAIN_OBJECT / 2:.1%} train object "
                  f"accuracy at {budget.steps} steps; rerun with a larger --budget-steps (or --no-budget-check)",
                  file=sys.stderr)
            return 1
        if ab.find_record(records, spec, budget):
            print(f"[{i}/{len(specs)}] {spec.name}: done, skipped", file=sys.stderr)
            continue
        with ab.file_lock(work / f"{spec.name}.lock", wait=False) as claimed:
            if not claimed:
                print(f"[{i}/{len(specs)}] {spec.name}: running in another process, skipped", file=sys.stderr)
                continue
            if ab.find_record(ab.read_results(results), spec, budget):
                continue  # another process finished it while this one was busy
            if data is None:
                data = ab.load_data(args.weights, work, budget.pool)
            print(f"[{i}/{len(specs)}] {spec.name}: {spec.variant.description}; {budget.steps} steps x batch "
                  f"{budget.batch}", file=sys.stderr)
            record = ab.run_one(spec, data, budget, work, results.parent / "samples")
            ab.append_result(results, record)
        with ab.file_lock(results.with_suffix(".lock")):
            write_report(results, budget, command)
        m = record["metrics"]
        print(f"[{i}/{len(specs)}] {spec.name}: train object {m['train']['object']:.1%}, all {m['train']['all']:.1%}; "
              f"binding all {m['binding']['all']:.1%}; {record['wall_time_s']['train'] / 60:.1f} min training",
              file=sys.stderr)
    return 0


def time_steps(args, budget: ab.Budget, work: Path, n: int) -> None:
    """Seconds per training step of every variant at the budget's batch (after one compiling
    step), seconds per scored image, and the full table's wall time scaled to the shipped
    recipe's measured s/step (this machine may be loaded: the ratios are what carry over)."""
    import os

    import mlx.core as mx

    from ..train.ablations.scoring import LOSSES, caption_sets, generate
    from ..train.trainer import Trainer, TrainConfig

    data = ab.load_data(args.weights, work, budget.batch)  # one batch is enough to time a step
    captions = list(caption_sets(10, 0)["train"])
    rows = {}
    print(f"load average {os.getloadavg()[0]:.1f} at the start", file=sys.stderr)
    for v in ab.VARIANTS.values():
        spec = ab.RunSpec(v, 0)
        model = ab.build_denoiser(v, data.tokenizer.sp.get_piece_size(), 0)
        trainer = Trainer(model, LOSSES[v.objective], ab.make_batches(spec, data, replace(budget, pool=budget.batch)),
                          TrainConfig(steps=n + 1), tempfile.mkdtemp(), v.name)
        trainer.train_step()  # compiles
        t0 = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
        per_step = (time.perf_counter() - t0) / n
        per_image = {}
        for size in (64, 128) if v.extrapolate else (64,):
            t0 = time.perf_counter()
            generate(model, v.objective, data.vae, data.tokenizer, captions, list(range(len(captions))), size,
                     budget.sample_steps, budget.guidance)
            per_image[size] = (time.perf_counter() - t0) / len(captions)
        mx.clear_cache()
        rows[v.name] = (per_step, per_image)
        print(f"{v.name:22s} {per_step:6.2f} s/step  " + "  ".join(f"{s}²: {t:.3f} s/image" for s, t in per_image.items())
              + f"   load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    scale = SHIPPED_SECONDS_PER_STEP / rows[ab.REFERENCE][0]
    total = 0.0
    print(f"\nestimate at {budget.steps} steps, scaled so that `{ab.REFERENCE}` runs at the shipped "
          f"{SHIPPED_SECONDS_PER_STEP:.2f} s/step (x{scale:.2f}):", file=sys.stderr)
    for name, (per_step, per_image) in rows.items():
        train = per_step * scale * budget.steps
        score = scale * (per_image[64] * (budget.eval_captions + budget.binding_captions)
                         + per_image.get(128, 0.0) * budget.eval_captions)
        total += len(args.seeds) * (train + score)
        print(f"{name:22s} train {train / 60:6.1f} min  score {score / 60:5.1f} min  per run", file=sys.stderr)
    print(f"the table ({len(args.seeds)} seeds x {len(rows)} variants): {total / 3600:.1f} h", file=sys.stderr)


def without_jobs(argv: list[str]) -> list[str]:
    """argv less its `--jobs N` / `--jobs=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--jobs":
            skip = True
        elif not a.startswith("--jobs="):
            out.append(a)
    return out


def run_jobs(argv: list[str], jobs: int) -> int:
    """`jobs` copies of this command, each with one BLAS thread, sharing the table through the run
    locks. MLX's CPU kernels other than matmul run on one thread, so on a small CPU two one-thread
    processes train ~1.8x the steps per second of one process using every core (docs/ablations.md)."""
    package_root = str(Path(__file__).resolve().parents[2])  # a checkout runs without installing
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    worker = [sys.executable, "-m", "tiny_imagegen", "ablate", *argv, "--jobs", "1", "--no-report"]
    procs = []
    for k in range(jobs):
        procs.append(subprocess.Popen(worker, env=env))
        time.sleep(5)  # the first takes the shipped recipe's run (the budget check) and encodes the pool
    return max(p.wait() for p in procs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run only this variant (repeatable); see --list")
    p.add_argument("--seeds", type=int, nargs="+", default=list(ab.SEEDS))
    p.add_argument("--budget-steps", type=int, default=None, help=f"training steps per run (default {ab.Budget.steps})")
    p.add_argument("--results", default=None, help=f"results file (default {DEFAULT_RESULTS}; with --smoke "
                                                    "runs/ablations-smoke/results.json)")
    p.add_argument("--work", default=None, help="checkpoints, loss logs and the encoded pool (default runs/ablations)")
    p.add_argument("--weights", default="weights/tiny-shapes", help="the shipped model: its VAE and tokenizer")
    p.add_argument("--smoke", action="store_true", help="a few steps per variant and a handful of captions (CI)")
    p.add_argument("--table", action="store_true", help="only rewrite table.md and grid.png from the results file")
    p.add_argument("--list", action="store_true", help="print the variants and their parameter counts")
    p.add_argument("--time-steps", type=int, default=0, metavar="N", help="time N training steps of every variant")
    p.add_argument("--no-budget-check", dest="budget_check", action="store_false")
    p.add_argument("--jobs", type=int, default=1, help="processes training runs side by side (one BLAS thread each)")
    p.add_argument("--no-report", dest="report", action="store_false", help=argparse.SUPPRESS)  # --jobs workers
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")

    budget = ab.SMOKE if args.smoke else ab.Budget()
    if args.smoke:
        args.budget_check = False  # a few steps reach nothing: the smoke run tests the runner, not the budget
    if args.budget_steps is not None:
        if args.budget_steps < 1:
            p.error("--budget-steps must be at least 1")
        budget = replace(budget, steps=args.budget_steps)
    smoke_dir = Path("runs/ablations-smoke")
    results = Path(args.results or (smoke_dir / "results.json" if args.smoke else DEFAULT_RESULTS))
    work = Path(args.work or (smoke_dir if args.smoke else "runs/ablations"))
    if args.only:
        try:
            ab.plan_runs(args.only)
        except ValueError as e:
            p.error(str(e))
    if not (Path(args.weights) / "model.json").is_file():
        p.error(f"--weights {args.weights} is not the shipped tiny-shapes folder (its VAE encodes the data)")

    counts = ab.check_parameters(verbose=args.time_steps > 0)
    if args.list:
        for name, v in ab.VARIANTS.items():
            print(f"{name:22s} {counts[name]:>10,d}  {v.objective:4s}  {v.description}")
        return 0
    if args.time_steps:
        time_steps(args, budget, work, args.time_steps)
        return 0
    command = "python examples/ablate.py" + (" --smoke" if args.smoke else "") + (
        f" --budget-steps {budget.steps}" if args.budget_steps is not None else "")  # the table's, not this sitting's
    if args.jobs > 1 and not args.table:
        status = run_jobs(without_jobs(argv), args.jobs)
    else:
        status = 0 if args.table else run_table(args, budget, results, work, command)
    if args.report:
        print(write_report(results, budget, command))
    return status
