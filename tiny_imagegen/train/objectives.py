"""The flow-matching (rectified flow) training objective, as SD3 and FLUX are trained.

A data sample x0 and a noise sample ε ~ N(0, I) are joined by a straight path

    x_t = (1 - t) x0 + t ε,          t in [0, 1], t = 1 pure noise            (Liu et al. 2022)

whose velocity dx_t/dt = ε - x0 is the same at every t. The model v_θ(x_t, t, c) regresses it,

    L = E_{t, x0, ε} || v_θ(x_t, t, c) - (ε - x0) ||²                       (Esser et al. 2024, eq. 1-6)

and sampling (diffusion/flow_matching.py) integrates dx/dt = v_θ from t = 1 to 0.

Which t to train on matters more than the loss weighting: SD3 (§3.1, Table 1) found the
*logit-normal* density best, t = sigmoid(n), n ~ N(m, s²) with m = 0, s = 1, which puts most
samples in the middle of the path, where the velocity is hardest to predict (near t = 0 and t = 1
it is almost x0-independent or almost noise-independent). We train with it; "uniform" is kept
for comparison.
"""

import mlx.core as mx

T_DISTRIBUTIONS = ("logit_normal", "uniform")


def sample_t(key: mx.array, batch: int, distribution: str = "logit_normal", m: float = 0.0, s: float = 1.0) -> mx.array:
    """(batch,) training times in (0, 1)."""
    if distribution == "logit_normal":
        return mx.sigmoid(m + s * mx.random.normal((batch,), key=key))
    if distribution == "uniform":
        return mx.random.uniform(shape=(batch,), key=key)
    raise ValueError(f"unknown t distribution {distribution!r}: use one of {T_DISTRIBUTIONS}")


def interpolate(x0: mx.array, noise: mx.array, t: mx.array) -> mx.array:
    """x_t = (1 - t) x0 + t ε for a batch: x0, noise (B, ...), t (B,)."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: mx.array, noise: mx.array) -> mx.array:
    """The path's velocity v = ε - x0."""
    return noise - x0


def flow_matching_loss(predicted_velocity: mx.array, x0: mx.array, noise: mx.array) -> mx.array:
    """Mean squared error between the model's velocity and ε - x0 (a scalar)."""
    return mx.mean(mx.square(predicted_velocity - velocity_target(x0, noise)))
