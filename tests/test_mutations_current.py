"""tests/mutate.py stays runnable: every planted bug's text stands exactly once in its file, so a
change to the code that moves or rewrites a mutated line is noticed here, not when a contributor
next runs the (slow, not-in-CI) mutation script."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutation_site_exists_once():
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "tests" / "mutate.py")
    mutate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutate)
    mutations = [m for m in vars(mutate).values() if isinstance(m, (list, tuple)) and m
                 and type(m[0]).__name__ == "Mutation"][0]
    stale = [f"{m.id}: its text stands {(ROOT / m.file).read_text().count(m.old)} times in {m.file}"
             for m in mutations if (ROOT / m.file).read_text().count(m.old) != 1]
    assert len(mutations) >= 30 and not stale, "stale mutations (update tests/mutate.py):\n" + "\n".join(stale)
