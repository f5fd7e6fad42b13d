"""The Qwen-Image pipeline against diffusers' QwenImagePipeline / QwenImageImg2ImgPipeline on a tiny
random repo (fixtures from tests/reference/qwen_image_pipeline.py): final latents and pixels for 2
prompts at 80x48, without and with true CFG, fp32 and bf16; image-to-image; the schedule."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.pipelines.pipeline import Pipeline
from tiny_imagegen.pipelines.qwen_image import QwenImagePipeline, true_cfg
from tiny_imagegen.diffusion.flow_matching import stretched_shift_schedule

H, W = 48, 80
PROMPTS = ["a red cat sitting on a mat", "the quick brown fox jumps over the lazy dog near a river bank"]
NEGATIVES = ["blurry", "ugly and low quality with bad anatomy"]
RUNS = {"plain": dict(guidance=1.0), "cfg": dict(guidance=3.0, negative_prompt=NEGATIVES)}
ATOL = 5e-5  # fp32 through 4 steps of a 2-block transformer and the VAE (measured ~2e-6)


def _pipe(dtype=mx.float32):
    pipe = Pipeline.from_pretrained(str(fixture_path("qwen_image_pipeline", "repo")), dtype=dtype)
    assert isinstance(pipe, QwenImagePipeline)
    return pipe


def _run(pipe, name, suffix="", **extra):
    io = load_fixture("qwen_image_pipeline", "io.safetensors")
    noise = io[f"{name}.noise{suffix}"].reshape(2, H // 16, W // 16, -1)
    pipe.generate(PROMPTS, width=W, height=H, steps=4, latents=noise, **RUNS[name], **extra)
    latents = pipe.last_latents
    pixels = mx.clip(pipe.decode(latents) * 0.5 + 0.5, 0, 1)
    return latents.reshape(2, -1, latents.shape[-1]), pixels, io


@pytest.mark.parametrize("name", list(RUNS))
def test_pipeline_matches_diffusers_fp32(name):
    latents, pixels, io = _run(_pipe(), name)
    assert_close(f"qwen-image pipeline {name} latents fp32", latents, io[f"{name}.latents"], atol=ATOL)
    assert_close(f"qwen-image pipeline {name} pixels fp32", pixels, io[f"{name}.images"], atol=ATOL)


@pytest.mark.parametrize("name", list(RUNS))
def test_pipeline_bf16_against_torch_bf16(name):
    latents, pixels, io = _run(_pipe(mx.bfloat16), name, "_bf16")
    assert latents.dtype == mx.bfloat16  # the latents stay in the model dtype between steps (QP:590)
    assert_bf16_parity(f"qwen-image pipeline {name} latents", latents, io[f"{name}.latents"],
                       io[f"{name}.latents_bf16"], factor=1.5)
    assert_bf16_parity(f"qwen-image pipeline {name} pixels", pixels.astype(mx.bfloat16), io[f"{name}.images"],
                       io[f"{name}.images_bf16"], factor=1.5)


def test_img2img_matches_diffusers_fp32():
    io = load_fixture("qwen_image_pipeline", "io.safetensors")
    pipe = _pipe()
    noise = io["img2img.noise"].reshape(2, H // 16, W // 16, -1)
    image = Image.open(fixture_path("qwen_image_pipeline", "init.png"))
    eps = mx.zeros((2, H // 8, W // 8, 4))  # the posterior's mean + std·0: its mode, as the fixture's argmax
    pipe.generate(PROMPTS, width=W, height=H, steps=5, guidance=1.0, latents=noise, image=image, strength=0.6,
                  posterior_noise=eps)
    latents = pipe.last_latents.reshape(2, -1, noise.shape[-1])
    assert_close("qwen-image img2img latents fp32 (strength 0.6)", latents, io["img2img.latents"], atol=ATOL)


def test_several_images_per_prompt_keep_their_masks():
    """diffusers orders the masks [p0, p1, p0, p1] for embeddings [p0, p0, p1, p1] (QP:260-263); here
    each image's row keeps its prompt's mask: image i equals that prompt's run alone."""
    pipe = _pipe()
    noise = load_fixture("qwen_image_pipeline", "io.safetensors")["plain.noise"].reshape(2, H // 16, W // 16, -1)
    pairs = mx.concatenate([noise[:1], noise[:1], noise[1:], noise[1:]])
    pipe.generate(PROMPTS, width=W, height=H, steps=2, guidance=1.0, latents=pairs, n_images=2)
    both = pipe.last_latents
    pipe.generate(PROMPTS[1], width=W, height=H, steps=2, guidance=1.0, latents=noise[1:])
    assert_close("second prompt's image, batched with padding == alone", both[2], pipe.last_latents[0], atol=1e-5)


def test_schedule_and_guidance():
    s = stretched_shift_schedule(50, 4096)  # 1024x1024
    assert s[0] == 1.0 and abs(s[-2] - 0.02) < 1e-6 and s[-1] == 0.0 and len(s) == 51
    assert stretched_shift_schedule(1, 4096) == [1.0, 0.0]  # diffusers: NaN (the stretch divides by 0)
    cond, neg = mx.random.normal((1, 3, 8), key=mx.random.key(1)), mx.random.normal((1, 3, 8), key=mx.random.key(2))
    out = true_cfg(cond, neg, 4.0)
    assert_close("true CFG keeps the conditional norm", mx.linalg.norm(out, axis=-1), mx.linalg.norm(cond, axis=-1),
                 atol=1e-5)


def test_offline_empty_cache_prints_the_download_hint(tmp_path, monkeypatch):
    from tiny_imagegen.registry.hub import ModelNotAvailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailable) as e:
        Pipeline.from_pretrained("qwen-image-2512")
    message = str(e.value)
    assert "\n" not in message and "Qwen/Qwen-Image-2512" in message and "hf download" in message
    assert "text_encoder/*.safetensors" in message and "transformer/*.safetensors" in message
    assert np.all([w not in message for w in ("Traceback",)])


