"""Editing against diffusers (fixtures: tests/reference/editing.py): FLUX.2 klein reference images
(Flux2KleinPipeline(image=[...]), one and two references, not square), klein inpainting
(Flux2KleinInpaintPipeline) and FLUX.1 inpainting (FluxInpaintPipeline), fp32 and bf16, on the
tiny repos of the text-to-image tests, with the same noise; then the masks' own rules. SD3.5 and
Qwen-Image inpainting (StableDiffusion3InpaintPipeline, QwenImageInpaintPipeline) at the end, fixtures
from tests/reference/editing_sd3_qwen.py."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import assert_close, fixture_path, load_fixture, relative_l2
from test_pipeline import hub_folder
from tiny_imagegen.editing import masks
from tiny_imagegen.pipelines.pipeline import Pipeline

PROMPT = "a red cat"
BF16_FACTOR = 2.0  # ours no further from the fp32 reference than this x torch's bf16 run (relative L2)


@pytest.fixture(scope="module")
def pics():
    return {k: Image.fromarray(np.array(v)) for k, v in load_fixture("editing", "images.safetensors").items()}


def klein(dtype=mx.float32):
    return Pipeline.from_pretrained(str(fixture_path("flux2_pipeline", "repo")), dtype=dtype)


def tokens(pipe) -> mx.array:
    B, h, w, C = pipe.last_latents.shape
    return pipe.last_latents.reshape(B, h * w, C)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.float32)


def check_bf16(name, ours, ref, torch_bf16):
    ours_err, torch_err = relative_l2(ours, ref), relative_l2(torch_bf16, ref)
    print(f"[bf16] {name}: ours {ours_err:.3e}, torch bf16 {torch_err:.3e} (ratio {ours_err / torch_err:.2f})")
    assert ours_err <= BF16_FACTOR * torch_err


@pytest.mark.parametrize("n", [1, 2])
def test_klein_references_match_diffusers(pics, n):
    io = load_fixture("editing", "klein_edit.safetensors")
    pipe = klein()
    refs = [pics["ref1"], pics["ref2"]][:n]
    images = pipe.generate(PROMPT, steps=4, references=refs, latents=io[f"refs{n}.noise"])
    assert images[0].size == (64, 80)  # the first reference's size, cropped to multiples of 16
    assert_close(f"klein {n} reference(s): final packed latents", tokens(pipe), io[f"refs{n}.latents"], atol=2e-5)
    assert_close(f"klein {n} reference(s): uint8 pixels", pixels(images), io[f"refs{n}.pixels"], atol=1)


@pytest.mark.parametrize("n", [1, 2])
def test_klein_references_bf16(pics, n):
    io = load_fixture("editing", "klein_edit.safetensors")
    pipe = klein(mx.bfloat16)
    images = pipe.generate(PROMPT, steps=4, references=[pics["ref1"], pics["ref2"]][:n], latents=io[f"refs{n}.noise"])
    assert pipe.last_latents.dtype == mx.bfloat16
    check_bf16(f"klein {n} reference(s)", tokens(pipe), io[f"refs{n}.latents"], io[f"refs{n}.latents_bf16"])
    gap = np.abs(pixels(images) - np.array(io[f"refs{n}.pixels_bf16"])).max()
    print(f"[bf16] klein {n} reference(s): max pixel difference to torch bf16 {gap:.0f} levels")


def test_reference_ids_sit_at_their_own_offset(pics):
    pipe = klein()
    tokens_, ids = pipe.encode_references([pics["ref1"], pics["ref2"]], 64, 80)
    assert tokens_.shape == (1, 4 * 5 + 6 * 4, 16)  # 64x80 -> 4x5 tokens, 96x64 -> 6x4
    assert sorted(set(ids[:, 0].tolist())) == [10.0, 20.0]  # t = 10 + 10 k (FKP:353)
    assert ids[:20, 1].max() == 4 and ids[:20, 2].max() == 3 and ids[20:, 1].max() == 3 and ids[20:, 2].max() == 5


def test_klein_inpaint_matches_diffusers(pics):
    io = load_fixture("editing", "klein_inpaint.safetensors")
    pipe = klein()
    m = pipe.latent_mask(pics["klein_mask"], 64, 80)
    assert_close("klein inpaint: token-grid mask (bilinear)", m[0, :, :, 0], io["token_mask"], atol=0)
    images = pipe.generate(PROMPT, steps=5, image=pics["ref1"], mask=pics["klein_mask"], strength=0.8,
                           latents=io["noise"])
    assert images[0].size == (64, 80)  # the image's own size, floored to 16
    assert_close("klein inpaint: final packed latents", tokens(pipe), io["latents"], atol=2e-5)
    assert_close("klein inpaint: uint8 pixels", pixels(images), io["pixels"], atol=1)
    # where the mask is 0 on the token grid, the result is the image's own latents exactly
    x0 = pipe.init_latents(pipe.encode_image(pics["ref1"], 64, 80), None)
    keep = np.array(m).reshape(-1) == 0
    assert np.array_equal(np.array(tokens(pipe))[0, keep], np.array(x0.reshape(1, -1, 16))[0, keep])


def test_klein_inpaint_with_a_reference_matches_diffusers(pics):
    """--image --mask --ref: the image is reference 1 (t = 10), the given one follows at t = 20, as
    Flux2KleinInpaintPipeline(image_reference=...)."""
    io = load_fixture("editing", "klein_inpaint.safetensors")
    pipe = klein()
    images = pipe.generate(PROMPT, steps=5, image=pics["ref1"], mask=pics["klein_mask"], references=[pics["ref2"]],
                           strength=0.8, latents=io["noise"])
    assert_close("klein inpaint + reference: final packed latents", tokens(pipe), io["with_reference.latents"], atol=2e-5)
    assert_close("klein inpaint + reference: uint8 pixels", pixels(images), io["with_reference.pixels"], atol=1)
    assert float(mx.max(mx.abs(tokens(pipe) - io["latents"]))) > 1e-3  # the reference is seen (9.3e-3 apart)


def test_klein_inpaint_bf16(pics):
    io = load_fixture("editing", "klein_inpaint.safetensors")
    pipe = klein(mx.bfloat16)
    pipe.generate(PROMPT, steps=5, image=pics["ref1"], mask=pics["klein_mask"], strength=0.8, latents=io["noise_bf16"])
    check_bf16("klein inpaint", tokens(pipe), io["latents"], io["latents_bf16"])


def test_flux1_inpaint_matches_diffusers(tmp_path, pics):
    from tiny_imagegen.layers.embeddings import pack_latents

    io = load_fixture("editing", "flux1_inpaint.safetensors")
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path, "dev_like")), dtype=mx.float32)
    images = pipe.generate(PROMPT, width=48, height=32, steps=5, guidance=3.5, image=pics["flux1_image"],
                           mask=pics["flux1_mask"], strength=0.6, latents=io["noise"], posterior_noise=io["eps"])
    assert_close("flux1 inpaint: final packed latents", pack_latents(pipe.last_latents), io["latents"], atol=2e-5)
    assert_close("flux1 inpaint: uint8 pixels", pixels(images), io["pixels"], atol=1)


def test_mask_rules():
    m = np.zeros((32, 32), np.float32)
    m[:16] = 1
    assert masks.nearest(m, 4, 4)[:, 0].tolist() == [1, 1, 0, 0]
    soft = masks.bilinear(m, 2, 2)  # rows 7/8 and 23/24 averaged: an edge at 16 stays hard
    assert soft[:, 0].tolist() == [1.0, 0.0]
    assert masks.bilinear(np.pad(m, ((8, 0), (0, 0)))[:32], 2, 2)[:, 0].tolist() == [0.5, 0.5]  # edges at 8 and 24: soft
    grey = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    masks.check_mask(grey)  # RGB with equal channels is a grey mask
    with pytest.raises(ValueError, match="colours"):
        masks.check_mask(Image.fromarray(np.dstack([np.full((8, 8), 200, np.uint8)] * 2 + [np.zeros((8, 8), np.uint8)])))
    assert masks.pixel_mask(Image.fromarray(np.full((8, 8), 127, np.uint8)), 8, 8).max() == 0  # 127/255 < 0.5
    assert "nothing" in masks.coverage(np.zeros((2, 2))) and "everything" in masks.coverage(np.ones((2, 2)))
    assert masks.coverage(m) is None


@pytest.mark.parametrize("name", ["img2img", "inpaint"])
def test_zimage_img2img_and_inpaint_match_diffusers(tmp_path, pics, name):
    """ZImageImg2ImgPipeline (strength 0.6: 5 of 8 Turbo steps from σ 0.8333) and
    ZImageInpaintPipeline (0.8: 7 from 0.9545); the image 52x36 is floored and resized to 48x32."""
    from test_zimage_pipeline import hub_folder as zimage_folder

    io = load_fixture("editing", "zimage.safetensors")
    pipe = Pipeline.from_pretrained(str(zimage_folder(tmp_path)), dtype=mx.float32)
    extra = dict(mask=pics["zimage_mask"], strength=0.8) if name == "inpaint" else dict(strength=0.6)
    images = pipe.generate(PROMPT, steps=8, guidance=0.0, image=pics["zimage_image"], latents=io[f"{name}.noise"],
                           posterior_noise=io[f"{name}.eps"], **extra)
    assert images[0].size == (48, 32)
    assert_close(f"zimage {name}: final latents", pipe.last_latents, io[f"{name}.latents"], atol=5e-5)
    assert_close(f"zimage {name}: uint8 pixels", pixels(images), io[f"{name}.pixels"], atol=1)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_sd15_inpaint_matches_diffusers(tmp_path, pics, sampler):
    """StableDiffusionInpaintPipeline on the base U-Net: 3 of 5 steps (strength 0.75), CFG 7.5."""
    from test_sd15_pipeline import hub_folder as sd15_folder

    io = load_fixture("editing", "sd15_inpaint.safetensors")
    pipe = Pipeline.from_pretrained(str(sd15_folder(tmp_path)), dtype=mx.float32)
    images = pipe.generate(PROMPT, width=48, height=32, steps=5, guidance=7.5, negative_prompt="blurry",
                           image=pics["flux1_image"], mask=pics["flux1_mask"], strength=0.75, sampler=sampler,
                           latents=io[f"{sampler}.noise"], posterior_noise=io[f"{sampler}.eps"])
    assert_close(f"sd15 inpaint {sampler}: final latents", pipe.last_latents, io[f"{sampler}.latents"], atol=2e-5)
    assert_close(f"sd15 inpaint {sampler}: uint8 pixels", pixels(images), io[f"{sampler}.pixels"], atol=1)


def kontext_folder(tmp_path):
    """The FLUX.1 test folder (dev-like transformer) marked as a FluxKontextPipeline repo."""
    import json

    folder = hub_folder(tmp_path, "dev_like")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
    return folder


def test_kontext_matches_diffusers(tmp_path, pics):
    """FluxKontextPipeline: the 72x80 reference resized to 64x80 (auto_resize off: the trained
    resolutions would make 4071 reference tokens, minutes on a CPU; their choice is checked below),
    20 reference tokens at ids (1, row, col) beside 16 noisy ones; 3 steps, guidance 2.5."""
    from tiny_imagegen.layers.embeddings import pack_latents

    io = load_fixture("editing", "kontext.safetensors")
    pipe = Pipeline.from_pretrained(str(kontext_folder(tmp_path)), dtype=mx.float32)
    assert pipe.family == "flux1-kontext" and pipe.max_references == 1
    from tiny_imagegen.editing.images import kontext_reference

    assert pipe.auto_resize and kontext_reference(pics["ref1"]).size == (944, 1104)  # by default
    assert pipe.output_size(None, None, references=[pics["ref1"]]) == (944, 1104)
    pipe.auto_resize = False
    tokens_, ids = pipe.encode_references([pics["ref1"]], 64, 64)
    assert tokens_.shape == (1, 4 * 5, 16) and set(ids[:, 0].tolist()) == {1.0} and ids[:, 1].max() == 4
    images = pipe.generate(PROMPT, width=64, height=64, steps=3, guidance=2.5, references=[pics["ref1"]],
                           latents=io["noise"])
    assert_close("kontext: final packed latents", pack_latents(pipe.last_latents), io["latents"], atol=2e-5)
    assert_close("kontext: uint8 pixels", pixels(images), io["pixels"], atol=1)


def test_kontext_resolutions_and_registry():
    from tiny_imagegen import registry
    from tiny_imagegen.editing.images import KONTEXT_RESOLUTIONS, kontext_size

    ref = load_fixture("editing", "kontext.safetensors")["resolutions"]
    assert np.array_equal(np.array(KONTEXT_RESOLUTIONS), np.array(ref))
    # the notes' measured choices (w x h): the nearest aspect ratio among the trained sizes
    assert kontext_size(72, 80) == (944, 1104) and kontext_size(1920, 1080) == (1392, 752)
    assert kontext_size(500, 1500) == (672, 1568) and kontext_size(72, 80, auto_resize=False) == (64, 80)
    spec = registry.find("kontext")
    assert spec.name == "flux1-kontext-dev" and spec.repo_id == "black-forest-labs/FLUX.1-Kontext-dev"
    assert spec.gated and "Non-Commercial" in spec.licence and spec.family == "flux1-kontext"
    assert registry.family_for_pipeline_class("FluxKontextPipeline").name == "flux1-kontext"


def test_known_region_is_the_input_within_the_vae_round_trip():
    """The shipped tiny-shapes model (a trained VAE) repaints the square of a rendered scene: the
    known region's latents are the input's (the posterior sample kept) exactly, and its pixels are
    as far from the input as the VAE's own round trip is (mean over known pixels; the decoder's
    mid-block attention lets the new content move known pixels a little: measured max 17 levels
    at >= 8 px from the mask, mean 0.8; benchmarks/inpaint_demo.py prints these)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from inpaint_demo import PROMPT, known_region_errors

    from tiny_imagegen.models.pixels import to_pil
    from tiny_imagegen.train.shapes_dataset import Scene, SceneObject, render

    objects = (SceneObject("circle", "red", "large", 18, 32, 22), SceneObject("square", "blue", "large", 46, 32, 22))
    before = Image.fromarray(render(Scene("", None, objects, 64)))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 32:62] = 255
    pipe = Pipeline.from_pretrained("tiny-shapes", dtype=mx.float32)
    after = pipe.generate(PROMPT, seed=0, image=before, mask=Image.fromarray(mask), strength=0.9)[0]
    q = pipe.encode_image(before, 64, 64)
    kept = pipe.init_latents(q, pipe.posterior_noise(0, q.mean.shape))
    latent_keep = np.array(pipe.latent_mask(Image.fromarray(mask), 64, 64))[0, :, :, 0] == 0
    assert np.array_equal(np.array(pipe.last_latents)[0][latent_keep], np.array(kept)[0][latent_keep])
    round_trip = np.asarray(to_pil(pipe.vae.decode_latents(pipe.init_latents(q, None)))[0])
    keep = np.repeat((mask == 0)[..., None], 3, axis=-1)
    out_max, out_mean = known_region_errors(np.asarray(after), np.asarray(before), keep)
    vae_max, vae_mean = known_region_errors(round_trip, np.asarray(before), keep)
    print(f"known region vs input: max {out_max:.0f}, mean {out_mean:.2f} levels; VAE round trip: max {vae_max:.0f}, "
          f"mean {vae_mean:.2f}")
    assert out_mean <= 1.25 * vae_mean and out_max <= vae_max + 8


