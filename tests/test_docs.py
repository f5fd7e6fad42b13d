"""The README is the front door and docs/ holds the rest: every relative link and anchor resolves,
the README stays short, and the `generate` flags table in docs/cli.md lists exactly the parser's flags."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_MAX_LINES = 300


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    in_code = False
    for line in markdown.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def relative_links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links((ROOT / "README.md").read_text())}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_readme_is_a_front_door():
    n = len((ROOT / "README.md").read_text().split("\n"))
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}: move the detail to docs/)"


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Title\n[ok](#title) [bad](#nothing) [gone](missing.md)\n```\n[code](ignored.md)\n```\n")
    links = relative_links(page.read_text())
    assert links == ["#title", "#nothing", "missing.md"]
    assert "title" in anchors(page.read_text()) and "nothing" not in anchors(page.read_text())


def test_cli_flags_table_matches_the_parser():
    """docs/cli.md's `generate` table names every flag of the parser, and no flag it lacks."""
    from tiny_imagegen.commands.generate import build_parser

    parser_flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")}
    parser_flags -= {"--help", "--version"}
    table = (ROOT / "docs" / "cli.md").read_text().split("| `generate` flag |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"`(--[a-z0-9-]+)", table))
    assert parser_flags - documented == set(), f"flags missing from docs/cli.md: {sorted(parser_flags - documented)}"
    assert documented - parser_flags == set(), f"docs/cli.md names flags the parser lacks: {sorted(documented - parser_flags)}"


def test_import_lines_in_the_docs_work():
    """Every `from tiny_imagegen... import ...` a page shows imports (public paths keep working, or the
    page changes with them)."""
    import importlib

    lines = {line for page in PAGES
             for line in re.findall(r"^\s*(from tiny_imagegen[\w.]* import [\w, ]+)", page.read_text(), flags=re.M)}
    assert lines, "no import lines found: the pattern is wrong"
    broken = []
    for line in sorted(lines):
        module, names = re.match(r"from ([\w.]+) import ([\w, ]+)", line).groups()
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",") if n.strip()):
            if not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    broken.append(line)
    assert not broken, f"import lines in README/docs that fail: {broken}"
