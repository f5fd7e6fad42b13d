"""Step caching (step_cache.py) against diffusers' First-Block Cache hook on a tiny FluxPipeline:
the same steps skipped and the same final latents at three thresholds, and with true CFG, where the
positive and negative passes decide apart as diffusers' "cond"/"uncond" contexts do. Then what
diffusers cannot run (its hook fails on FLUX.2, Z-Image and DiT): the same rule there, checked
against running the blocks by hand. Fixture: tests/reference/step_cache.py."""

import shutil

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, fixture_path, load_fixture
from tiny_imagegen.layers.embeddings import pack_latents
from tiny_imagegen.pipelines.pipeline import Pipeline
from tiny_imagegen.diffusion.step_cache import CacheConfig, FirstBlockCache, relative_change


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fbc") / "FLUX.1-tiny-fbc"
    text = fixture_path("text_encoders", "flux")
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(text / part, folder / part)
    shutil.copytree(fixture_path("flux_pipeline", "vae"), folder / "vae")
    for part in ("transformer", "scheduler"):
        shutil.copytree(fixture_path("step_cache", part), folder / part)
    return Pipeline.from_pretrained(str(folder), dtype=mx.float32, keep_text_encoders=True)


def _run(pipe, io, cache, **kw):
    pipe.generate("a red cube", width=32, height=32, steps=20, guidance=3.5, cache=cache,
                  latents=io["noise"].transpose(0, 2, 3, 1), **kw)
    return pack_latents(pipe.last_latents)


def _steps(mask) -> list[int]:
    return [i for i, v in enumerate(np.array(mask).tolist()) if v]


@pytest.mark.parametrize("threshold", ["0.05", "0.1", "0.2"])
def test_fbc_skips_the_steps_diffusers_skips_with_the_same_latents(pipe, threshold):
    io = load_fixture("step_cache", "io.safetensors")
    latents = _run(pipe, io, f"fbc:{threshold}")
    (state,) = pipe.step_cache.states
    print(f"threshold {threshold}: skipped {state.skipped}")
    assert state.skipped == _steps(io[f"skipped_{threshold}"])
    assert len(state.skipped) >= 10  # the fixture is one where caching acts
    assert_close(f"fbc:{threshold} final latents (20 steps)", latents, io[f"latents_{threshold}"], atol=2e-5)
    again = _run(pipe, io, f"fbc:{threshold}")  # state is per generation: a rerun is identical
    assert pipe.step_cache.states[0].skipped == state.skipped and np.array_equal(np.array(again), np.array(latents))


def check_guided_cache(pipe, run: dict) -> None:
    """A guided 3-step run: threshold 0 computes every step (bit-identical to no cache, one state per
    guidance pass); a threshold that always skips skips steps 1 and 2 in both passes, batched and
    unbatched alike, and changes the result."""
    pipe.generate(**run)
    plain = np.array(pipe.last_latents)
    pipe.generate(**run, cache="fbc:0")
    assert np.array_equal(np.array(pipe.last_latents), plain)
    assert [s.skipped for s in pipe.step_cache.states] == [[], []]
    skipped = {}
    for batch_cfg in (True, False):
        pipe.generate(**run, cache=CacheConfig("fbc", 1e9), batch_cfg=batch_cfg)
        skipped[batch_cfg] = (np.array(pipe.last_latents), [s.skipped for s in pipe.step_cache.states])
    assert skipped[True][1] == skipped[False][1] == [[1, 2], [1, 2]]
    assert np.abs(skipped[True][0] - skipped[False][0]).max() < 1e-5
    assert np.abs(skipped[True][0] - plain).max() > 1e-4  # skipping changed the result


def test_without_cache_and_at_threshold_zero_every_step_is_computed(pipe):
    io = load_fixture("step_cache", "io.safetensors")
    assert_close("no cache: final latents", _run(pipe, io, None), io["latents_none"], atol=2e-5)
    assert _run(pipe, io, "fbc:0") is not None and pipe.step_cache.states[0].skipped == []
    assert_close("fbc:0 == no cache", pack_latents(pipe.last_latents), io["latents_none"], atol=2e-5)


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_true_cfg_positive_and_negative_decide_apart_as_diffusers_contexts(pipe, batch_cfg):
    io = load_fixture("step_cache", "io.safetensors")
    latents = _run(pipe, io, "fbc:0.1", negative_prompt="blurry", true_cfg=2.0, batch_cfg=batch_cfg)
    skipped = [state.skipped for state in pipe.step_cache.states]
    assert skipped == [_steps(io["skipped_cfg_cond"]), _steps(io["skipped_cfg_uncond"])]
    assert_close(f"fbc:0.1 true CFG (batched {batch_cfg}) final latents", latents, io["latents_cfg"], atol=2e-5)


