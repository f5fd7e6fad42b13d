"""Make the reference fixtures from the PyTorch code (diffusers / transformers).

Each module in tests/reference/ has a `make(out: Path)` that builds reference modules from small
configs with seeded random weights, runs them on seeded inputs and writes weights, inputs and
outputs under `out`. The MLX tests read those files, so they run without torch.

    python tests/make_fixtures.py              # (re)write tests/fixtures/
    python tests/make_fixtures.py --check      # regenerate in a temp dir, compare with the stored ones
    python tests/make_fixtures.py vae t5       # only these modules

CI runs the check (tests/test_fixtures_reproduce.py): the stored outputs come from the reference.

The fixtures are always made without LD_PRELOAD: a preloaded OpenBLAS (README, for MLX's speed)
also takes over torch's BLAS calls and moves its outputs by ~5e-6, so the script re-executes
itself without it.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

# Weights and inputs come from seeded generators and must agree exactly. Outputs are recomputed
# by torch's float kernels, which are chosen per CPU (AVX2 / AVX-512, SLEEF sin/cos): the same
# fixture made on two x86-64 machines differed by up to 2.9e-5 (the timestep sinusoid, whose
# arguments reach 1000 rad, where one float32 ulp of the argument is 6.1e-5; a third, an AMD EPYC,
# by 5.9e-5 there) and 2.3e-5 on transformer outputs of |2.6| (9e-6 of it). So outputs agree to
# the tests' own tolerance: 2e-5 of max(1, max |value|) (test_mmdit's, for one call of a model;
# measured here against the stored files: 8.7e-6), and the sinusoid tables ("timestep.emb") to the
# 6e-5 their tests allow. Tensors whose name contains "bf16" are torch's bfloat16 results, where one
# kernel's different rounding moves an element by a bf16 ulp (2^-8 relative) and layers compound
# it: they agree to 3e-2 of max |value|. 8-bit images (names ending in "pixels") agree to one
# level, a value on a rounding edge; in bf16 to PIXEL_BF16_LEVELS (16 measured on the EPYC after
# four sampling steps and the VAE; a wrong model moves pixels by far more than a tenth of 255).
OUTPUT_RTOL = 2e-5
SINUSOID_ATOL = 6e-5  # test_mmdit / test_dit / test_zimage: the timestep sinusoid's arguments reach 1000 rad
BF16_RTOL = 3e-2
PIXEL_LEVELS, PIXEL_BF16_LEVELS = 1.0, 24.0


def modules() -> list[str]:
    return sorted(p.stem for p in (TESTS / "reference").glob("*.py") if not p.stem.startswith("_"))


def requirements(name: str) -> tuple[str, ...]:
    """Packages a maker needs beyond torch/diffusers/transformers (its REQUIRES), read without importing it."""
    import ast

    tree = ast.parse((TESTS / "reference" / f"{name}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "REQUIRES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return ()


def make(name: str, out: Path) -> None:
    importlib.import_module(f"reference.{name}").make(out)


def compare_trees(made: Path, stored: Path, name: str | None = None) -> list[str]:
    """Differences between a freshly made fixture tree and the stored one (empty when equal).
    Both ways: a made file that is not stored, and (with the maker's `name`: each maker writes
    under out/<name>/) a stored file under <name>/ that the maker no longer writes."""
    problems = []
    if name is not None:
        fresh = {p.relative_to(made) for p in (made / name).rglob("*") if p.is_file()}
        problems += [f"{rel}: stored, but {name}.py does not make it" for rel in
                     sorted(p.relative_to(stored) for p in (stored / name).rglob("*") if p.is_file())
                     if rel not in fresh]
    for new in sorted(p for p in made.rglob("*") if p.is_file()):
        rel = new.relative_to(made)
        old = stored / rel
        if not old.exists():
            problems.append(f"{rel}: not stored")
        elif new.suffix == ".safetensors":
            problems += [f"{rel}: {p}" for p in _compare_tensors(new, old)]
        elif new.suffix == ".json":
            if json.loads(new.read_text()) != json.loads(old.read_text()):
                problems.append(f"{rel}: json differs")
        elif new.read_bytes() != old.read_bytes():
            problems.append(f"{rel}: bytes differ")
    return problems


def _compare_tensors(new: Path, old: Path) -> list[str]:
    from safetensors.numpy import load_file

    a, b = load_file(str(new)), load_file(str(old))
    if set(a) != set(b):
        return [f"keys differ: {sorted(set(a) ^ set(b))[:5]}"]
    problems = []
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{k}: {x.shape} {x.dtype} vs stored {y.shape} {y.dtype}")
        elif np.issubdtype(x.dtype, np.floating):
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            err = float(np.max(np.abs(x64 - y64))) if x.size else 0.0
            if k.endswith("pixels") or k.endswith("pixels_bf16"):
                allowed = PIXEL_BF16_LEVELS if "bf16" in k else PIXEL_LEVELS
            elif k.endswith("timestep.emb"):
                allowed = SINUSOID_ATOL
            else:
                allowed = (BF16_RTOL if "bf16" in k else OUTPUT_RTOL) * max(1.0, float(np.max(np.abs(y64))))
            if err > allowed:
                problems.append(f"{k}: max abs difference {err:.2e}")
        elif not np.array_equal(x, y):
            problems.append(f"{k}: values differ")
    return problems


def without_preload() -> dict[str, str]:
    """The environment without OpenBLAS: neither preloaded nor loaded by `import tiny_imagegen` (blas.py),
    so that no BLAS but torch's own is in the reference process."""
    return {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, "TINY_IMAGEGEN_BLAS": "off"}


def main() -> int:
    if "LD_PRELOAD" in os.environ:
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], without_preload())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"modules to run (default all: {', '.join(modules())})")
    parser.add_argument("--check", action="store_true", help="compare with the stored fixtures, write nothing")
    args = parser.parse_args()
    names = args.names or modules()
    if not args.check:
        for name in names:
            print(f"making {name} ...", flush=True)
            make(name, FIXTURES)
        return 0
    failed = False
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            make(name, Path(tmp))
            problems = compare_trees(Path(tmp), FIXTURES, name)
        print(f"{name}: {'reproduced' if not problems else 'DIFFERS'}")
        for p in problems:
            print(f"  {p}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
