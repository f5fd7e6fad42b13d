"""FLUX.1's other pipeline paths against diffusers (fixtures: tests/reference/flux_paths.py): true
classifier-free guidance against FluxPipeline(true_cfg_scale, negative_prompt), batched ([pos; neg]
in one forward) and unbatched (a second forward), and image-to-image against FluxImg2ImgPipeline
(the init image's latents, the noise mixed in at the first kept step, the tail of the schedule)."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from conftest import assert_close, load_fixture
from test_pipeline import hub_folder
from tiny_imagegen.layers.embeddings import pack_latents
from tiny_imagegen.pipelines.pipeline import Pipeline

PROMPTS = ["a red circle to the left of a blue square", "Ein Café in Tōkyō"]
NEGATIVE = "a blurry photo"
TRUE_CFG = {"schnell_like": 3.0, "dev_like": 2.0}
GUIDANCE = {"schnell_like": 0.0, "dev_like": 3.5}


@pytest.fixture(scope="module")
def io():
    return load_fixture("flux_paths", "io.safetensors")


def _pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def _ref_pixels(images):
    return np.round(np.array(images.transpose(0, 2, 3, 1)) * 255).astype(np.int16)


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("variant", ["schnell_like", "dev_like"])
def test_true_cfg_matches_diffusers(tmp_path, io, variant, batch_cfg):
    noise = load_fixture("flux_pipeline", variant, "io.safetensors")["noise"].transpose(0, 2, 3, 1)
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path, variant)), dtype=mx.float32)
    if variant == "dev_like":  # distilled: `guidance` is the model input, `true_cfg` the CFG scale
        kw = dict(guidance=GUIDANCE[variant], true_cfg=TRUE_CFG[variant])
    else:  # no guidance input: `guidance` > 1 is the CFG scale
        kw = dict(guidance=TRUE_CFG[variant])
    images = pipe.generate(PROMPTS, width=48, height=32, steps=3, negative_prompt=NEGATIVE, latents=noise,
                           batch_cfg=batch_cfg, **kw)
    name = f"flux1 true cfg {variant} (batch_cfg={batch_cfg})"
    # three steps of the tiny transformer, each two forwards, x3 (or x2) amplified by the guidance
    assert_close(f"{name}: final latents", pack_latents(pipe.last_latents), io[f"{variant}.cfg.latents"], atol=2e-5)
    assert_close(f"{name}: uint8 pixels", _pixels(images), _ref_pixels(io[f"{variant}.cfg.images"]), atol=1)


@pytest.mark.parametrize("variant", ["schnell_like", "dev_like"])
def test_image_to_image_matches_diffusers(tmp_path, io, variant):
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path, variant)), dtype=mx.float32)
    init = Image.fromarray(np.array(io["init_pixels"]).astype(np.uint8))
    # the reference was asked for the posterior's mode (sample_mode="argmax"): ours given eps = 0
    posterior = pipe.encode_image(init, 48, 32)
    assert_close(f"flux1 img2img {variant}: init latents", pipe.init_latents(posterior, None),
                 io[f"{variant}.img2img.init_latents"].transpose(0, 2, 3, 1), atol=1e-5)
    seen = []
    noise = io[f"{variant}.img2img.noise"].transpose(0, 2, 3, 1)
    images = pipe.generate(PROMPTS, width=48, height=32, steps=5, strength=0.6, image=init,
                           guidance=GUIDANCE[variant], latents=noise, progress=lambda i, n, s: seen.append(n),
                           posterior_noise=mx.zeros((noise.shape[0], *posterior.mean.shape[1:])))
    assert seen == [3, 3, 3]  # the last round(5 * 0.6) steps
    assert_close(f"flux1 img2img {variant}: final latents", pack_latents(pipe.last_latents),
                 io[f"{variant}.img2img.latents"], atol=1e-5)
    assert_close(f"flux1 img2img {variant}: uint8 pixels", _pixels(images),
                 _ref_pixels(io[f"{variant}.img2img.images"]), atol=1)


def test_a_cfg_scale_of_one_or_less_is_off(tmp_path):
    """FluxPipeline's do_true_cfg is true_cfg_scale > 1: schnell's documented guidance_scale=0.0
    must not run CFG at scale 0 (the negative prompt's prediction alone; fixed with this test)."""
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path, "schnell_like")), dtype=mx.float32)
    assert [pipe.uses_negative(g, {}) for g in (0.0, 0.5, 1.0, 1.5)] == [False, False, False, True]
    dev = Pipeline.from_pretrained(str(hub_folder(tmp_path / "dev", "dev_like")), dtype=mx.float32)
    assert [dev.uses_negative(3.5, {"true_cfg": s}) for s in (0.0, 1.0, 2.0)] == [False, False, True]