def test_generate_refuses_bad_masks_and_references(pics):
    """The same one-line errors from the Python API (the command checks before loading)."""
    pipe = klein()
    small = Image.new("L", (32, 32), 255)
    with pytest.raises(ValueError, match="the mask is 32x32 but the image 72x80"):
        pipe.generate(PROMPT, steps=1, image=pics["ref1"], mask=small)
    with pytest.raises(ValueError, match="colours"):
        pipe.generate(PROMPT, steps=1, image=pics["ref1"], mask=pics["ref1"])
    with pytest.raises(ValueError, match="at most 10 reference"):
        pipe.generate(PROMPT, steps=1, references=[pics["ref1"]] * 11)
    with pytest.raises(ValueError, match="--mask needs --image"):
        pipe.generate(PROMPT, steps=1, mask=small)
    with pytest.raises(ValueError, match="both sides must be at least 64 px"):
        pipe.generate(PROMPT, steps=1, references=[small])


@pytest.fixture(scope="module")
def sd3_qwen_pics():
    return {k: Image.fromarray(np.array(v)) for k, v in load_fixture("editing_sd3_qwen", "images.safetensors").items()}


def test_sd3_inpaint_matches_diffusers(sd3_qwen_pics):
    """StableDiffusion3InpaintPipeline (fixtures: tests/reference/editing_sd3_qwen.py): the 40x60 image
    resized to 32x48, the last 3 of 5 steps (strength 0.6), CFG 5 against "blurry". The pixels are
    compared with the final latents decoded as StableDiffusion3Pipeline decodes them; the inpainting
    pipeline's own output forgets the VAE's shift (SD3I:1368), and so does ours decoded that way."""
    from test_sd3_pipeline import pipeline as sd3_pipeline

    io = load_fixture("editing_sd3_qwen", "sd3.safetensors")
    pipe = sd3_pipeline()
    assert pipe.inpaint and pipe.init_posterior == "sample"
    images = pipe.generate(PROMPT, width=32, height=48, steps=5, guidance=5.0, negative_prompt="blurry",
                           image=sd3_qwen_pics["sd3_image"], mask=sd3_qwen_pics["sd3_mask"], strength=0.6,
                           latents=io["noise"], posterior_noise=io["eps"])
    assert_close("sd3 inpaint: final latents", pipe.last_latents, io["latents"], atol=2e-5)
    assert_close("sd3 inpaint: uint8 pixels", pixels(images), io["pixels"], atol=1)
    vae = pipe.vae.config
    unshifted = pipe.decode(pipe.last_latents - vae.shift_factor * vae.scaling_factor)  # decodes latents / scale
    from tiny_imagegen.models.pixels import to_pil

    assert_close("sd3 inpaint: uint8 pixels decoded without the shift, as the inpainting pipeline",
                 pixels(to_pil(unshifted)), io["inpaint_pipeline_pixels"], atol=1)
    shift_effect = np.abs(np.array(io["pixels"]) - np.array(io["inpaint_pipeline_pixels"])).max()
    print(f"sd3 inpaint: the forgotten shift moves the reference's pixels by up to {shift_effect:.0f} levels")
    # the known region (mask 0 on the latent grid) is the image's own latents: the posterior sample kept
    m = np.array(pipe.latent_mask(sd3_qwen_pics["sd3_mask"], 32, 48))[0, :, :, 0]
    x0 = pipe.init_latents(pipe.encode_image(sd3_qwen_pics["sd3_image"], 32, 48), io["eps"])
    assert 0 < m.sum() < m.size
    assert np.array_equal(np.array(pipe.last_latents)[0][m == 0], np.array(x0)[0][m == 0])


