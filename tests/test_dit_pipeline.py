"""The DiT pipeline against diffusers' DiTPipeline on a tiny random repo (tests/reference/dit_pipeline.py):
same folder, same noise, DDIM; class labels by id and by name; converted and quantized folders."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import TESTS, assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.pipelines.pipeline import Pipeline

RUNS = {"guided": (["207", "goldfish"], 4.0, 5), "unguided": (["balloon"], 1.0, 3)}  # labels 207, 1 / 417


def _pipe(folder=None, **kw):
    return Pipeline.from_pretrained(str(folder or fixture_path("dit_pipeline", "repo")), dtype=mx.float32, **kw)


@pytest.mark.parametrize("run", RUNS)
def test_pipeline_matches_diffusers(run):
    io = load_fixture("dit_pipeline", "io.safetensors")
    prompts, guidance, steps = RUNS[run]
    pipe = _pipe()
    assert pipe.family == "dit" and (pipe.defaults.width, pipe.defaults.steps) == (64, 50)
    images = pipe.generate(prompts, steps=steps, guidance=guidance, latents=io[f"{run}.noise"].transpose(0, 2, 3, 1))
    # A random model's eps is not the noise, so DDIM's x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
    # (sqrt(abar_999) = 0.0064) blows the latents up to |30-85|, and float32 differences with
    # them: they agree to ~1e-6 of their size (one model call to ~4e-6 absolute, test_dit)
    assert_close(f"dit pipeline {run}: final latents", pipe.last_latents, io[f"{run}.latents"].transpose(0, 2, 3, 1),
                 atol=1e-5, rtol=3e-6)
    pixels = pipe.decode(pipe.last_latents) * 0.5 + 0.5  # DiTPipeline: samples / 2 + 0.5, clamped
    assert_close(f"dit pipeline {run}: pixels", mx.clip(pixels, 0, 1), io[f"{run}.images"].transpose(0, 2, 3, 1),
                 atol=1e-5)
    ours = np.stack([np.asarray(im) for im in images]).astype(np.int16)
    ref = np.round(np.array(io[f"{run}.images"].transpose(0, 2, 3, 1)) * 255).astype(np.int16)
    assert_close(f"dit pipeline {run}: uint8 pixels", ours, ref, atol=1)  # a 1e-5 error may flip one rounding


def test_guidance_only_on_the_first_channels_is_an_option():
    """cfg_channels=3 (the original DiT sample.py) guides eps channels 0-2 only and takes the
    conditional eps for channel 3: after one step only that channel differs from DiTPipeline's."""
    pipe = _pipe()
    noise = load_fixture("dit_pipeline", "io.safetensors")["guided.noise"].transpose(0, 2, 3, 1)
    pipe.generate(["207", "1"], steps=1, latents=noise)
    all4 = pipe.last_latents
    pipe.generate(["207", "1"], steps=1, latents=noise, cfg_channels=3)
    diff = mx.abs(pipe.last_latents - all4).max(axis=(0, 1, 2))
    assert diff[:3].max().item() == 0.0 and diff[3].item() > 1e-4
    with pytest.raises(ValueError, match="cfg_channels"):
        pipe.generate("207", steps=1, cfg_channels=5)


def test_class_labels_by_id_name_and_null():
    pipe = _pipe(keep_text_encoders=True)
    labels = pipe.text_encoder
    assert [labels.label(p) for p in ("207", "golden retriever", "Tinca tinca", "TENCH", "toilet paper", "")] == [
        207, 207, 0, 0, 999, 1000]
    with pytest.raises(ValueError, match="did you mean 'golden retriever'"):
        labels.label("golden retreiver")
    with pytest.raises(ValueError, match="out of range"):
        labels.label("1000")
    assert pipe.uses_negative(4.0, {}) and not pipe.uses_negative(1.0, {})
    with pytest.raises(ValueError, match="image-to-image"):
        from PIL import Image

        pipe.generate("207", steps=1, image=Image.new("RGB", (64, 64)))


