"""The editing flags as users run them (examples/generate.py on the shipped tiny-shapes model, a
FLUX.1-family model that inpaints): --image / --mask / --ref are distinct, each refused in one
line by a family that lacks it, before any model is loaded; the PNG records each input's sha256 and
--config-from-metadata refuses to replay when an input is missing or changed."""

import json

import numpy as np
import pytest
from PIL import Image

from test_generate_cli import generate
from tiny_imagegen.checkpoints.safetensors_io import file_sha256


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "scene.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 32:] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.new("L", (64, 64), 0).save(d / "black.png")
    Image.new("L", (64, 64), 255).save(d / "white.png")
    Image.new("L", (32, 48), 255).save(d / "small.png")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(d / "red.png")
    Image.new("RGB", (2048, 1536)).save(d / "big.png")
    return d


def test_inpaint_writes_hashes_and_replays_only_unchanged_inputs(files, tmp_path):
    scene = tmp_path / "scene.png"
    scene.write_bytes((files / "scene.png").read_bytes())
    out = tmp_path / "out.png"
    r = generate("--image", scene, "--mask", files / "mask.png", "--strength", 0.8, "--steps", 4, "--seed", 1,
                 "--output", out)
    assert r.returncode == 0, r.stderr
    meta = Image.open(out).text
    assert meta["image"] == str(scene) and meta["image_sha256"] == file_sha256(scene)
    assert meta["mask_sha256"] == file_sha256(files / "mask.png") and meta["strength"] == "0.8"
    assert Image.open(out).size == (64, 64)  # the init image's size
    again = tmp_path / "again.png"
    r = generate("--config-from-metadata", out, "--output", again)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    scene.write_bytes(scene.read_bytes() + b"x")  # changed: refused, with both hashes
    r = generate("--config-from-metadata", out, "--output", tmp_path / "x.png")
    print(r.stderr)
    assert r.returncode == 2 and "has changed since" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    scene.unlink()  # missing: refused
    r = generate("--config-from-metadata", out, "--output", tmp_path / "x.png")
    print(r.stderr)
    assert r.returncode == 2 and "is missing" in r.stderr and not (tmp_path / "x.png").exists()
    # given anew, the stored file is not needed
    r = generate("--config-from-metadata", out, "--image", files / "scene.png", "--output", tmp_path / "y.png")
    assert r.returncode == 0, r.stderr


BAD = {
    "mask without image": (["--mask", "mask.png"], "--mask needs --image"),
    "mask of another size": (["--image", "scene.png", "--mask", "small.png"], "is 32x48 but --image"),
    "coloured mask": (["--image", "scene.png", "--mask", "red.png"], "has colours"),
    "all-black mask": (["--image", "scene.png", "--mask", "black.png"], "all black: nothing to repaint"),
    "reference on flux1": (["--ref", "scene.png"], "takes no reference images"),
    "klein init image": (["--model", "flux2-klein-4b", "--image", "scene.png"],
                         "has no image-to-image here; it inpaints (add --mask) and edits from reference images"),
    "too many references": (["--model", "flux2-klein-4b", *["--ref", "scene.png"] * 11], "at most 10 reference"),
    "tiny reference": (["--model", "flux2-klein-4b", "--ref", "small.png"], "both sides must be at least 64 px"),
    "z-image reference": (["--model", "z-image-turbo", "--ref", "scene.png"], "takes no reference images"),
    "kontext mask": (["--model", "flux1-kontext-dev", "--image", "scene.png", "--mask", "mask.png"], "no inpainting"),
    "kontext two references": (["--model", "kontext", "--ref", "scene.png", "--ref", "scene.png"], "at most 1 reference"),
    "dit image": (["--model", "dit-xl-2-256", "--class-label", "1", "--image", "scene.png"], "no image-to-image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_edit_input_is_one_line_before_loading(files, tmp_path, case):
    """Refused before any model is loaded: the klein / Z-Image / DiT weights are not here at all."""
    extra, message = BAD[case]
    args = [files / a if str(a).endswith(".png") else a for a in extra]
    if "--class-label" not in extra and "--model" in extra:
        args += ["--prompt", "a cat"]
    r = generate(*args, "--output", tmp_path / "out.png", "--steps", 1)
    print(r.stderr)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_all_white_mask_and_huge_reference_are_stated(files, tmp_path):
    r = generate("--image", files / "scene.png", "--mask", files / "white.png", "--steps", 1,
                 "--output", tmp_path / "o.png")
    assert r.returncode == 0 and "all white: everything is repainted" in r.stderr, r.stderr
    r = generate("--model", "flux2-klein-4b", "--prompt", "a cat", "--ref", files / "big.png", "--output", tmp_path / "k.png")
    print(r.stderr)
    assert "big.png is 2048x1536: resized to about 1024x1024" in r.stderr  # then the model is not here: exit 2
    assert r.returncode == 2 and not (tmp_path / "k.png").exists()


def test_references_are_listed_in_metadata_keys():
    from tiny_imagegen.commands.metadata import INPUT_FILES
    from tiny_imagegen.commands.validation import REPLAYED, replay_values

    assert REPLAYED["references"] == "ref" and replay_values({"references": '["a.png"]'}) == {"ref": ["a.png"]}
    assert set(INPUT_FILES) == {"image", "mask", "ref"}
    assert json.loads(json.dumps(["a", "b"])) == ["a", "b"]
