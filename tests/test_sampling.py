"""The sampler against diffusers' FlowMatchEulerDiscreteScheduler as the FLUX pipelines set it."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, load_fixture
from tiny_imagegen.diffusion.flow_matching import (
    classifier_free_guidance, denoise, euler_step, flux_mu, flux_schedule, img2img_schedule, noise_image,
    sample_noise,
)


def test_schedules_match_diffusers():
    ref = load_fixture("sampling", "schedules.safetensors")
    cases = [k for k in ref if k.startswith(("schnell.", "dev."))]
    assert len(cases) == 12
    for key in cases:
        model, steps, seq_len = key.split(".")
        ours = flux_schedule(int(steps), int(seq_len), shift=(model == "dev"))
        assert_close(f"schedule {key}", np.array(ours, np.float32), ref[key], atol=1e-6)


def test_euler_step_matches_diffusers():
    ref = load_fixture("sampling", "schedules.safetensors")
    s = np.array(ref["euler.sigmas"]).tolist()
    out = euler_step(ref["euler.x"], ref["euler.v"], s[1], s[2])
    assert_close("euler step", out, ref["euler.out"], atol=1e-6)


def test_shift_follows_the_token_count():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    assert flux_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]
    big, small = flux_schedule(4, 4096, shift=True), flux_schedule(4, 256, shift=True)
    assert all(b >= s for b, s in zip(big, small)) and big[2] > 0.5  # more time at high noise


def test_img2img_starts_part_way():
    schedule = flux_schedule(10, 256, shift=False)
    assert img2img_schedule(schedule, 1.0) == schedule
    assert img2img_schedule(schedule, 0.6) == schedule[4:]  # the last 6 of 10 steps
    with pytest.raises(ValueError, match="strength"):
        img2img_schedule(schedule, 0.0)
    assert img2img_schedule(schedule, 0.01) == schedule[-2:]  # never fewer than one step


def test_noise_is_seeded():
    a, b = sample_noise(7, (2, 3)), sample_noise(7, (2, 3))
    assert mx.array_equal(a, b) and not mx.array_equal(a, sample_noise(8, (2, 3)))


def test_exact_velocity_reaches_the_data():
    """With the true velocity of the straight path, Euler lands on x0 exactly (any schedule)."""
    x0, eps = mx.array([[0.5, -1.0, 2.0]]), mx.array([[1.0, 0.3, -0.2]])
    x = noise_image(x0, eps, 1.0)
    *_, last = denoise(lambda x, t: eps - x0, x, flux_schedule(3, 1024, shift=True))
    assert np.allclose(last, x0, atol=1e-6)


def test_classifier_free_guidance():
    v = classifier_free_guidance(mx.array([2.0]), mx.array([1.0]), 4.0)
    assert v.item() == pytest.approx(5.0)
