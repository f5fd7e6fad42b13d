"""Imports point down the layers, never back up.

The package reads in the order the data flows and the lecture teaches. Each folder is one layer;
a module may import from its own layer or any layer below it, never from one above (function-level
imports count too: a lazy import is still a dependency). The order is written once, here.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tiny_imagegen"

LAYERS = (  # lowest first; a layer may hold several folders that do not depend on each other
    # the machine (BLAS, where compiling pays), tokenizers, building blocks, the samplers' maths
    ("__init__", "device", "text", "layers", "diffusion"),
    ("models",),  # one file per architecture
    ("checkpoints",),  # published weights -> our modules, our converted format, quantization
    ("registry",),  # every published model once; where its files are (hub, shipped, converted)
    # what a pipeline takes besides noise: prompt -> conditioning as each family's reference does it;
    # input images, masks and the masked sampling that edits and inpaints with them
    ("conditioning", "editing"),
    ("pipelines",),  # encode -> denoise -> decode, shared loop and each family's own parts
    ("train",),  # datasets, trainer, the tiny-shapes recipe, LoRA training, ablations
    # the front ends: the command line, and the optional server that keeps models loaded (it runs the
    # command's own checks and rendering, and the command line starts it)
    ("commands", "serve", "__main__"),
)
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> str:
    """tiny_imagegen.models.mmdit -> models; tiny_imagegen -> __init__; tiny_imagegen.__main__ -> __main__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of the package in `path`, at any depth."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tiny_imagegen"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "tiny_imagegen":
                continue
            if source == "tiny_imagegen":  # `from tiny_imagegen import registry`: the names are the modules
                found += [(node.lineno, f"tiny_imagegen.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, source))
    return found


def upward_imports() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = layer_of(module_name(path)) if path.parent != PACKAGE else path.stem
        for line, target in imported_modules(path):
            there = layer_of(target)
            if target == "tiny_imagegen.__version__" or there == "__version__":
                continue
            if there not in LEVEL:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}, a folder "
                                "with no layer (add it to LAYERS)")
            elif LEVEL[there] > LEVEL[here]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} imports {target} ({there} "
                                "is above it)")
    return problems


def test_every_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert folders | modules <= set(LEVEL), f"not in LAYERS: {sorted((folders | modules) - set(LEVEL))}"
    assert modules == {"__init__", "__main__"}, f"loose modules at the package root: {sorted(modules)}"


def test_no_import_runs_back_up():
    problems = upward_imports()
    assert not problems, "imports that run back up:\n" + "\n".join(problems)


@pytest.mark.parametrize("source,target", [("models", "pipelines"), ("checkpoints", "registry"),
                                           ("train", "commands")])
def test_the_check_sees_an_upward_import(tmp_path, monkeypatch, source, target):
    """The check itself: a planted upward import (at function level) is reported."""
    root = tmp_path / "tiny_imagegen"
    for name in {source, target}:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / source / "bad.py").write_text(f"def f():\n    from ..{target} import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", root)
    problems = upward_imports()
    assert len(problems) == 1 and f"{source} imports tiny_imagegen.{target}" in problems[0], problems
