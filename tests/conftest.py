"""Shared test helpers: fixture loading and the parity check that prints its max abs error."""

import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
sys.path.insert(0, str(TESTS.parent))  # run from a checkout without installing the package

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


def pytest_terminal_summary(terminalreporter):
    if _PARITY:
        terminalreporter.section("parity against the PyTorch reference (max abs error)")
        for name, err, bound in _PARITY:
            mark = "ok " if err <= bound else "FAIL"
            terminalreporter.write_line(f"{mark} {err:10.3e}  <= {bound:7.1e}  {name}")
