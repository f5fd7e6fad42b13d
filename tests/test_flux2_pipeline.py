"""The FLUX.2 klein pipeline against diffusers' Flux2KleinPipeline end to end (fixtures:
tests/reference/flux2_pipeline.py): a tiny random-weight repo folder (Qwen3 28 layers + our
Qwen tokenizer, transformer, VAE with BN statistics), loaded by our code; the same noise; two
prompts at 48x32 pixels. Distilled (4 steps, one pass) and base (CFG 4.0 against "", 3 steps),
fp32 and bf16; converted folder, quantize-on-load, the registry entries and hub errors."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, fixture_path, load_fixture, relative_l2
from test_hub import FakeHub, serve  # noqa: F401  (serve: the fake-hub fixture)
from tiny_imagegen import registry
from tiny_imagegen.registry.hub import ModelNotAvailable, download_command, resolve_model
from tiny_imagegen.pipelines.pipeline import Pipeline

PROMPTS = ["a red cat", "two cats on the moon, 8k"]
SETTINGS = {"distilled": dict(steps=4, guidance=1.0), "base": dict(steps=3, guidance=4.0)}
# bf16: ours and torch's each differ from the fp32 reference; ours may be at most this many times
# further (relative L2 of the final latents; measured 0.97 distilled, 0.96 base)
BF16_FACTOR = 1.2
# and the images at most this many uint8 levels from torch's bf16 images (measured 15 and 32: bf16
# roundings compound over the steps; torch's own images move by up to 24 levels between CPUs)
BF16_PIXEL_LEVELS = 48


@pytest.fixture(scope="module")
def io():
    return load_fixture("flux2_pipeline", "io.safetensors")


def repo(tmp_path, setting: str):
    """The fixture repo; the base setting is the same weights with is_distilled false."""
    folder = fixture_path("flux2_pipeline", "repo")
    if setting == "distilled":
        return folder
    copy = tmp_path / "base"
    shutil.copytree(folder, copy)
    index = copy / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "is_distilled": False}))
    return copy


def generate(folder, io, setting, dtype=mx.float32, options=None, **kw):
    pipe = Pipeline.from_pretrained(str(folder), dtype=dtype, **kw)
    images = pipe.generate(PROMPTS, width=48, height=32, latents=io["noise"], **SETTINGS[setting], **(options or {}))
    z = pipe.vae.from_latents(pipe.last_latents.astype(dtype))  # as output_type="latent": BN undone, unpatchified
    return pipe, np.stack([np.asarray(im) for im in images]), z


@pytest.mark.parametrize("setting, batch_cfg", [("distilled", True), ("base", True), ("base", False)])
def test_pipeline_matches_diffusers_fp32(tmp_path, io, setting, batch_cfg):
    """The base setting's CFG both ways: [pos; neg] in one forward, and a second forward
    (`batch_cfg=False`, the path a memory-bound user takes)."""
    pipe, pixels, z = generate(repo(tmp_path, setting), io, setting, options={"batch_cfg": batch_cfg})
    assert pipe.family == "flux2" and pipe.distilled == (setting == "distilled")
    assert pipe.uses_negative(SETTINGS[setting]["guidance"], {}) == (setting == "base")
    name = f"flux2 pipeline {setting} (batch_cfg={batch_cfg})"
    assert_close(f"{name} final latents", z, io[f"{setting}.latents"], atol=2e-5)
    assert_close(f"{name} uint8 pixels", pixels.astype(np.float32), io[f"{setting}.pixels"], atol=1)


@pytest.mark.parametrize("setting", ["distilled", "base"])
def test_pipeline_bf16_within_torch_bf16(tmp_path, io, setting):
    """The bf16 traps reproduced (t·1000 rounded to bf16, dt * v in bf16, bf16 latents between
    steps, CFG in bf16): ours is no further from the fp32 reference than BF16_FACTOR x torch's."""
    pipe, pixels, z = generate(repo(tmp_path, setting), io, setting, dtype=mx.bfloat16)
    assert pipe.last_latents.dtype == mx.bfloat16
    ref, torch_bf16 = io[f"{setting}.latents"], io[f"{setting}.latents_bf16"]
    ours_err, torch_err = relative_l2(z, ref), relative_l2(torch_bf16, ref)
    print(f"[bf16] flux2 pipeline {setting}: ours {ours_err:.3e}, torch bf16 {torch_err:.3e} (allowed {BF16_FACTOR} x)")
    assert ours_err <= BF16_FACTOR * torch_err
    pixel_gap = np.abs(pixels.astype(np.float32) - np.array(io[f"{setting}.pixels_bf16"])).max()
    print(f"[bf16] flux2 pipeline {setting}: max pixel difference to torch bf16 {pixel_gap:.0f} levels "
          f"(allowed {BF16_PIXEL_LEVELS})")
    assert pixel_gap <= BF16_PIXEL_LEVELS