def test_qwen_image_inpaint_matches_diffusers(sd3_qwen_pics):
    """QwenImageInpaintPipeline: the 70x50 image resized to 80x48, the last 4 of 6 steps (strength
    0.8), true CFG 3 against "blurry"; the mask nearest on the 8x grid, then packed per token."""
    from test_qwen_image_pipeline import _pipe as qwen_pipeline

    io = load_fixture("editing_sd3_qwen", "qwen_image.safetensors")
    pipe = qwen_pipeline()
    assert pipe.inpaint and pipe.init_posterior == "sample"
    m = pipe.latent_mask(sd3_qwen_pics["qwen_mask"], 80, 48)
    assert_close("qwen-image inpaint: packed token mask", m, io["token_mask"], atol=0)
    sub = np.array(m[..., :4]).sum(-1)  # channel 0's four sub-positions per token
    assert (sub == 0).any() and (sub == 4).any() and ((sub > 0) & (sub < 4)).any()  # tokens kept, repainted, mixed
    images = pipe.generate(PROMPT, width=80, height=48, steps=6, guidance=3.0, negative_prompt="blurry",
                           image=sd3_qwen_pics["qwen_image"], mask=sd3_qwen_pics["qwen_mask"], strength=0.8,
                           latents=io["noise"], posterior_noise=io["eps"])
    assert_close("qwen-image inpaint: final packed latents", tokens(pipe), io["latents"], atol=5e-5)
    assert_close("qwen-image inpaint: uint8 pixels", pixels(images), io["pixels"], atol=1)
    x0 = pipe.init_latents(pipe.encode_image(sd3_qwen_pics["qwen_image"], 80, 48), io["eps"])
    keep = np.array(m).reshape(-1) == 0
    assert np.array_equal(np.array(tokens(pipe)).reshape(-1)[keep], np.array(x0).reshape(-1)[keep])


