"""Stable Diffusion 1.5 through our Pipeline against diffusers' StableDiffusionPipeline: the same
tiny random repo (CLIP text + tokenizer, U-Net, SD VAE), the same noise, classifier-free guidance
7.5 with negative prompts, 4 steps of DDIM and of Euler. Plus the converted folder, quantized
loading, the registry entry and what the hub fetches for it.

Fixtures: tests/reference/sd15_pipeline.py (and text_encoders.py for CLIP and its tokenizer)."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, fixture_path, load_fixture
from test_hub import COMMIT, FakeHub, _resolve_in_subprocess, serve  # noqa: F401  (serve is a fixture)
from tiny_imagegen import registry
from tiny_imagegen.registry.hub import download_command, resolve_model
from tiny_imagegen.pipelines.pipeline import Pipeline

PROMPTS = ["a red circle to the left of a blue square", "Ein Café in Tōkyō"]
NEGATIVE = ["blurry", "a green triangle"]


def hub_folder(tmp_path):
    folder = tmp_path / "sd15-tiny"
    shutil.copytree(fixture_path("sd15_pipeline"), folder, ignore=shutil.ignore_patterns("io.safetensors"))
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(fixture_path("text_encoders", "flux", part), folder / part)
    return folder


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def reference_pixels(io, sampler):
    return np.round(np.array(io[f"{sampler}.images"].transpose(0, 2, 3, 1)) * 255).astype(np.int16)


def run(pipe, io, sampler, **kw):
    noise = io["noise"].transpose(0, 2, 3, 1)
    karras = sampler == "euler_karras"
    return pipe.generate(PROMPTS, negative_prompt=NEGATIVE, width=48, height=32, steps=4, guidance=7.5,
                         latents=noise, sampler="euler" if karras else sampler, karras=karras, **kw)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_karras"])
def test_pipeline_matches_diffusers(tmp_path, sampler):
    io = load_fixture("sd15_pipeline", "io.safetensors")
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path)), dtype=mx.float32)
    assert pipe.family == "sd15" and pipe.defaults == registry.find("sd15").defaults
    images = run(pipe, io, sampler)
    ref = io[f"{sampler}.latents"].transpose(0, 2, 3, 1)
    assert_close(f"sd15 pipeline {sampler}: final latents", pipe.last_latents, ref, 0, 1e-5)
    assert_close(f"sd15 pipeline {sampler}: uint8 pixels", pixels(images), reference_pixels(io, sampler), atol=1)


def test_negative_prompt_and_guidance_matter(tmp_path):
    """Not a parity check: the negative prompt and the guidance scale change the result (so the
    parity test above would see a guidance bug), and guidance 1 needs no negative pass."""
    io = load_fixture("sd15_pipeline", "io.safetensors")
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path)), dtype=mx.float32, keep_text_encoders=True)
    base = pixels(run(pipe, io, "ddim"))
    other = pixels(pipe.generate(PROMPTS, negative_prompt="", width=48, height=32, steps=4, guidance=7.5,
                                 latents=io["noise"].transpose(0, 2, 3, 1)))
    assert np.abs(base - other).max() > 0
    assert not pipe.uses_negative(1.0, {}) and pipe.uses_negative(7.5, {})
    unguided = pixels(pipe.generate(PROMPTS, width=48, height=32, steps=4, guidance=1.0,
                                    latents=io["noise"].transpose(0, 2, 3, 1)))
    assert np.abs(base - unguided).max() > 0


def test_converted_folder_gives_the_same_image(tmp_path):
    from tiny_imagegen.registry.convert import convert
    from tiny_imagegen.checkpoints.convert import read_manifest

    io = load_fixture("sd15_pipeline", "io.safetensors")
    folder = hub_folder(tmp_path)
    out = convert(folder, tmp_path / "sd15-converted", dtype=mx.float32)
    manifest = read_manifest(out)
    assert sorted(manifest["components"]) == ["clip", "unet", "vae"] and manifest["pipeline"]["family"] == "sd15"
    converted = Pipeline.from_pretrained(str(out), dtype=mx.float32)
    assert type(converted).__name__ == "SD15Pipeline"
    hub = Pipeline.from_pretrained(str(folder), dtype=mx.float32)
    assert np.array_equal(pixels(run(converted, io, "euler")), pixels(run(hub, io, "euler")))
    assert mx.array_equal(converted.last_latents, hub.last_latents)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_runs(tmp_path, bits):
    io = load_fixture("sd15_pipeline", "io.safetensors")
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path)), dtype=mx.float32, quantize=bits)
    images = run(pipe, io, "ddim")
    diff = np.abs(pixels(images) - reference_pixels(io, "ddim"))
    print(f"[quantization] sd15 tiny {bits}-bit (group 64): max uint8 difference {diff.max()}, mean {diff.mean():.2f}")
    # measured: 8-bit max 1, mean 0.10; 4-bit max 17, mean 2.03 (a wrong group scale or a dropped
    # bias moves pixels by far more)
    most, mean = {8: (2, 0.2), 4: (26, 3.0)}[bits]
    assert diff.max() <= most and diff.mean() <= mean
    assert len(images) == 2 and images[0].size == (48, 32)
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in pipe.transformer.named_modules())


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_image_to_image_matches_diffusers(tmp_path, sampler):
    """StableDiffusionImg2ImgPipeline from the same init latents and noise: the last 3 of 5 steps."""
    io = load_fixture("sd15_pipeline", "io.safetensors")
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path)), dtype=mx.float32)
    cond = pipe.condition(PROMPTS, NEGATIVE, 7.5)
    nhwc = lambda k: io[k].transpose(0, 2, 3, 1)  # noqa: E731
    steps = []
    x = pipe.sample(nhwc("img2img.noise"), cond, steps=5, guidance=7.5, width=48, height=32,
                    init=nhwc("img2img.init"), strength=0.6, sampler=sampler,
                    run=lambda step, x, n: pipe.run_steps(step, x, n, progress=lambda i, n, s: steps.append(i)))
    assert steps == [1, 2, 3]
    assert_close(f"sd15 img2img {sampler}: final latents", x, nhwc(f"img2img.{sampler}.latents"), 0, 1e-5)


def test_image_to_image_runs_the_tail_of_the_schedule(tmp_path):
    from PIL import Image

    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path)), dtype=mx.float32)
    seen = []
    pipe.generate("a cat", width=48, height=32, steps=10, image=Image.new("RGB", (48, 32), "red"), strength=0.6,
                  progress=lambda i, n, s: seen.append(n))
    assert seen == [6] * 6


def test_bad_sampler_and_size_are_named(tmp_path):
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path)), dtype=mx.float32, keep_text_encoders=True)
    with pytest.raises(ValueError, match="unknown sampler 'pndm'"):
        pipe.generate("a cat", width=16, height=16, steps=1, sampler="pndm")
    with pytest.raises(ValueError, match="Karras sigmas are a schedule of the Euler sampler"):
        pipe.generate("a cat", width=16, height=16, steps=1, karras=True)
    with pytest.raises(ValueError, match="width 20 is not a multiple of 8"):
        pipe.generate("a cat", width=20, height=16, steps=1)


# ---- the registry and the hub ----------------------------------------------------------------------

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The repo's files (main, 2024-09; the test needs their shape): weights in three variants and
# two formats, the original single files at the root, a safety checker we do not run.
SD15_FILES = [
    "model_index.json", "scheduler/scheduler_config.json", "README.md", "v1-inference.yaml",
    "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
]
SD15_NEEDED = {
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def test_registry_entry():
    spec = registry.find("sd1.5")
    assert spec.name == "sd15" and spec.repo_id == SD15_REPO and not spec.gated
    assert registry.FAMILIES["sd15"].hub_folders() == ("unet", "vae", "text_encoder", "tokenizer")
    assert registry.family_for_pipeline_class("StableDiffusionPipeline").name == "sd15"
    assert (spec.defaults.width, spec.defaults.height, spec.defaults.guidance) == (512, 512, 7.5)


def test_download_fetches_only_the_needed_files(tmp_path, serve):  # noqa: F811
    folder = hub_folder(tmp_path / "src")
    files = {}
    for name in SD15_FILES:  # real tiny weights where we read them, stand-ins elsewhere
        real = folder / name.replace(".fp16", "").replace(".non_ema", "")
        files[name] = real.read_bytes() if real.is_file() and name.endswith((".json", ".txt", ".safetensors")) else b"x"
    hub = serve(FakeHub(SD15_REPO, files))
    snapshot = resolve_model("sd15", cache_dir=tmp_path / "cache")
    assert set(hub.downloaded) == SD15_NEEDED, sorted(set(hub.downloaded) ^ SD15_NEEDED)
    assert snapshot.name == COMMIT
    assert "--exclude '*.fp16.*'" in download_command(SD15_REPO)


def test_offline_without_cache_prints_the_download_command(tmp_path):
    result = _resolve_in_subprocess(tmp_path, tmp_path / "empty_cache", "sd15")
    message = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "ModelNotAvailable" in message
    assert f"hf download {SD15_REPO} --include model_index.json" in message and "unet/*.safetensors" in message


def test_variant_files_are_not_read(tmp_path):
    """A folder holding diffusion_pytorch_model.fp16.safetensors beside the weights (as the hub
    repo does) loads the weights alone."""
    from tiny_imagegen.checkpoints.unet import load_unet

    folder = tmp_path / "unet"
    shutil.copytree(fixture_path("sd15_pipeline", "unet"), folder)
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.fp16.safetensors"), {"conv_in.weight": mx.zeros((1,))})
    assert load_unet(folder).conv_in.weight.shape == (8, 3, 3, 4)
    assert json.loads((folder / "config.json").read_text())["cross_attention_dim"] == 64
