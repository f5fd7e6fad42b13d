"""examples/generate.py, run as users run it: output with metadata, and one clear line for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from test_pipeline import hub_folder

ROOT = Path(__file__).resolve().parents[1]


def generate(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return hub_folder(tmp_path_factory.mktemp("hub"), "dev_like")


def test_writes_png_with_parameters(model, tmp_path):
    out = tmp_path / "cat.png"
    r = generate("--model", model, "--prompt", "a cat", "--width", 48, "--height", 32, "--steps", 2,
                 "--seed", 7, "--output", out)
    assert r.returncode == 0, r.stderr
    assert "denoising [" in r.stderr and "s/step" in r.stderr
    meta = Image.open(out).text
    assert meta["prompt"] == "a cat" and meta["seed"] == "7" and meta["steps"] == "2"
    assert meta["width"] == "48" and meta["height"] == "32" and meta["guidance"] == "3.5"
    assert meta["model"] and meta["quantization"] == "none" and meta["software"].startswith("tiny_imagegen")
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]  # no temporary file left behind


def test_several_images_are_numbered(model, tmp_path):
    r = generate("--model", model, "--prompt", "a cat", "--width", 32, "--height", 32, "--steps", 1,
                 "--seed", 1, "--n-images", 2, "--output", tmp_path / "img-{seed}.png")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img-2.png"]


BAD = {
    "width not a multiple of 16": (["--width", 40], "--width 40: must be a multiple of 16"),
    "absurd size": (["--height", 100000], "--height 100000: must be a multiple of 16 between 16 and 4096"),
    "empty prompt": (["--prompt", "  "], "--prompt is empty"),
    "unknown model": (["--model", "flux3-turbo"], "unknown model 'flux3-turbo'"),
    "non-image init": (["--image", Path(__file__)], "not a readable image"),
    "missing init": (["--image", "/nonexistent.png"], "no such file"),
    "bad strength": (["--strength", "1.5"], "--strength must be in (0, 1]"),
    "output folder missing": (["--output", "/nonexistent/dir/x.png"], "folder /nonexistent/dir does not exist"),
    "not png": (["--output", "x.jpg"], "use a .png name"),
    "float16": (["--dtype", "float16"], "cannot run in float16: its residual stream overflows float16"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(model, tmp_path, case):
    extra, message = BAD[case]
    args = {"--model": model, "--prompt": "a cat", "--output": tmp_path / "out.png", "--steps": 1,
            "--width": 32, "--height": 32}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    r = generate(*[x for kv in args.items() for x in kv])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_existing_output_is_not_overwritten(model, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    r = generate("--model", model, "--prompt", "a cat", "--output", out, "--steps", 1, "--width", 32, "--height", 32)
    assert r.returncode == 2 and "exists" in r.stderr
    assert out.read_bytes() == b"precious"


def test_unwritable_output_folder(model, tmp_path):
    # /sys refuses new files even to root (CI runs as root, where permission bits would not stop it)
    r = generate("--model", model, "--prompt", "a cat", "--output", "/sys/x.png")
    assert r.returncode == 2 and "folder /sys is not writable" in r.stderr, r.stderr


def test_weights_with_a_missing_key(model, tmp_path):
    import mlx.core as mx

    broken = hub_folder(tmp_path, "dev_like")
    f = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = dict(mx.load(str(f)))
    del tensors["proj_out.weight"]
    mx.save_safetensors(str(f), tensors)
    r = generate("--model", broken, "--prompt", "a cat", "--output", tmp_path / "o.png", "--steps", 1)
    assert r.returncode == 2 and "missing" in r.stderr and "proj_out.weight" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.png").exists()


def test_truncated_weights(model, tmp_path):
    broken = hub_folder(tmp_path, "dev_like")
    f = broken / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    r = generate("--model", broken, "--prompt", "a cat", "--output", tmp_path / "o.png", "--steps", 1)
    assert r.returncode == 2 and "diffusion_pytorch_model.safetensors" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.png").exists()


def test_readme_first_example_draws_a_red_circle(tmp_path):
    """The README's first command, on the shipped model (the default), offline; the parser must
    find a red circle in the PNG (a fixed seed here: the command's own default seed is random)."""
    from tiny_imagegen.train.scene_parser import parse_image

    r = generate("--prompt", "a red circle", "--seed", 0, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    image = Image.open(tmp_path / "out.png")
    assert image.size == (64, 64) and image.text["model"] == "tiny-shapes" and image.text["prompt"] == "a red circle"
    assert ("red", "circle") in [(f.colour, f.shape) for f in parse_image(image)]
