"""MagCache (diffusion/mag_cache.py) against diffusers' MagCache hook on the tiny FluxPipeline of
test_step_cache.py: the same steps skipped and the same final latents at thresholds 0 / 0.06 / 0.1 /
0.2 and with other K / retention, with FLUX.1's ratios (resampled 28 -> 20 as the hook does); with
true CFG, "cond" and "uncond" as diffusers' contexts (batched and unbatched); calibration records
the ratios the hook prints. Then the rule by hand, the families diffusers' hook does not cover, the
model defaults that hold the ratios, and the command line. Fixture: tests/reference/mag_cache.py."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, load_fixture
from test_step_cache import _run, _steps, pipe  # noqa: F401  (the module-scoped tiny FLUX.1 pipeline)
from tiny_imagegen.diffusion.mag_cache import MagCache, nearest_interp
from tiny_imagegen.diffusion.step_cache import CacheConfig, check_method, for_generation
from tiny_imagegen.registry import find
from tiny_imagegen.registry.catalog import FLUX1_MAG_RATIOS

STEP_CACHE_IO = ("step_cache", "io.safetensors")  # the same model and noise; its uncached latents


def _mag(threshold, **kw):
    return CacheConfig("mag", threshold, mag_ratios=FLUX1_MAG_RATIOS, **kw)


# "mag": the folder's defaults (a dev-like FLUX.1 folder the registry does not know: FLUX.1-dev's, ratios
# included) and the default threshold 0.06
@pytest.mark.parametrize("name, config", [("0", _mag(0.0)), ("0.06", "mag"), ("0.1", _mag(0.1)),
                                          ("0.2", _mag(0.2)), ("k1_0.2", _mag(0.2, max_skip_steps=1, retention_ratio=0.3))])
def test_mag_skips_the_steps_diffusers_skips_with_the_same_latents(pipe, name, config):  # noqa: F811
    io, ref = load_fixture(*STEP_CACHE_IO), load_fixture("mag_cache", "io.safetensors")
    latents = _run(pipe, io, config)
    (state,) = pipe.step_cache.states
    print(f"MagCache {name}: skipped {state.skipped}")
    assert state.skipped == _steps(ref[f"skipped_{name}"])
    assert len(state.skipped) >= (3 if name == "0" else 7)  # the fixture is one where caching acts
    assert_close(f"mag {name} final latents (20 steps)", latents, ref[f"latents_{name}"], atol=2e-5)
    again = _run(pipe, io, config)  # state is per generation: a rerun is identical
    assert pipe.step_cache.states[0].skipped == state.skipped and np.array_equal(np.array(again), np.array(latents))


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_true_cfg_contexts_as_diffusers(pipe, batch_cfg):  # noqa: F811
    io, ref = load_fixture(*STEP_CACHE_IO), load_fixture("mag_cache", "io.safetensors")
    latents = _run(pipe, io, _mag(0.1), negative_prompt="blurry", true_cfg=2.0, batch_cfg=batch_cfg)
    skipped = [state.skipped for state in pipe.step_cache.states]
    assert skipped == [_steps(ref["skipped_cfg_cond"]), _steps(ref["skipped_cfg_uncond"])]
    assert_close(f"mag 0.1 true CFG (batched {batch_cfg}) final latents", latents, ref["latents_cfg"], atol=2e-5)


def test_calibration_records_the_ratios_diffusers_prints(pipe):  # noqa: F811
    io, ref = load_fixture(*STEP_CACHE_IO), load_fixture("mag_cache", "io.safetensors")
    latents = _run(pipe, io, "mag:calibrate")  # no ratios needed, nothing skipped
    (state,) = pipe.step_cache.states
    assert state.skipped == [] and len(state.measured) == 20
    assert_close("no cache: final latents", latents, io["latents_none"], atol=2e-5)
    err = np.abs(np.array(state.measured) - np.array(ref["calibration"])).max()
    print(f"calibrated ratios vs the hook's: max |diff| {err:.2e} (ratios {min(state.measured):.4f}..{max(state.measured):.4f})")
    assert err < 1e-5


def test_retention_one_is_no_cache_bit_for_bit(pipe):  # noqa: F811
    io = load_fixture(*STEP_CACHE_IO)
    plain = np.array(_run(pipe, io, None))
    cached = np.array(_run(pipe, io, _mag(1e9, retention_ratio=1.0)))
    assert [s.skipped for s in pipe.step_cache.states] == [[]] and np.array_equal(cached, plain)
    # threshold 0 skips only where the accumulated ratio is exactly 1 (test above: FLUX.1's 1.0 entries);
    # with ratios that are never exactly 1 it computes every step
    cached = np.array(_run(pipe, io, CacheConfig("mag", 0.0, mag_ratios=tuple(np.linspace(1.01, 0.9, 28)))))
    assert [s.skipped for s in pipe.step_cache.states] == [[]] and np.array_equal(cached, plain)


def test_ratios_resampled_as_diffusers():
    ref = load_fixture("mag_cache", "io.safetensors")
    for n in (1, 7, 20, 50):
        assert np.array_equal(nearest_interp(FLUX1_MAG_RATIOS, n), np.array(ref[f"interp_{n}"])), n


def test_the_models_ratios_live_in_their_defaults():
    """FLUX.1's are diffusers' FLUX_MAG_RATIOS; the tiny model's (calibrated, 20 steps) are read from
    its model.json and equal the registry's; families without ratios refuse `mag` in one line."""
    ref = load_fixture("mag_cache", "io.safetensors")
    for name in ("flux1-dev", "flux1-schnell"):
        assert np.array_equal(np.array(find(name).defaults.mag_ratios, np.float32), np.array(ref["flux_mag_ratios"]))
    tiny = find("tiny-shapes").defaults.mag_ratios
    manifest = json.loads((find_tiny_folder() / "model.json").read_text())
    assert tuple(manifest["pipeline"]["defaults"]["mag_ratios"]) == tiny and len(tiny) == 20 and tiny[0] == 1.0
    for name in ("sd35-medium", "qwen-image", "z-image-turbo", "flux1-kontext-dev"):
        assert find(name).defaults.mag_ratios is None
        with pytest.raises(ValueError, match="mag_ratios"):
            check_method("mag:0.1", find(name).defaults.mag_ratios)
    check_method("mag:calibrate", None)  # calibration needs none
    check_method("fbc", None)