def test_euler_sampler_runs():
    out = _pipe().generate("207", steps=2, sampler="euler", seed=1)
    assert out[0].size == (64, 64)


def test_converted_folder_gives_the_same_image(tmp_path):
    from tiny_imagegen.registry.convert import convert
    from tiny_imagegen.checkpoints.convert import read_manifest

    converted = convert(fixture_path("dit_pipeline", "repo"), tmp_path / "converted", dtype=mx.float32)
    manifest = read_manifest(converted)
    assert set(manifest["components"]) == {"dit", "vae"} and manifest["pipeline"]["family"] == "dit"
    assert "model_index.json" in manifest["files"]  # the class names travel with the weights
    a = _pipe().generate("golden retriever", steps=2, seed=5)
    b = _pipe(converted).generate("golden retriever", steps=2, seed=5)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # converted to 4 bits: the blocks' Linears are stored quantized, and the folder samples
    q4 = convert(fixture_path("dit_pipeline", "repo"), tmp_path / "q4", bits=4, dtype=mx.float32)
    layers = read_manifest(q4)["components"]["dit"]["quantized_layers"]
    assert layers and all(p.startswith("blocks.") for p in layers) and "final_layer.linear" not in layers
    assert _pipe(q4).generate("golden retriever", steps=2, seed=5)[0].size == (64, 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_on_load(bits):
    pipe = _pipe(quantize=bits)
    quantized = sorted(p for p, m in pipe.transformer.named_modules() if isinstance(m, nn.QuantizedLinear))
    assert quantized and all(p.startswith("blocks.") for p in quantized)  # embedders and final layer stay
    assert pipe.generate("207", steps=2, seed=5)[0].size == (64, 64)


@pytest.mark.parametrize("name", ["dit-xl-2-256", "dit-xl-2-512"])
def test_offline_empty_cache_says_what_to_download(tmp_path, name):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "home")}
    env.pop("HF_TOKEN", None)
    code = f"from tiny_imagegen.registry.hub import resolve_model; print(resolve_model({name!r}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=120)
    message = run.stderr.strip().splitlines()[-1]
    print(message)
    repo = f"facebook/DiT-XL-2-{name[-3:]}"
    assert run.returncode != 0 and message.startswith(f"tiny_imagegen.registry.hub.ModelNotAvailable: {repo} is not in")
    assert (f"hf download {repo} --include model_index.json scheduler/scheduler_config.json 'transformer/*.json' "
            "'transformer/*.safetensors' 'vae/*.json' 'vae/*.safetensors'") in message


def test_pipeline_in_bf16():
    """The guided run in bfloat16 (the model and VAE; the DDIM update stays float32, ddpm.py):
    pixels no further from the fp32 reference than DiTPipeline's own bf16 run, within 1.2x."""
    io = load_fixture("dit_pipeline", "io.safetensors")
    prompts, guidance, steps = RUNS["guided"]
    pipe = Pipeline.from_pretrained(str(fixture_path("dit_pipeline", "repo")), dtype=mx.bfloat16)
    pipe.generate(prompts, steps=steps, guidance=guidance, latents=io["guided.noise_bf16"].transpose(0, 2, 3, 1))
    pixels = mx.clip(pipe.decode(pipe.last_latents) * 0.5 + 0.5, 0, 1)
    assert_bf16_parity("dit pipeline guided: pixels", pixels, io["guided.images"].transpose(0, 2, 3, 1),
                       io["guided.images_bf16"].transpose(0, 2, 3, 1), factor=1.2)  # measured 0.86


def test_negative_prompt_is_a_class_to_steer_away_from():
    pipe = _pipe(keep_text_encoders=True)
    null = pipe.generate("207", steps=2, seed=3)
    away = pipe.generate("207", steps=2, seed=3, negative_prompt="goldfish")
    assert not np.array_equal(np.asarray(null[0]), np.asarray(away[0]))
    assert pipe.condition(["207"], negative_prompt="", guidance=4.0).negative["y"].tolist() == [1000]