def test_converted_folder_gives_the_same_image(tmp_path, io):
    from tiny_imagegen.registry.convert import convert
    from tiny_imagegen.checkpoints.convert import read_manifest

    out = convert(fixture_path("flux2_pipeline", "repo"), tmp_path / "klein-fp32", dtype=mx.float32)
    manifest = read_manifest(out)
    assert sorted(manifest["components"]) == ["flux2_transformer", "flux2_vae", "qwen3"]
    assert manifest["pipeline"] == {"family": "flux2", "is_distilled": True}
    _, direct, _ = generate(fixture_path("flux2_pipeline", "repo"), io, "distilled")
    _, converted, _ = generate(out, io, "distilled")
    assert np.array_equal(direct, converted)


def test_quantize_on_load_runs(io):
    pipe, pixels, _ = generate(fixture_path("flux2_pipeline", "repo"), io, "distilled", quantize=8)
    assert pixels.shape == (2, 32, 48, 3)


def test_image_to_image_is_refused_clearly(io):
    """klein edits from references (--ref) and inpaints (--image with --mask): an init image alone
    is refused in one line, before any work (the command asks the class, before loading)."""
    pipe = Pipeline.from_pretrained(str(fixture_path("flux2_pipeline", "repo")), dtype=mx.float32)
    assert not pipe.img2img and pipe.inpaint and pipe.max_references
    with pytest.raises(ValueError, match="no image-to-image.*--mask.*--ref") as e:
        pipe.generate(PROMPTS[:1], width=48, height=32, image=object())  # refused before it is read
    print(e.value)


def test_registry_entries():
    klein4, klein9 = registry.find("klein"), registry.find("flux2-klein-9b")
    assert klein4.name == "flux2-klein-4b" and klein4.repo_id == "black-forest-labs/FLUX.2-klein-4B"
    assert not klein4.gated and klein4.licence == "Apache-2.0" and klein4.defaults.steps == 4
    assert klein9.gated and "Non-Commercial" in klein9.licence
    assert registry.FAMILIES["flux2"].hub_folders() == ("transformer", "vae", "text_encoder", "tokenizer")


def test_offline_without_cache_prints_the_download_command(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailable) as e:
        resolve_model("flux2-klein-4b", cache_dir=tmp_path)
    message = str(e.value)
    print(message)
    assert download_command("black-forest-labs/FLUX.2-klein-4B") in message and "\n" not in message
    assert "text_encoder/*.safetensors" in message and "tokenizer/*" in message


def test_gated_9b_says_it_is_non_commercial(tmp_path, serve):
    serve(FakeHub("black-forest-labs/FLUX.2-klein-9B", {"model_index.json": b"{}"}, gated=True))
    with pytest.raises(ModelNotAvailable) as e:
        resolve_model("flux2-klein-9b", cache_dir=tmp_path / "cache")
    message = str(e.value)
    print(message)
    assert "FLUX.2-klein-9B is gated" in message and "non-commercial" in message and "hf auth login" in message
