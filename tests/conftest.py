"""Shared test helpers: fixture loading and the parity check that prints its max abs error."""

import os
import sys
from pathlib import Path

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
sys.path.insert(0, str(TESTS.parent))  # run from a checkout without installing the package

import tiny_imagegen  # noqa: E402,F401  (before MLX: it chooses MLX's BLAS, blas.py)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

_PARITY: list[tuple[str, float, float]] = []


def fixture_path(*parts: str) -> Path:
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"fixture {path} is missing: run `python tests/make_fixtures.py`")
    return path


def load_fixture(*parts: str) -> dict[str, mx.array]:
    """The tensors of one fixture file (safetensors), as MLX arrays."""
    return mx.load(str(fixture_path(*parts)))


def require_reference_stack():
    """Skip where torch/diffusers/transformers are absent, but never in CI (CI=true)."""
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the PyTorch reference stack is missing: {e}")
        pytest.skip(f"PyTorch reference stack not installed: {e}")


def require_modules(*names: str):
    """Skip where an extra reference package (e.g. peft) is absent, but never in CI (CI=true)."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {', '.join(missing)} missing (requirements-dev.txt)")
        pytest.skip(f"not installed: {', '.join(missing)}")


def assert_close(name: str, ours, ref, atol: float, rtol: float = 0.0):
    """Compare ours with the reference, print and record the max abs error, then assert."""
    ours = np.asarray(ours.astype(mx.float32) if isinstance(ours, mx.array) else ours, np.float64)
    ref = np.asarray(ref.astype(mx.float32) if isinstance(ref, mx.array) else ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    bound = atol + rtol * float(np.max(np.abs(ref)))
    _PARITY.append((name, err, bound))
    print(f"[parity] {name}: max abs error {err:.3e} (allowed {bound:.1e})")
    assert err <= bound, f"{name}: max abs error {err:.3e} exceeds {bound:.1e}"


def relative_l2(x, ref) -> float:
    """||x - ref|| / ||ref||, in float64."""
    x = np.asarray(x.astype(mx.float32) if isinstance(x, mx.array) else x, np.float64)
    ref = np.asarray(ref.astype(mx.float32) if isinstance(ref, mx.array) else ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_bf16_parity(name: str, ours, ref_fp32, torch_bf16, factor: float = 2.0):
    """The bfloat16 rule: ours returns bf16 and is no further from the fp32 reference than
    torch's own bf16 run of the same weights and inputs is, within `factor` (relative L2). Each
    model's tests pass the factor measured for it (BF16_FACTOR, 1.2 to 1.45): the default 2 is too
    loose to notice much; a lost float32 island shows in test_bf16_islands.py."""
    assert isinstance(ours, mx.array) and ours.dtype == mx.bfloat16, (
        f"{name}: returned {getattr(ours, 'dtype', type(ours))}, expected bfloat16")
    ours_err, torch_err = relative_l2(ours, ref_fp32), relative_l2(torch_bf16, ref_fp32)
    bound = factor * torch_err
    _PARITY.append((f"{name} [bf16 rel L2; torch bf16 {torch_err:.2e}]", ours_err, bound))
    print(f"[bf16] {name}: ours {ours_err:.3e}, torch bf16 {torch_err:.3e} (allowed {factor} x)")
    assert ours_err <= bound, f"{name}: bf16 relative L2 {ours_err:.3e} > {factor} x torch's {torch_err:.3e}"


class recording_outputs:
    """Within `with recording_outputs({"name": (parent, index), ...}) as seen:` every listed
    block's output is recorded in `seen[name]` (so a test can check each block's dtype and error).
    parent[index] is the block: a list of blocks and a position, or a module and a child's name."""

    def __init__(self, blocks: dict[str, tuple[list, int]]):
        self.blocks, self.seen = blocks, {}

    def __enter__(self) -> dict:
        for name, (parent, i) in self.blocks.items():
            parent[i] = _Recorder(parent[i], name, self.seen)
        return self.seen

    def __exit__(self, *exc):
        for parent, i in self.blocks.values():
            parent[i] = parent[i].block


class _Recorder:
    def __init__(self, block, name, seen):
        self.block, self.name, self.seen = block, name, seen

    def __call__(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        self.seen[self.name] = out
        return out


def pytest_terminal_summary(terminalreporter):
    if _PARITY:
        terminalreporter.section("parity against the PyTorch reference (max abs error)")
        for name, err, bound in _PARITY:
            mark = "ok " if err <= bound else "FAIL"
            terminalreporter.write_line(f"{mark} {err:10.3e}  <= {bound:7.1e}  {name}")