def find_tiny_folder():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "weights" / "tiny-shapes"


def test_cache_spec_parsing():
    assert CacheConfig.parse("mag") == CacheConfig("mag", 0.06) == CacheConfig("mag")  # diffusers' default
    assert CacheConfig("fbc").threshold == 0.05
    with pytest.raises(ValueError, match="number of steps"):
        CacheConfig("mag", mag_ratios=(1.0, 0.9)).new_generation(0)
    assert str(CacheConfig.parse("MAG:0.12")) == "mag:0.12" and str(CacheConfig.parse("mag:calibrate")) == "mag:calibrate"
    assert CacheConfig.parse("mag:calibrate").calibrate
    for bad, says in (("mag:x", "not a number"), ("mag:-1", ">= 0"), ("magcache", "unknown cache method")):
        with pytest.raises(ValueError, match=says):
            CacheConfig.parse(bad)


def test_the_retained_share_is_the_models_unless_the_config_sets_it():
    """`mag_retention` (the model's defaults) decides how many first steps are computed; a
    CacheConfig's own retention_ratio wins; the default is diffusers' 0.2."""
    ratios = (1.0,) * 10
    assert for_generation("mag:0.5", False, 10, ratios).positive.retention_ratio == 0.2
    caches = for_generation("mag:0.5", True, 10, ratios, mag_retention=0.5)
    assert [st.retention_ratio for st in caches.states] == [0.5, 0.5]
    assert for_generation(CacheConfig("mag", 0.5, retention_ratio=0.1), False, 10, ratios, 0.5).positive.retention_ratio == 0.1
    state = for_generation("mag:1e9", False, 10, ratios, mag_retention=0.5).positive  # 5 retained, then K = 3 skips
    for _ in range(10):
        state(mx.zeros((1, 2, 2)), mx.zeros((1, 1, 2)), lambda i, t: (i, t), lambda i, t: (i + 1, t))
    assert state.skipped == [5, 6, 7, 9]


def test_the_rule_by_hand_on_a_toy_stack():
    """Decisions from a hand-made schedule, float32 accumulators, and the skip: input + the residual
    (last block's output - first block's input) of the last computed step, text passed through."""
    ratios = np.array([1.0, 0.5, 0.98, 0.99, 1.0, 1.0, 1.0, 1.0, 0.9, 1.02], np.float32)
    state = MagCache(threshold=0.05, ratios=ratios, n=10, max_skip_steps=3, retention_ratio=0.2)
    head = lambda i, t: (i + 1.0, t + 2.0)  # noqa: E731
    outs, inputs = [], []
    for k in range(10):
        rest = lambda i, t, k=k: (i * 2 + k, t * 3)  # noqa: E731
        img, txt = mx.full((1, 2, 2), float(k)), mx.full((1, 1, 2), float(-k))
        inputs.append(k)
        outs.append(state(img, txt, head, rest))
    # steps 0, 1 retained (int(0.2 * 10 + 0.5) = 2); 2: err .02 skip; 3: ratio .9702, err .0498 skip;
    # 4: err .0796 > .05 compute, reset; 5, 6, 7: ratio 1, err 0, skip (K = 3); 8: K exceeded, compute;
    # 9: ratio 1.02, err .02 skip
    assert state.skipped == [2, 3, 5, 6, 7, 9]
    # computed at k: out = (k + 1) * 2 + k; residual = out - k = 2k + 2. Skipped at 3 (residual of 1): 3 + 4
    assert np.allclose(np.array(outs[3][0]), 3.0 + 4.0) and np.allclose(np.array(outs[3][1]), -3.0)
    assert np.allclose(np.array(outs[7][0]), 7.0 + 10.0) and np.allclose(np.array(outs[9][0]), 9.0 + 18.0)
    assert np.allclose(np.array(outs[8][0]), 9 * 2 + 8.0)
    # the accumulators are float32, as diffusers' (its ratios are a float32 tensor)
    assert type(state.ratio) is np.float32 and type(state.err) is np.float32


