"""Velocity, noise, data and score are affine transforms of each other (diffusion/prediction_targets.py):
each map is checked against the definition on random (x0, eps, t), and each pair round-trips."""

import numpy as np
import pytest

from tiny_imagegen.diffusion import ddpm
from tiny_imagegen.diffusion import prediction_targets as pt

rng = np.random.default_rng(0)
X0, EPS = rng.normal(size=(4, 6, 5, 3)), rng.normal(size=(4, 6, 5, 3))
TOL = 1e-10  # float64 throughout


@pytest.mark.parametrize("t", [0.03, 0.5, 0.97])
def test_rectified_flow(t):
    a, s, da, ds = pt.rectified_flow(t)
    x_t = pt.noisy(X0, EPS, a, s)
    assert np.allclose(x_t, (1 - t) * X0 + t * EPS, atol=TOL)
    v = pt.velocity_from_eps(x_t, EPS, a, s, da, ds)
    assert np.allclose(v, EPS - X0, atol=TOL)  # the flow-matching target
    # the velocity is the time derivative of the path (central difference; the path is linear)
    h = 1e-4
    assert np.allclose(v, (pt.noisy(X0, EPS, *pt.rectified_flow(t + h)[:2]) - pt.noisy(X0, EPS, *pt.rectified_flow(t - h)[:2])) / (2 * h), atol=1e-8)
    assert np.allclose(pt.eps_from_velocity(x_t, v, a, s, da, ds), EPS, atol=TOL)
    assert np.allclose(pt.eps_from_velocity(x_t, v, a, s, da, ds), x_t + (1 - t) * v, atol=TOL)
    assert np.allclose(pt.x0_from_eps(x_t, EPS, a, s), X0, atol=TOL)
    assert np.allclose(x_t - t * v, X0, atol=1e-9)


@pytest.mark.parametrize("step", [1, 250, 999])
def test_ddpm_targets(step):
    abar = float(ddpm.alphas_cumprod(ddpm.SCHEDULES["sd15-ddim"])[step])
    a, s = abar**0.5, (1 - abar) ** 0.5
    x_t = pt.noisy(X0, EPS, a, s)
    assert np.allclose(pt.eps_from_x0(x_t, X0, a, s), EPS, atol=1e-8)
    # score of q(x_t | x0) = N(a x0, s^2 I), by its definition -(x_t - a x0) / s^2
    score = pt.score_from_eps(EPS, s)
    assert np.allclose(score, -(x_t - a * X0) / s**2, atol=1e-6)
    assert np.allclose(pt.eps_from_score(score, s), EPS, atol=TOL)
    # Salimans & Ho's v, and its inverse; ddpm.predict_x0_eps reads it the same way
    v = pt.v_ddpm_from_eps(x_t, EPS, a, s)
    assert np.allclose(v, a * EPS - s * X0, atol=1e-8)
    assert np.allclose(pt.eps_from_v_ddpm(x_t, v, a, s), EPS, atol=1e-8)
    x0, eps = ddpm.predict_x0_eps(x_t, v, abar, "v_prediction")
    assert np.allclose(x0, X0, atol=1e-8) and np.allclose(eps, EPS, atol=1e-8)


@pytest.mark.parametrize("step", [1, 250, 999])
def test_ddpm_point_is_a_rescaled_rectified_flow_point(step):
    """x_ddpm / (a + s) is the rectified-flow point at t = s / (a + s), for the same (x0, eps);
    and a velocity model read through the maps gives the DDPM eps exactly."""
    abar = float(ddpm.alphas_cumprod(ddpm.SCHEDULES["sd15-ddim"])[step])
    a, s = abar**0.5, (1 - abar) ** 0.5
    t = pt.rectified_flow_time(abar)
    x_rf = pt.noisy(X0, EPS, *pt.rectified_flow(t)[:2])
    assert np.allclose(pt.noisy(X0, EPS, a, s) / (a + s), x_rf, atol=TOL)
    v = EPS - X0  # what a perfect flow-matching model predicts at (x_rf, t)
    assert np.allclose(pt.eps_from_velocity(x_rf, v, *pt.rectified_flow(t)), EPS, atol=1e-9)
    assert np.allclose(pt.score_from_eps(EPS, s), -(pt.noisy(X0, EPS, a, s) - a * X0) / s**2, atol=1e-6)


def test_general_path_round_trips():
    """Any a, s, a', s' (not only the two paths above): every pair of maps inverts."""
    for a, s, da, ds in rng.uniform(0.1, 2.0, size=(5, 4)) * [1, 1, -1, 1]:
        x_t = pt.noisy(X0, EPS, a, s)
        v = pt.velocity_from_eps(x_t, EPS, a, s, da, ds)
        assert np.allclose(v, da * X0 + ds * EPS, atol=1e-9)
        assert np.allclose(pt.eps_from_velocity(x_t, v, a, s, da, ds), EPS, atol=1e-9)
        assert np.allclose(pt.eps_from_x0(x_t, pt.x0_from_eps(x_t, EPS, a, s), a, s), EPS, atol=1e-9)
        assert np.allclose(pt.eps_from_score(pt.score_from_eps(EPS, s), s), EPS, atol=TOL)