def test_cache_spec_parsing():
    assert CacheConfig.parse("fbc") == CacheConfig("fbc", 0.05)
    assert str(CacheConfig.parse("FBC:0.12")) == "fbc:0.12"
    assert CacheConfig.parse(None) is None and CacheConfig.parse("none") is None
    for bad, says in (("teacache", "unknown cache method"), ("fbc:x", "not a number"), ("fbc:-1", ">= 0")):
        with pytest.raises(ValueError, match=says):
            CacheConfig.parse(bad)


def test_the_rule_by_hand_on_a_toy_stack():
    """Residual bookkeeping, independent of any model: blocks add known amounts."""
    head = lambda i, t: (i + 1.0, t + 2.0)  # noqa: E731
    state = FirstBlockCache(threshold=0.5)
    outs = []
    for k, scale in enumerate((1.0, 1.1, 3.0, 3.2)):  # relative change of the head residual: -, 0, 0, 0
        rest = lambda i, t, k=k: (i * 2 + k, t * 3 - k)  # noqa: E731
        img, txt = mx.full((1, 2, 2), scale), mx.zeros((1, 1, 2))
        outs.append(state(img, txt, head, rest))
    assert state.skipped == [1, 2, 3]  # the head's residual is always 1: never changes
    # skipped: head output + (rest - head) of step 0 = (s + 1) + ((1 + 1) * 2 + 0 - 2)
    assert np.allclose(np.array(outs[2][0]), 3.0 + 1 + 2.0) and np.allclose(np.array(outs[2][1]), 2.0 + 4.0)
    assert relative_change(mx.array([2.0, 2.0]), mx.array([1.0, 1.0])) == 1.0


def _flux2():
    from tiny_imagegen.models.flux2 import Flux2Config, Flux2Transformer

    model = Flux2Transformer(Flux2Config(in_channels=16, num_heads=2, head_dim=16, depth_double=2, depth_single=2,
                                         context_dim=24, axes_dim=(4, 4, 4, 4)))
    mx.eval(model.parameters())
    return model


def _mmdit_single_stream():
    from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig

    model = MMDiT(MMDiTConfig(in_channels=16, num_heads=2, head_dim=16, depth_double=0, depth_single=3,
                              context_dim=24, vec_dim=8, axes_dim=(4, 6, 6)))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("family", ["flux2", "mmdit-single-stream"])
def test_the_same_rule_where_diffusers_hook_fails(family):
    """FLUX.2 (diffusers' hook raises on its single-block tail) and a single-stream MM-DiT: cached with
    every step computed == uncached bit for bit; a skipped step == first block + the remembered
    residual of the rest, recomputed here by hand from the model's own blocks."""
    model = _flux2() if family == "flux2" else _mmdit_single_stream()
    k = mx.random.key(3)
    img, txt = mx.random.normal((2, 6, 16), key=k), mx.random.normal((2, 5, 24), key=mx.random.key(4))
    if family == "flux2":
        txt_ids, img_ids = model.position_ids(2, 3, 5)
        call = lambda x, t, cache=None: model(x, img_ids, txt, txt_ids, mx.array([t, t]), cache=cache)  # noqa: E731
    else:
        txt_ids, img_ids = model.position_ids(2, 3, 5)
        y = mx.random.normal((2, 8), key=k)
        call = lambda x, t, cache=None: model(x, img_ids, txt, txt_ids, mx.array([t, t]), y, cache=cache)  # noqa: E731
    always = FirstBlockCache(threshold=-1.0)
    for t in (0.9, 0.8):
        assert np.array_equal(np.array(call(img, t, always)), np.array(call(img, t)))
    assert always.skipped == []
    never = FirstBlockCache(threshold=float("inf"))
    call(img, 0.9, never)  # computes, remembers the rest's residual
    img2 = img + 0.01
    skipped = call(img2, 0.8, never)
    assert never.skipped == [1]
    # by hand: the residual of blocks 1.. at step 0, added to block 0's output at step 1
    grab = {}
    original = model.blocks

    def spy(i, t, *a, **kw):
        out = original(i, t, *a, **kw)
        grab.setdefault(len(grab), (i, t, out))
        return out

    model.blocks = spy
    try:
        call(img, 0.9, FirstBlockCache(threshold=-1.0))  # grab[0]: head at step 0, grab[1]: rest at step 0
        head0_out, rest0_out = grab[0][2], grab[1][2]
        grab.clear()
        call(img2, 0.8, FirstBlockCache(threshold=-1.0))
        head1_out = grab[0][2]
    finally:
        del model.blocks
    tail = [r - h for r, h in zip(rest0_out, head0_out)]
    by_hand = [h + r for h, r in zip(head1_out, tail)]
    final = model.final_layer(by_hand[0], model.conditioning(mx.array([0.8, 0.8]), *((None,) if family == "flux2" else (y, None))))
    assert np.allclose(np.array(skipped), np.array(final), atol=1e-6)