def test_sd3_and_qwen_image_take_image_and_mask_but_no_references():
    """The command asks the class before loading: both inpaint and do image-to-image, neither reads --ref."""
    from tiny_imagegen.pipelines.qwen_image import QwenImagePipeline
    from tiny_imagegen.pipelines.sd3 import SD3Pipeline

    for cls in (SD3Pipeline, QwenImagePipeline):
        assert cls.refusal(True, True, 0) is None and cls.refusal(True, False, 0) is None
        assert "takes no reference images" in cls.refusal(False, False, 1, "m")
        assert cls.refusal(False, True, 0) == "--mask needs --image: the image to inpaint"


@pytest.mark.parametrize("family", ["sd3", "qwen_image"])
def test_sd3_and_qwen_image_inpaint_bf16(sd3_qwen_pics, family):
    """The same runs in bf16 (ε and noise drawn in bf16, as torch's): ours no further from the fp32
    reference than torch's bf16 run, within BF16_FACTOR."""
    from test_qwen_image_pipeline import _pipe as qwen_pipeline
    from test_sd3_pipeline import pipeline as sd3_pipeline

    io = load_fixture("editing_sd3_qwen", f"{family}.safetensors")
    if family == "sd3":
        pipe, size, strength, steps, key = sd3_pipeline(mx.bfloat16), dict(width=32, height=48), 0.6, 5, "sd3"
    else:
        pipe, size, strength, steps, key = qwen_pipeline(mx.bfloat16), dict(width=80, height=48), 0.8, 6, "qwen"
    pipe.generate(PROMPT, **size, steps=steps, guidance=5.0 if family == "sd3" else 3.0, negative_prompt="blurry",
                  image=sd3_qwen_pics[f"{key}_image"], mask=sd3_qwen_pics[f"{key}_mask"], strength=strength,
                  latents=io["noise_bf16"], posterior_noise=io["eps_bf16"])
    assert pipe.last_latents.dtype == mx.bfloat16  # both keep the latents in the model dtype
    ours = pipe.last_latents if family == "sd3" else tokens(pipe)
    check_bf16(f"{family} inpaint", ours, io["latents"], io["latents_bf16"])
