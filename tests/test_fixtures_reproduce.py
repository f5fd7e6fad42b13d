"""The stored fixtures are shown to come from the PyTorch reference: regenerate and compare."""

import sys
import tempfile
from pathlib import Path

import pytest

from conftest import FIXTURES, TESTS, require_reference_stack

sys.path.insert(0, str(TESTS))
import make_fixtures  # noqa: E402


@pytest.mark.parametrize("name", make_fixtures.modules())
def test_fixtures_reproduce(name):
    require_reference_stack()
    with tempfile.TemporaryDirectory() as tmp:
        make_fixtures.make(name, Path(tmp))
        problems = make_fixtures.compare_trees(Path(tmp), FIXTURES)
    assert not problems, f"{name}: stored fixtures differ from the reference:\n" + "\n".join(problems)
