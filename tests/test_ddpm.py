"""DDIM and Euler samplers against diffusers' DDIMScheduler / EulerDiscreteScheduler.

Fixtures: tests/reference/ddpm.py (SD 1.5's scheduler config read into each class, variants with
v-prediction, Karras sigmas, other spacings, and DiT's DDIM config)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, fixture_path, load_fixture
from tiny_imagegen.diffusion import ddpm

CASES = {
    "sd15_ddim": ("ddim", {}),
    "sd15_ddim_v": ("ddim", {"prediction_type": "v_prediction"}),
    "sd15_euler": ("euler", {}),
    "sd15_euler_v": ("euler", {"prediction_type": "v_prediction"}),
    "sd15_euler_karras": ("euler", {"use_karras_sigmas": True}),
    "sd15_ddim_trailing": ("ddim", {"timestep_spacing": "trailing"}),
    "sd15_euler_leading": ("euler", {"timestep_spacing": "leading"}),
    "dit_ddim": ("ddim", None),
}
STEPS = (1, 4, 7, 20, 30, 50)


@pytest.fixture(scope="module")
def ref():
    return load_fixture("ddpm", "schedules.safetensors")


def schedule(case: str) -> ddpm.DDPMSchedule:
    sampler, extra = CASES[case]
    configs = json.loads(fixture_path("ddpm", "configs.json").read_text())
    if extra is None:
        return ddpm.DDPMSchedule.from_diffusers(configs["dit"], sampler)
    return ddpm.DDPMSchedule.from_diffusers({**configs["sd15"], **extra}, sampler)


def test_presets_are_the_configs():
    assert schedule("sd15_ddim") == ddpm.SCHEDULES["sd15-ddim"]
    assert schedule("sd15_euler") == ddpm.SCHEDULES["sd15-euler"]
    assert schedule("dit_ddim") == ddpm.SCHEDULES["dit-ddim"]


@pytest.mark.parametrize("case", CASES)
def test_alphas_cumprod(case, ref):
    ours = ddpm.alphas_cumprod(schedule(case))
    assert np.array_equal(ours, np.array(ref[f"{case}.alphas_cumprod"])), "alphas_cumprod differs from torch's"


@pytest.mark.parametrize("case", CASES)
def test_timesteps_and_sigmas(case, ref):
    sampler = CASES[case][0]
    worst_t = worst_s = 0.0
    for steps in STEPS:
        p = ddpm.plan(schedule(case), sampler, steps)
        want = np.array(ref[f"{case}.{steps}.timesteps"])
        if sampler == "ddim":
            assert np.array_equal(p.timesteps, want), f"{steps} steps: {p.timesteps} != {want}"
        worst_t = max(worst_t, float(np.abs(p.timesteps - want).max()))
        if sampler == "euler":
            worst_s = max(worst_s, float(np.abs(p.sigmas - np.array(ref[f"{case}.{steps}.sigmas"])).max()))
            assert p.init_noise_sigma == pytest.approx(ref[f"{case}.{steps}.init_noise_sigma"].item(), rel=1e-6)
    print(f"[ddpm] {case}: timesteps max abs error {worst_t:.2e}, sigmas {worst_s:.2e}")
    assert worst_t == 0.0 and worst_s <= 1e-7  # the same float32 tables as torch's


@pytest.mark.parametrize("case", CASES)
def test_steps(case, ref):
    sampler = CASES[case][0]
    p = ddpm.plan(schedule(case), sampler, 10)
    for i in (0, 4, 9):
        x, out = ref[f"{case}.step.{i}.x"], ref[f"{case}.step.{i}.out"]
        if sampler == "euler":
            assert_close(f"{case} scale_model_input {i}", ddpm.scale_model_input(p, i, x), ref[f"{case}.step.{i}.scaled"], 1e-6)
        assert_close(f"{case} step {i}", ddpm.step(p, i, x, out), ref[f"{case}.step.{i}.next"], 2e-6, 1e-6)


def test_ddim_eta1_is_stochastic_ddim(ref):
    p = ddpm.plan(ddpm.SCHEDULES["sd15-ddim"], "ddim", 10)
    for i in (0, 4, 9):
        k = f"ddim_eta1.step.{i}."
        ours = ddpm.ddim_step(p, i, ref[k + "x"], ref[k + "out"], eta=1.0, noise=ref[k + "noise"])
        assert_close(f"ddim eta 1 step {i}", ours, ref[k + "next"], 2e-6, 1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("steps, strength", [(10, 0.6), (7, 0.75), (4, 1.0)])
def test_img2img(sampler, steps, strength, ref):
    p = ddpm.img2img_plan(ddpm.plan(ddpm.SCHEDULES[f"sd15-{sampler}"], sampler, steps), strength)
    key = f"img2img.{sampler}.{steps}.{strength}"
    assert np.array_equal(p.timesteps, np.array(ref[key + ".timesteps"]))
    start = ddpm.noise_to_start(p, ref["img2img.x0"], ref["img2img.noise"])
    assert_close(f"img2img start {sampler} {steps} steps, strength {strength}", start, ref[key + ".start"], 2e-6, 1e-6)


def test_sd15_timesteps_read_as_documented():
    assert list(ddpm.plan(ddpm.SCHEDULES["sd15-ddim"], "ddim", 20).timesteps[:3]) == [951, 901, 851]
    assert ddpm.plan(ddpm.SCHEDULES["sd15-ddim"], "ddim", 20).timesteps[-1] == 1
    p = ddpm.plan(ddpm.SCHEDULES["sd15-euler"], "euler", 20)
    assert p.timesteps[0] == 999 and p.timesteps[-1] == 0 and p.sigmas[-1] == 0
    assert p.init_noise_sigma == pytest.approx(14.6146, abs=1e-3)  # sqrt((1 - abar_999) / abar_999)


def test_denoise_runs_the_plan():
    """denoise = scale_model_input, predict, step, per timestep; the model sees the training t."""
    p = ddpm.plan(ddpm.SCHEDULES["sd15-euler"], "euler", 5)
    seen = []

    def predict(x_in, t):
        seen.append(t)
        return 0.1 * x_in

    x = mx.random.normal((1, 4, 4, 4), key=mx.random.key(0)) * p.init_noise_sigma
    ref = x
    for i, t in enumerate(p.timesteps):
        ref = ddpm.step(p, i, ref, 0.1 * ddpm.scale_model_input(p, i, ref))
    *_, last = ddpm.denoise(predict, x, p)
    assert seen == [float(t) for t in p.timesteps]
    assert mx.array_equal(last, ref)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(prediction_type="sample"), "prediction_type"),
    (dict(timestep_spacing="uniform"), "timestep_spacing"),
])
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ddpm.DDPMSchedule(**kwargs)


def test_bad_steps_are_named():
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        ddpm.plan(ddpm.SCHEDULES["sd15-ddim"], "ddim", 0)
    with pytest.raises(ValueError, match="unknown sampler"):
        ddpm.plan(ddpm.SCHEDULES["sd15-ddim"], "pndm", 10)
    with pytest.raises(ValueError, match="runs no step"):
        ddpm.img2img_plan(ddpm.plan(ddpm.SCHEDULES["sd15-ddim"], "ddim", 4), 0.2)
    with pytest.raises(ValueError, match="eta > 0 needs noise"):
        p = ddpm.plan(ddpm.SCHEDULES["sd15-ddim"], "ddim", 10)
        ddpm.ddim_step(p, 0, mx.zeros((1, 2, 2, 4)), mx.zeros((1, 2, 2, 4)), eta=1.0)
