"""Noise, data, velocity and score: four names for one prediction.

Every diffusion model and flow here noises data along a Gaussian path

    x_t = a_t x0 + s_t eps,          eps ~ N(0, I),

    DDPM / DDIM (SD 1.5, DiT):    a = sqrt(abar_t),  s = sqrt(1 - abar_t)        (ddpm.py)
    rectified flow (FLUX, SD3):   a = 1 - t,         s = t                        (flow_matching.py)

Given x_t, a network that knows any one of these knows all of them, because each is an affine
function of (x_t, that one):

    data            x0    = (x_t - s eps) / a
    noise           eps   = (x_t - a x0) / s
    velocity        v     = dx_t/dt = a' x0 + s' eps                (rectified flow: v = eps - x0)
                    eps   = (a v - a' x_t) / (a s' - a' s)          (rectified flow: x_t + (1 - t) v)
    score           grad log p_t(x_t | x0) = -(x_t - a x0) / s^2 = -eps / s
                    (and for the marginal p_t, by Tweedie's formula, -E[eps | x_t] / s: a network
                    trained to predict eps predicts -s times the score)
    DDPM's "v"      v_ddpm = a eps - s x0  (Salimans & Ho, 2022; a^2 + s^2 = 1):
                    eps = a v_ddpm + s x_t,  x0 = a x_t - s v_ddpm

The derivation of the velocity line: x0 = (x_t - s eps) / a, so v = a'(x_t - s eps)/a + s' eps =
(a'/a) x_t + (s' - a' s / a) eps; solve for eps. With a = 1 - t, s = t (a' = -1, s' = 1) the
denominator a s' - a' s = 1.

The two paths are one path, rescaled: dividing a DDPM point by (a + s) gives (a x0 + s eps) / (a + s)
= (1 - t) x0 + t eps with t = s / (a + s). So a flow-matching model can serve as an eps-model
(and back) by `rectified_flow_time` and the maps above, up to that scale of its input.

All functions work elementwise on arrays (MLX or numpy) and plain floats a, s, a', s'.
"""


def noisy(x0, eps, a, s):
    """x_t = a x0 + s eps."""
    return a * x0 + s * eps


def x0_from_eps(x_t, eps, a, s):
    return (x_t - s * eps) / a


def eps_from_x0(x_t, x0, a, s):
    return (x_t - a * x0) / s


def velocity_from_eps(x_t, eps, a, s, da, ds):
    """v = dx_t/dt = a' x0 + s' eps, with x0 recovered from eps."""
    return da * x0_from_eps(x_t, eps, a, s) + ds * eps


def eps_from_velocity(x_t, v, a, s, da, ds):
    """The inverse of velocity_from_eps: eps = (a v - a' x_t) / (a s' - a' s)."""
    return (a * v - da * x_t) / (a * ds - da * s)


def score_from_eps(eps, s):
    """grad_x log p_t(x_t | x0) = -eps / s."""
    return -eps / s


def eps_from_score(score, s):
    return -s * score


def v_ddpm_from_eps(x_t, eps, a, s):
    """Salimans & Ho's v = a eps - s x0 (on a variance-preserving path, a^2 + s^2 = 1)."""
    return a * eps - s * x0_from_eps(x_t, eps, a, s)


def eps_from_v_ddpm(x_t, v, a, s):
    """eps = a v + s x_t (variance preserving)."""
    return a * v + s * x_t


def rectified_flow(t):
    """(a, s, a', s') of the straight path x_t = (1 - t) x0 + t eps."""
    return 1.0 - t, t, -1.0, 1.0


def rectified_flow_time(abar):
    """The rectified-flow time whose point is a DDPM point at abar divided by (a + s):
    t = s / (a + s), a = sqrt(abar), s = sqrt(1 - abar)."""
    a, s = abar**0.5, (1 - abar) ** 0.5
    return s / (a + s)
