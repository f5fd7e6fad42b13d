"""SD3 / SD3.5 text side and pipeline against diffusers' StableDiffusion3Pipeline on a tiny random
repo (fixtures from tests/reference/sd3_pipeline.py)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture, relative_l2
from tiny_imagegen.checkpoints.text_encoders import load_clip_text_model, load_t5_encoder
from tiny_imagegen.models.clip import CLIPTextModelWithProjection
from tiny_imagegen.conditioning.sd3 import SD3TextEncoders
from tiny_imagegen.text import CLIPTokenizer, T5Tokenizer

PROMPTS = ["a red circle to the left of a blue square", "Ein Café in Tōkyō"]
T5_LENGTH = 16


def encoders(dtype=None, t5=True) -> SD3TextEncoders:
    repo = fixture_path("sd3_pipeline", "repo")
    return SD3TextEncoders(
        CLIPTokenizer.from_folder(repo / "tokenizer"), load_clip_text_model(repo / "text_encoder", dtype),
        CLIPTokenizer.from_folder(repo / "tokenizer_2"), load_clip_text_model(repo / "text_encoder_2", dtype),
        T5Tokenizer.from_folder(repo / "tokenizer_3"), load_t5_encoder(repo / "text_encoder_3", dtype) if t5 else None,
        joint_dim=64, t5_length=T5_LENGTH)


@pytest.fixture(scope="module")
def io():
    return load_fixture("sd3_pipeline", "io.safetensors")


def test_encode_prompt_matches_diffusers(io):
    enc = encoders()
    assert isinstance(enc.clip_l, CLIPTextModelWithProjection) and enc.clip_g_tokenizer.pad_id != enc.clip_l_tokenizer.pad_id
    pos, neg = enc(PROMPTS), enc(["", ""])
    assert pos["txt"].shape == (2, 77 + T5_LENGTH, 64)
    assert_close("sd3 prompt_embeds", pos["txt"], io["enc.prompt_embeds"], atol=2e-5)
    assert_close("sd3 pooled_prompt_embeds", pos["pooled"], io["enc.pooled"], atol=2e-5)
    assert_close("sd3 negative_prompt_embeds ('')", neg["txt"], io["enc.negative_embeds"], atol=2e-5)
    assert_close("sd3 negative_pooled ('')", neg["pooled"], io["enc.negative_pooled"], atol=2e-5)


def test_clip_skip_and_negatives_ignore_it(io):
    enc = encoders()
    assert_close("sd3 prompt_embeds clip_skip=1", enc(PROMPTS, clip_skip=1)["txt"], io["enc_skip1.prompt_embeds"], atol=2e-5)
    # the reference encodes negatives with clip_skip=None whatever clip_skip is (SP:496,503)
    assert_close("sd3 negative embeds with clip_skip=1 given", enc(["", ""])["txt"], io["enc_skip1.negative_embeds"], atol=2e-5)
    with pytest.raises(ValueError, match="clip_skip 3: CLIP has only 3 layers"):
        enc(PROMPTS, clip_skip=3)


def test_without_t5_zeros(io):
    out = encoders(t5=False)(PROMPTS)
    assert_close("sd3 prompt_embeds without T5", out["txt"], io["enc_no_t5.prompt_embeds"], atol=2e-5)
    assert float(mx.max(mx.abs(out["txt"][:, 77:]))) == 0.0


@pytest.mark.parametrize("name, count", [("clip_l", 123_650_304), ("clip_g", 694_659_840)])
def test_full_size_clip_manifests_map(name, count):
    import json

    from tiny_imagegen.checkpoints.mapping import map_checkpoint, parameter_shapes, shape_placeholders
    from tiny_imagegen.checkpoints.text_encoders import clip_table

    manifest = shape_placeholders(json.loads(fixture_path("sd3_pipeline", f"manifest_{name}.json").read_text()))
    ours = parameter_shapes(CLIPTextModelWithProjection(registry.find("sd3.5-medium").configs[name]))
    mapped = map_checkpoint(clip_table(manifest, projection=True), ours, manifest)  # raises on any gap
    assert set(mapped) == set(ours) and sum(v.size for v in mapped.values()) == count


def test_encode_prompt_bf16(io):
    out = encoders(mx.bfloat16)(PROMPTS)
    assert_bf16_parity("sd3 prompt_embeds", out["txt"], io["enc.prompt_embeds"], io["enc_bf16.prompt_embeds"])
    assert_bf16_parity("sd3 pooled", out["pooled"], io["enc.pooled"], io["enc_bf16.pooled"])


# ---- the pipeline ----------------------------------------------------------------------------------

from tiny_imagegen import registry  # noqa: E402
from tiny_imagegen.pipelines.pipeline import Pipeline  # noqa: E402
from tiny_imagegen.pipelines.sd3 import sd3_sigmas  # noqa: E402


def pipeline(dtype=mx.float32, **kw):
    pipe = Pipeline.from_pretrained(str(fixture_path("sd3_pipeline", "repo")), dtype=dtype, **kw)
    pipe.text_encoder.encoders.t5_length = T5_LENGTH
    return pipe


def nchw(x):
    return x.transpose(0, 3, 1, 2)


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def reference_pixels(io, name):
    return np.round(np.array(io[f"{name}.images"].transpose(0, 2, 3, 1)) * 255).astype(np.int16)


def test_schedule_matches_the_reference_double_shift():
    sig = sd3_sigmas(28)
    assert len(sig) == 29 and sig[0] == 1.0 and sig[-1] == 0.0
    assert abs(sig[1] - 0.98738062) < 1e-7 and abs(sig[-2] - 0.00892857) < 1e-7  # notes B3


@pytest.mark.parametrize("name, extra", [("cfg", {}), ("slg", {"slg": (1,), "slg_stop": 0.6}), ("nocfg", {})])
def test_pipeline_matches_diffusers(io, name, extra):
    pipe = pipeline()
    assert pipe.family == "sd3" and pipe.defaults.shift == 3.0
    guidance = 1.0 if name == "nocfg" else 5.0
    images = pipe.generate(PROMPTS, width=32, height=48, steps=4, guidance=guidance,
                           latents=io["noise"].transpose(0, 2, 3, 1), **extra)
    assert_close(f"sd3 pipeline {name}: final latents", nchw(pipe.last_latents), io[f"{name}.latents"], atol=2e-5)
    if name != "nocfg":
        assert_close(f"sd3 pipeline {name}: uint8 pixels", pixels(images), reference_pixels(io, name), atol=1)


def test_unbatched_guidance_gives_the_same_latents(io):
    pipe = pipeline()
    pipe.generate(PROMPTS, width=32, height=48, steps=4, guidance=5.0, latents=io["noise"].transpose(0, 2, 3, 1),
                  batch_cfg=False, slg=(1,), slg_stop=0.6)
    assert_close("sd3 pipeline slg, negative as a second pass", nchw(pipe.last_latents), io["slg.latents"], atol=2e-5)


def test_slg_changes_the_result_and_needs_cfg(io):
    assert float(mx.max(mx.abs(io["slg.latents"] - io["cfg.latents"]))) > 1e-2
    pipe = pipeline(keep_text_encoders=True)
    with pytest.raises(ValueError, match="only with classifier-free guidance"):
        pipe.generate("a cat", width=32, height=32, steps=1, guidance=1.0, slg=True)
    with pytest.raises(ValueError, match=r"--slg layers \(7, 8, 9\): the transformer has blocks 0\.\.2"):
        pipe.generate("a cat", width=32, height=32, steps=1, guidance=5.0, slg=True)


def test_pipeline_bf16(io):
    pipe = pipeline(mx.bfloat16)
    pipe.generate(PROMPTS, width=32, height=48, steps=4, guidance=5.0, latents=io["noise"].transpose(0, 2, 3, 1))
    assert_bf16_parity("sd3 pipeline cfg: final latents", nchw(pipe.last_latents), io["cfg.latents"],
                       io["cfg.latents_bf16"])


def test_image_to_image_matches_diffusers(io):
    """StableDiffusion3Img2ImgPipeline from the same init latents and noise: the last 3 of 5 steps."""
    pipe = pipeline()
    cond = pipe.condition(PROMPTS, "", 5.0)
    nhwc = lambda k: io[k].transpose(0, 2, 3, 1)  # noqa: E731
    seen = []
    x = pipe.sample(nhwc("img2img.noise"), cond, steps=5, guidance=5.0, width=32, height=48, init=nhwc("img2img.init"),
                    strength=0.6, run=lambda step, x, n: pipe.run_steps(step, x, n, progress=lambda i, n, s: seen.append(i)))
    assert seen == [1, 2, 3]
    assert_close("sd3 img2img: final latents", nchw(x), io["img2img.latents"], atol=2e-5)


def test_without_t5_never_loads_it(io):
    pipe = pipeline(keep_text_encoders=True)
    cond = pipe.condition(PROMPTS, "", 5.0, t5=False)
    assert not isinstance(pipe.text_encoder.encoders.t5, nn.Module)  # still the loader
    assert_close("sd3 pipeline --no-t5 prompt embeds", cond.positive["txt"], io["enc_no_t5.prompt_embeds"], atol=2e-5)


def test_clip_skip_through_the_pipeline(io):
    pipe = pipeline()
    cond = pipe.condition(PROMPTS, "", 5.0, clip_skip=1)
    assert_close("sd3 pipeline clip_skip=1", cond.positive["txt"], io["enc_skip1.prompt_embeds"], atol=2e-5)
    assert_close("sd3 pipeline clip_skip=1, negatives", cond.negative["txt"], io["enc_skip1.negative_embeds"], atol=2e-5)


def test_too_large_image_is_refused_early():
    pipe = pipeline(keep_text_encoders=True)
    with pytest.raises(ValueError, match="position table covers images up to 192 pixels a side"):
        pipe.generate("a cat", width=208, height=32, steps=1)


def test_registry_entries(capsys):
    from tiny_imagegen.commands.models import print_models

    print_models()
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sd3.5-")]
    assert len(listed) == 3 and all("Stability AI Community License" in line and "(gated)" in line for line in listed)
    for name in ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"):
        spec = registry.find(name)
        assert spec.gated and "Stability AI Community License" in spec.licence and spec.family == "sd3"
    turbo = registry.find("sd3.5-large-turbo").defaults
    assert (turbo.steps, turbo.guidance) == (4, 0.0)
    assert registry.FAMILIES["sd3"].hub_folders() == ("transformer", "vae", "text_encoder", "text_encoder_2",
                                                      "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


# ---- convert, quantize, the command line, the hub --------------------------------------------------

from test_hub import FakeHub, _resolve_in_subprocess, serve  # noqa: E402,F401  (serve is a fixture)
from tiny_imagegen.registry.hub import ModelNotAvailable, resolve_model  # noqa: E402


def test_converted_folder_gives_the_same_latents(io, tmp_path):
    from tiny_imagegen.registry.convert import convert
    from tiny_imagegen.checkpoints.convert import read_manifest

    out = convert(fixture_path("sd3_pipeline", "repo"), tmp_path / "sd3-converted", dtype=mx.float32)
    manifest = read_manifest(out)
    assert sorted(manifest["components"]) == ["clip_g", "clip_l", "sd3_t5", "sd3_transformer", "vae"]
    assert manifest["pipeline"]["family"] == "sd3" and (out / "tokenizer_3" / "spiece.model").is_file()
    pipe = Pipeline.from_pretrained(str(out), dtype=mx.float32)
    pipe.text_encoder.encoders.t5_length = T5_LENGTH
    pipe.generate(PROMPTS, width=32, height=48, steps=4, guidance=5.0, latents=io["noise"].transpose(0, 2, 3, 1))
    assert_close("sd3 converted folder: final latents", nchw(pipe.last_latents), io["cfg.latents"], atol=2e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_load_and_convert(io, tmp_path, bits):
    from tiny_imagegen.registry.convert import convert

    pipe = pipeline(quantize=bits)
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in pipe.transformer.named_modules())
    pipe.generate(PROMPTS, width=32, height=48, steps=4, guidance=5.0, latents=io["noise"].transpose(0, 2, 3, 1))
    err = relative_l2(nchw(pipe.last_latents), io["cfg.latents"])
    print(f"[quantization] sd3 tiny {bits}-bit on load: latents relative L2 {err:.3f}")
    assert err < {8: 0.05, 4: 0.5}[bits]
    out = convert(fixture_path("sd3_pipeline", "repo"), tmp_path / f"sd3-q{bits}", bits=bits, group_size=32)
    assert Pipeline.from_pretrained(str(out)).family == "sd3"


def test_command_line_options_and_metadata(tmp_path):
    from tiny_imagegen.commands.generate import main
    from tiny_imagegen.commands.metadata import read_parameters, replay_arguments

    path = tmp_path / "sd3.png"
    argv = ["--model", str(fixture_path("sd3_pipeline", "repo")), "--prompt", "a cat", "--width", "32", "--height", "32",
            "--steps", "2", "--guidance", "4", "--slg", "1,2", "--slg-scale", "2", "--clip-skip", "1", "--no-t5",
            "--seed", "3", "--output", str(path), "--dtype", "float32"]
    assert main(argv) == 0
    stored = read_parameters(path)
    assert (stored["slg"], stored["slg_scale"], stored["clip_skip"], stored["t5"]) == ("[1, 2]", "2.0", "1", "False")
    assert {k: v for k, v in replay_arguments(path).items() if k in ("slg", "clip_skip", "no_t5")} == {
        "slg": "1,2", "clip_skip": 1, "no_t5": True}
    assert main(["--model", "tiny-shapes", "--prompt", "x", "--slg", "--output", str(tmp_path / "x.png")]) == 2


def test_gated_repo_names_the_stability_licence(tmp_path, serve):
    serve(FakeHub("stabilityai/stable-diffusion-3.5-medium", {"model_index.json": b"{}"}, gated=True))
    with pytest.raises(ModelNotAvailable) as e:
        resolve_model("sd3.5-medium", cache_dir=tmp_path / "cache")
    message = str(e.value)
    print(message)
    assert "stabilityai/stable-diffusion-3.5-medium is gated (Stability AI Community License" in message


def test_offline_hint_names_what_to_download(tmp_path):
    run = _resolve_in_subprocess(tmp_path, tmp_path / "empty_cache", "sd3.5-large-turbo")
    message = run.stderr.strip().splitlines()[-1]
    print(message)
    assert run.returncode != 0 and "HF_HUB_OFFLINE=1" in message
    assert "hf download stabilityai/stable-diffusion-3.5-large-turbo --include model_index.json" in message
    assert "text_encoder_3/" in message and "tokenizer_3/" in message
