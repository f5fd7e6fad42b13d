"""The stored fixtures are shown to come from the PyTorch reference: regenerate and compare.

Each maker runs in a fresh process without LD_PRELOAD (see make_fixtures.py), so the check gives
the same answer whether or not the test process preloads OpenBLAS."""

import subprocess
import sys

import pytest

from conftest import TESTS, require_modules, require_reference_stack

sys.path.insert(0, str(TESTS))
import make_fixtures  # noqa: E402


@pytest.mark.parametrize("name", make_fixtures.modules())
def test_fixtures_reproduce(name):
    require_reference_stack()
    require_modules(*make_fixtures.requirements(name))
    r = subprocess.run([sys.executable, str(TESTS / "make_fixtures.py"), "--check", name], capture_output=True,
                       text=True, env=make_fixtures.without_preload(), timeout=900)
    report = [line for line in r.stdout.splitlines() if line.startswith((name, "  "))]
    print("\n".join(report))
    assert r.returncode == 0, f"{name}: stored fixtures differ from the reference:\n{r.stdout}\n{r.stderr[-3000:]}"