@pytest.mark.parametrize("spec, ran", [("fbc:0.2", ""), ("mag:0.2", ": all blocks ran on 4/8, 4/8")])
def test_cli_cache_flag_is_stored_in_the_png_and_replayed(tmp_path, spec, ran):
    from PIL import Image

    from test_commands import cli

    first = tmp_path / "a.png"
    r = cli("--prompt", "a red circle", "--steps", 8, "--cache", spec, "--output", first, "--verbose")
    assert r.returncode == 0, r.stderr
    assert Image.open(first).text["cache"] == spec and f"step cache {spec}{ran}" in r.stderr
    again = tmp_path / "b.png"
    assert cli("--config-from-metadata", first, "--output", again).returncode == 0
    assert Image.open(again).text["cache"] == spec
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_cli_refuses_an_unknown_cache_method(tmp_path):
    from test_commands import cli

    r = cli("--prompt", "x", "--cache", "teacache", "--output", tmp_path / "c.png")
    assert r.returncode == 2 and r.stderr.startswith("error: --cache: unknown cache method") and r.stderr.count("\n") == 1
    assert not (tmp_path / "c.png").exists()


def test_zimage_main_layers_follow_the_same_rule():
    """Z-Image (diffusers' hook cannot run on it): all computed == uncached bit for bit; the same
    input twice skips the second time and gives the computed output again (first layer + the
    remembered residual of the rest), with only the first main layer run."""
    from test_zimage import inputs, model

    m = model()
    latents, t, feats, lengths = inputs(load_fixture("zimage", "tiny", "io.safetensors"), "mask")
    full = m(latents, t, feats, lengths)
    always = FirstBlockCache(threshold=-1.0)
    assert np.array_equal(np.array(m(latents, t, feats, lengths, cache=always)), np.array(full))
    state = FirstBlockCache(threshold=0.05)
    m(latents, t, feats, lengths, cache=state)
    ran = {}
    again = m(latents, t, feats, lengths, capture=ran, cache=state)
    assert state.skipped == [1] and [k for k in ran if k.startswith("layers.")] == ["layers.0"]
    assert_close("z-image skipped step == computed step for the same input", again, full, atol=1e-5)


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_pipelines_keep_one_context_per_guidance_pass(tmp_path, family):
    """FLUX.2 and Z-Image pipelines with guidance: threshold 0 computes every step (== no cache, bit
    for bit); a huge threshold skips every step after each context's first, batched or not, and
    batched and unbatched guidance give the same images."""
    if family == "flux2":
        from test_flux2_pipeline import PROMPTS, repo

        io = load_fixture("flux2_pipeline", "io.safetensors")
        pipe = Pipeline.from_pretrained(str(repo(tmp_path, "base")), dtype=mx.float32)
        run = dict(prompt=PROMPTS, width=48, height=32, latents=io["noise"], steps=3, guidance=4.0)
    else:
        from test_zimage_pipeline import conditioning, hub_folder

        io = load_fixture("zimage", "pipeline", "io.safetensors")
        pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path)), dtype=mx.float32)
        run = dict(conditioning=conditioning(io, True), width=48, height=32, steps=3, guidance=1.5,
                   latents=io["noise"].transpose(0, 2, 3, 1))
    check_guided_cache(pipe, run)


