"""Fixture makers: one module per model family, each with `make(out: Path)` (see make_fixtures.py)."""