def test_dit_pipeline_keeps_one_context_per_guidance_pass():
    """A family diffusers' MagCache hook does not cover (ratios supplied: none are published for
    DiT), guidance batched as [labels; null class]: retention 1 == no cache bit for bit; a huge
    threshold skips K = 3 steps in 4 after the int(0.2 * 10 + 0.5) = 2 retained ones, in both
    guidance contexts, and changes the result."""
    from test_dit_pipeline import _pipe

    pipe = _pipe()
    run = dict(prompt=["207", "1"], steps=10, guidance=4.0, seed=3)
    pipe.generate(**run)
    plain = np.array(pipe.last_latents)
    ratios = (1.0,) * 10
    pipe.generate(**run, cache=CacheConfig("mag", 1e9, retention_ratio=1.0, mag_ratios=ratios))
    assert np.array_equal(np.array(pipe.last_latents), plain)
    pipe.generate(**run, cache=CacheConfig("mag", 1e9, mag_ratios=ratios))
    assert [s.skipped for s in pipe.step_cache.states] == [[2, 3, 4, 6, 7, 8]] * 2
    assert np.abs(np.array(pipe.last_latents) - plain).max() > 1e-4
    with pytest.raises(ValueError, match="mag_ratios"):
        pipe.generate(**run, cache="mag")  # DiT has no published ratios


def test_cli_mag_calibrate_prints_the_ratios(tmp_path):
    """(Storing and replaying `--cache mag:T`: test_step_cache.py, with fbc.)"""
    from test_commands import cli

    r = cli("--prompt", "a red circle", "--steps", 4, "--cache", "mag:calibrate", "--output", tmp_path / "c.png", "--verbose")
    assert r.returncode == 0 and r.stderr.count("mag_ratios=(1.00000, ") == 2, r.stderr


def test_cli_refuses_mag_without_ratios(tmp_path, capsys):
    from conftest import fixture_path
    from tiny_imagegen.commands.generate import main

    out = tmp_path / "a.png"
    assert main(["--model", str(fixture_path("sd3_pipeline", "repo")), "--prompt", "a red cat", "--steps", "4",
                 "--width", "32", "--height", "32", "--cache", "mag", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cache mag:0.06: ") and "mag_ratios" in err and err.count("\n") == 1, err
    assert not out.exists()


def _mag_state(**kw) -> MagCache:
    """Ratios of exactly 1, nothing retained: step 0 computes (no residual yet), the next K skip."""
    return MagCache(threshold=0.0, ratios=np.ones(8, np.float32), n=8, retention_ratio=0.0, **kw)


@pytest.mark.parametrize("family", ["flux2", "mmdit-single-stream", "sd3", "zimage"])
def test_models_route_the_whole_stack_through_mag(family):
    """Each model's blocks under MagCache: every step computed (retention 1) == uncached bit for bit;
    then the same input twice: the second call skips every block and gives the computed output again
    (its input + the residual of the whole stack), which only holds if the model hands its whole
    stack to the cache and uses nothing but the image stream after it."""
    from test_step_cache import _flux2, _mmdit_single_stream, _sd3_model

    if family == "zimage":
        from test_zimage import inputs, model

        m = model()
        latents, t, feats, lengths = inputs(load_fixture("zimage", "tiny", "io.safetensors"), "mask")
        call = lambda cache=None: m(latents, t, feats, lengths, cache=cache)  # noqa: E731
    elif family == "sd3":
        m = _sd3_model()
        x = mx.random.normal((2, 6, 8, 16), key=mx.random.key(1))
        txt, pooled = mx.random.normal((2, 5, 24), key=mx.random.key(2)), mx.random.normal((2, 8), key=mx.random.key(3))
        call = lambda cache=None: m(x, txt, mx.array([0.7, 0.7]), pooled, cache=cache)  # noqa: E731
    else:
        m = _flux2() if family == "flux2" else _mmdit_single_stream()
        img, txt = mx.random.normal((2, 6, 16), key=mx.random.key(3)), mx.random.normal((2, 5, 24), key=mx.random.key(4))
        txt_ids, img_ids = m.position_ids(2, 3, 5)
        extra = () if family == "flux2" else (mx.random.normal((2, 8), key=mx.random.key(5)),)
        call = lambda cache=None: m(img, img_ids, txt, txt_ids, mx.array([0.7, 0.7]), *extra, cache=cache)  # noqa: E731
    full = call()
    kept = _mag_state(max_skip_steps=3)
    kept.retention_ratio = 1.0
    assert np.array_equal(np.array(call(kept)), np.array(full)) and np.array_equal(np.array(call(kept)), np.array(full))
    assert kept.skipped == []
    state = _mag_state()
    call(state)
    again = call(state)
    assert state.skipped == [1]
    assert_close(f"{family}: skipped step == computed step for the same input", again, full, atol=1e-5)