def test_dit_follows_the_same_rule():
    """DiT (class-conditional, guidance batched as [labels; null class]): threshold 0 == no cache bit
    for bit; a huge threshold skips every step after the first for both contexts, and the same input
    twice gives the computed output again with only the first block run."""
    from test_dit_pipeline import _pipe

    pipe = _pipe()
    run = dict(prompt=["207", "1"], steps=3, guidance=4.0, seed=3)
    pipe.generate(**run)
    plain = np.array(pipe.last_latents)
    pipe.generate(**run, cache="fbc:0")
    assert np.array_equal(np.array(pipe.last_latents), plain)
    pipe.generate(**run, cache=CacheConfig("fbc", 1e9))
    assert [s.skipped for s in pipe.step_cache.states] == [[1, 2], [1, 2]]
    assert np.abs(np.array(pipe.last_latents) - plain).max() > 1e-4
    m = pipe.transformer
    x = mx.random.normal((2, 4, 4, m.config.in_channels), key=mx.random.key(0))
    t, y = mx.array([500.0, 500.0]), mx.array([207, 1])
    state = FirstBlockCache(threshold=0.05)
    full = m(x, t, y, cache=state)
    assert_close("dit skipped step == computed step for the same input", m(x, t, y, cache=state), full, atol=1e-5)
    assert state.skipped == [1]


# ---- Qwen-Image: diffusers' hook runs on QwenImagePipeline (tests/reference/step_cache_qwen_image.py) --


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fbc-qwen") / "Qwen-Image-tiny-fbc"
    shutil.copytree(fixture_path("qwen_image_pipeline", "repo"), folder)
    shutil.rmtree(folder / "transformer")
    shutil.copytree(fixture_path("step_cache_qwen_image", "transformer"), folder / "transformer")
    return Pipeline.from_pretrained(str(folder), dtype=mx.float32, keep_text_encoders=True)


def _run_qwen(pipe, io, cache, **kw):
    pipe.generate("a red cat sitting on a mat", width=80, height=48, steps=20, cache=cache,
                  latents=io["noise"].reshape(1, 3, 5, 16), **{"guidance": 1.0, **kw})
    return pipe.last_latents.reshape(1, 15, 16)


@pytest.mark.parametrize("threshold", ["0.05", "0.1", "0.2"])
def test_qwen_image_fbc_skips_the_steps_diffusers_skips_with_the_same_latents(qwen, threshold):
    io = load_fixture("step_cache_qwen_image", "io.safetensors")
    latents = _run_qwen(qwen, io, f"fbc:{threshold}")
    (state,) = qwen.step_cache.states
    print(f"qwen-image threshold {threshold}: skipped {state.skipped}")
    assert state.skipped == _steps(io[f"skipped_{threshold}"])
    assert len(state.skipped) >= 5  # the fixture is one where caching acts
    assert_close(f"qwen-image fbc:{threshold} final latents (20 steps)", latents, io[f"latents_{threshold}"], atol=5e-5)
    again = _run_qwen(qwen, io, f"fbc:{threshold}")
    assert qwen.step_cache.states[0].skipped == state.skipped and np.array_equal(np.array(again), np.array(latents))


def test_qwen_image_without_cache_and_at_threshold_zero(qwen):
    io = load_fixture("step_cache_qwen_image", "io.safetensors")
    plain = _run_qwen(qwen, io, None)
    assert_close("qwen-image no cache: final latents", plain, io["latents_none"], atol=5e-5)
    zero = _run_qwen(qwen, io, "fbc:0")
    assert qwen.step_cache.states[0].skipped == [] and np.array_equal(np.array(zero), np.array(plain))


def test_qwen_image_true_cfg_contexts_as_diffusers(qwen):
    """QwenImagePipeline runs "cond" and "uncond" forwards in contexts of their own: so do we."""
    io = load_fixture("step_cache_qwen_image", "io.safetensors")
    latents = _run_qwen(qwen, io, "fbc:0.1", guidance=3.0, negative_prompt="blurry")
    skipped = [state.skipped for state in qwen.step_cache.states]
    print(f"qwen-image true CFG fbc:0.1: skipped {skipped}")
    assert skipped == [_steps(io["skipped_cfg_cond"]), _steps(io["skipped_cfg_uncond"])]
    assert_close("qwen-image fbc:0.1 true CFG final latents", latents, io["latents_cfg"], atol=5e-5)


# ---- SD3.5: diffusers' hook cannot run (no cache_context in its loop): the same rule, by hand ------


