"""A real install: the wheel carries the package and the shipped model, and `tiny-imagegen` works
from any folder after installing it into a fresh venv, offline."""

import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "tiny_imagegen").rglob("__init__.py")}
    assert set(config["packages"]) == found | {"tiny_imagegen.weights"}
    assert config["package-dir"]["tiny_imagegen.weights"] == "weights"


def test_wheel_installs_and_generates_from_another_folder(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("tiny_imagegen-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                        "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # The runtime dependencies (mlx, numpy, ...) come from this environment; the package itself
    # only from the wheel: the checkout is nowhere on the fresh venv's path.
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.check_output([str(python), "-c", "import tiny_imagegen; print(tiny_imagegen.__file__)"],
                                    text=True, cwd=elsewhere).strip()
    assert Path(where).is_relative_to(venv), where

    command = venv / "bin" / "tiny-imagegen"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([str(command), "generate", "--prompt", "a red circle", "--seed", "0", "--output", "circle.png"],
                       capture_output=True, text=True, cwd=elsewhere, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    image = Image.open(elsewhere / "circle.png")
    assert image.size == (64, 64) and image.text["model"] == "tiny-shapes"
    from tiny_imagegen.train.scene_parser import parse_image

    objects = parse_image(np.asarray(image.convert("RGB")))
    assert [(o.colour, o.shape) for o in objects] == [("red", "circle")], objects
    r = subprocess.run([str(command), "--version"], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0 and r.stdout.startswith("tiny_imagegen ")