def test_converted_folder_gives_the_same_image(tmp_path):
    from tiny_imagegen.registry.convert import convert
    from tiny_imagegen.checkpoints.convert import read_manifest

    converted = convert(fixture_path("qwen_image_pipeline", "repo"), tmp_path / "converted", dtype=mx.float32)
    manifest = read_manifest(converted)
    assert sorted(manifest["components"]) == ["qwen3", "qwen_image_transformer", "qwen_vae"]
    assert manifest["pipeline"]["family"] == "qwen_image"
    _, _, io = _run(first := _pipe(), "cfg")
    again = Pipeline.from_pretrained(str(converted), dtype=mx.float32)
    noise = io["cfg.noise"].reshape(2, H // 16, W // 16, -1)
    again.generate(PROMPTS, width=W, height=H, steps=4, latents=noise, **RUNS["cfg"])
    assert_close("qwen-image converted folder vs hub folder", again.last_latents, first.last_latents, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_on_load_runs(monkeypatch, bits):
    import functools

    import mlx.nn as nn

    import tiny_imagegen.pipelines.loading as loading
    from tiny_imagegen.checkpoints.quantize import quantize_component

    # the tiny model is 32 wide: groups of 32 (the default 64 would leave no layer to quantize)
    monkeypatch.setattr(loading, "quantize_component", functools.partial(quantize_component, group_size=32))
    pipe = Pipeline.from_pretrained(str(fixture_path("qwen_image_pipeline", "repo")), dtype=mx.float32, quantize=bits)
    block = pipe.transformer.double_blocks[0]
    assert isinstance(block.img_attn.qkv, nn.QuantizedLinear) and isinstance(block.img_mod.lin, nn.QuantizedLinear)
    assert not any(isinstance(m, nn.QuantizedLinear) for m in (pipe.transformer.img_in, pipe.transformer.txt_in,
                                                                pipe.transformer.final_layer.linear))
    noise = load_fixture("qwen_image_pipeline", "io.safetensors")["cfg.noise"].reshape(2, H // 16, W // 16, -1)
    pipe.generate(PROMPTS, width=W, height=H, steps=2, latents=noise, **RUNS["cfg"])
    reference = _pipe()
    reference.generate(PROMPTS, width=W, height=H, steps=2, latents=noise, **RUNS["cfg"])
    from conftest import relative_l2

    err = relative_l2(pipe.last_latents, reference.last_latents)
    print(f"[quantized] qwen-image {bits}-bit final latents: relative L2 {err:.3e} against fp32")
    assert bool(mx.all(mx.isfinite(pipe.last_latents))) and 0 < err < (0.5 if bits == 4 else 0.05)


def test_command_line(tmp_path):
    """The generate command on a Qwen-Image folder: the image Pipeline.generate makes, with its parameters."""
    import subprocess
    import sys
    from pathlib import Path

    folder, out = fixture_path("qwen_image_pipeline", "repo"), tmp_path / "cat.png"
    r = subprocess.run([sys.executable, "-m", "tiny_imagegen", "generate", "--model", str(folder), "--prompt", "a red cat",
                        "--width", "80", "--height", "48", "--steps", "3", "--seed", "3", "--dtype", "float32",
                        "--negative-prompt", "blurry", "--output", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "3/3" in r.stderr
    image = Image.open(out)
    assert image.text["prompt"] == "a red cat" and image.size == (80, 48)
    expected = _pipe().generate("a red cat", width=80, height=48, steps=3, seed=3, negative_prompt="blurry")
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected[0]))


def test_long_prompt_cut_is_counted_after_release():
    pipe = _pipe()
    long_prompt = " ".join(["word"] * 700)
    pipe.generate("a cat", width=W, height=H, steps=1, guidance=1.0)  # encodes, then releases the encoder
    assert pipe.text_encoder is None
    assert pipe.tokens_cut("a cat") == 0 and pipe.tokens_cut(long_prompt) > 100