def _sd3_model():
    from tiny_imagegen.models.sd3 import SD3Config, SD3Transformer

    m = SD3Transformer(SD3Config(num_heads=2, head_dim=16, depth=4, context_dim=24, pooled_dim=8, pos_embed_max_size=8,
                                 sample_size=8, dual_attention_layers=(0, 1)))  # MMDiT-X head, pre-only tail
    m.pos_embed = mx.random.normal(m.pos_embed.shape, key=mx.random.key(7))
    mx.eval(m.parameters())
    return m


def test_sd3_follows_the_same_rule():
    """Every step computed == uncached bit for bit; a skipped step == the first block's output + the
    residual the remaining blocks added on the last computed step, recomputed from the model's own
    blocks (block 0 an MMDiT-X block, the last a pre-only one)."""
    from tiny_imagegen.models.sd3 import pack_latents as sd3_pack, unpatchify

    m = _sd3_model()
    x = mx.random.normal((2, 6, 8, 16), key=mx.random.key(1))
    txt, pooled = mx.random.normal((2, 5, 24), key=mx.random.key(2)), mx.random.normal((2, 8), key=mx.random.key(3))
    call = lambda x, s, cache=None: m(x, txt, mx.array([s, s]), pooled, cache=cache)  # noqa: E731
    always = FirstBlockCache(threshold=-1.0)
    for s in (0.9, 0.8):
        assert np.array_equal(np.array(call(x, s, always)), np.array(call(x, s)))
    assert always.skipped == []
    never = FirstBlockCache(threshold=float("inf"))
    call(x, 0.9, never)
    x2 = x + 0.01
    skipped = call(x2, 0.8, never)
    assert never.skipped == [1]

    def streams(x, s):  # the embedded streams and c, as SD3Transformer.__call__ builds them
        from tiny_imagegen.models.sd3 import crop_positions

        img = m.x_embedder(sd3_pack(x, 2)) + crop_positions(m.pos_embed, 8, 3, 4)
        return img, m.context_embedder(txt), m.conditioning(mx.array([s, s]), pooled)

    img0, t0, c0 = streams(x, 0.9)
    head0 = m.double_blocks[0](img0, t0, c0)
    i, t = head0
    for block in m.double_blocks[1:]:
        i, out = block(i, t, c0)
        t = t if out is None else out
    tail_img = i - head0[0]
    img1, t1, c1 = streams(x2, 0.8)
    head1 = m.double_blocks[0](img1, t1, c1)
    by_hand = unpatchify(m.final_layer(head1[0] + tail_img, c1), 6, 8, 2)
    err = np.abs(np.array(skipped) - np.array(by_hand)).max()
    print(f"sd3 skipped step vs by hand: max |diff| = {err:.2e}")
    assert err < 1e-6


@pytest.mark.parametrize("extra", [{}, {"slg": (1,), "slg_stop": 0.9}])
def test_sd3_pipeline_contexts_per_guidance_pass(extra):
    """SD3 pipeline with CFG ([negative; positive] batched, or two passes): threshold 0 == no cache bit
    for bit; a huge threshold skips every step after each context's first, batched and unbatched
    alike; the skip-layer pass is never cached."""
    from test_sd3_pipeline import PROMPTS, pipeline

    io = load_fixture("sd3_pipeline", "io.safetensors")
    pipe = pipeline(keep_text_encoders=True)
    run = dict(prompt=PROMPTS, width=32, height=48, steps=3, guidance=5.0, latents=io["noise"].transpose(0, 2, 3, 1),
               **extra)
    check_guided_cache(pipe, run)


@pytest.mark.parametrize("repo", ["sd3_pipeline", "qwen_image_pipeline"])
def test_cli_cache_flag_on_sd3_and_qwen_image(tmp_path, repo, capsys):
    from PIL import Image

    from tiny_imagegen.commands.generate import main

    out = tmp_path / "a.png"
    assert main(["--model", str(fixture_path(repo, "repo")), "--prompt", "a red cat", "--steps", "4", "--width", "32",
                 "--height", "32", "--guidance", "3", "--cache", "fbc:1e9", "--output", str(out), "--verbose"]) == 0
    assert Image.open(out).text["cache"] == "fbc:1e+09"
    assert "step cache fbc:1e+09: the remaining blocks ran on 1/4, 1/4 forwards" in capsys.readouterr().err
