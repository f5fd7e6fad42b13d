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
from tiny_imagegen.pipeline import Pipeline
from tiny_imagegen.step_cache import CacheConfig, FirstBlockCache, relative_change


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
    (state,) = pipe.step_cache
    print(f"threshold {threshold}: skipped {state.skipped[0]}")
    assert state.skipped[0] == _steps(io[f"skipped_{threshold}"])
    assert len(state.skipped[0]) >= 10  # the fixture is one where caching acts
    assert_close(f"fbc:{threshold} final latents (20 steps)", latents, io[f"latents_{threshold}"], atol=2e-5)
    again = _run(pipe, io, f"fbc:{threshold}")  # state is per generation: a rerun is identical
    assert pipe.step_cache[0].skipped == state.skipped and np.array_equal(np.array(again), np.array(latents))


def test_without_cache_and_at_threshold_zero_every_step_is_computed(pipe):
    io = load_fixture("step_cache", "io.safetensors")
    assert_close("no cache: final latents", _run(pipe, io, None), io["latents_none"], atol=2e-5)
    assert _run(pipe, io, "fbc:0") is not None and pipe.step_cache[0].skipped == [[]]
    assert_close("fbc:0 == no cache", pack_latents(pipe.last_latents), io["latents_none"], atol=2e-5)


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_true_cfg_positive_and_negative_decide_apart_as_diffusers_contexts(pipe, batch_cfg):
    io = load_fixture("step_cache", "io.safetensors")
    latents = _run(pipe, io, "fbc:0.1", negative_prompt="blurry", true_cfg=2.0, batch_cfg=batch_cfg)
    skipped = ([s for state in pipe.step_cache for s in state.skipped] if not batch_cfg
               else pipe.step_cache[0].skipped)
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
    assert state.skipped == [[1, 2, 3]]  # the head's residual is always 1: never changes
    # skipped: head output + (rest - head) of step 0 = (s + 1) + ((1 + 1) * 2 + 0 - 2)
    assert np.allclose(np.array(outs[2][0]), 3.0 + 1 + 2.0) and np.allclose(np.array(outs[2][1]), 2.0 + 4.0)
    assert relative_change(mx.array([2.0, 2.0]), mx.array([1.0, 1.0])) == 1.0
