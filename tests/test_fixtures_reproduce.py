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


def test_every_fixture_folder_has_a_maker():
    """Each maker writes under fixtures/<its name>/ (the check above compares that folder both ways:
    made but not stored, stored but not made); a folder or file outside them has no maker at all."""
    stray = sorted(p.name for p in TESTS.joinpath("fixtures").iterdir() if p.name not in make_fixtures.modules())
    assert not stray, f"tests/fixtures/{stray[0]} has no maker in tests/reference/ (of {stray})"


def test_compare_trees_sees_both_directions(tmp_path):
    made, stored = tmp_path / "made", tmp_path / "stored"
    for root, files in ((made, ("a.json", "new.json")), (stored, ("a.json", "old.json"))):
        (root / "m").mkdir(parents=True)
        for f in files:
            (root / "m" / f).write_text("{}")
    problems = make_fixtures.compare_trees(made, stored, "m")
    assert sorted(problems) == ["m/new.json: not stored", "m/old.json: stored, but m.py does not make it"]
