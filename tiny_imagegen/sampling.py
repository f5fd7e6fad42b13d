"""Flow-matching sampling: the schedule, the Euler integrator and guidance.

Rectified flow (Liu et al., 2022; Esser et al., 2024) trains the model to predict the velocity
v = ε - x0 along the straight path x_t = (1 - t) x0 + t ε, t = 1 being pure noise. Sampling
integrates dx/dt = v from t = 1 to t = 0 with Euler steps,

    x_{t_next} = x_t + (t_next - t) · v(x_t, t).

Schedule. Steps are linear in t, then optionally *shifted* towards the noisy end:

    t' = e^mu / (e^mu + (1/t - 1))                           (SD3 eq. 23 with σ = 1, as FLUX.1)

with mu linear in the number of image tokens (0.5 at 256 tokens, 1.15 at 4096): bigger images
keep more signal at a given t, so they spend more steps at high noise. FLUX.1-dev shifts;
FLUX.1-schnell, distilled for 1-4 steps, does not.

Guidance. FLUX.1-dev was distilled from classifier-free guidance: the scale is an input to the
model (`guidance=`), one pass per step. True classifier-free guidance (Ho & Salimans, 2022) runs
the model with and without the prompt and extrapolates, v = v_neg + s (v_pos - v_neg).
"""

import math
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The shift mu, linear in the packed image token count through (256, 0.5) and (4096, 1.15)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(mu: float, t: float) -> float:
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)) if t > 0 else 0.0


def flux_schedule(steps: int, image_seq_len: int, shift: bool) -> list[float]:
    """The steps + 1 times t_0 = 1 > t_1 > ... > t_steps = 0 of a FLUX sampling run."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    ts = [1.0 - i / steps for i in range(steps + 1)]
    if shift:
        mu = flux_mu(image_seq_len)
        ts = [time_shift(mu, t) for t in ts]
    return ts


def flux2_mu(image_seq_len: int, steps: int) -> float:
    """FLUX.2's shift mu (diffusers' `compute_empirical_mu`, FP:63-78): fitted to the token count
    at 10 and at 200 steps, and linear in the step count between; above 4300 tokens the 200-step
    line alone."""
    a1, b1 = 8.73809524e-05, 1.89833333  # the 10-step fit
    a2, b2 = 0.00016927, 0.45666666  # the 200-step fit
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * steps + (m_200 - 200.0 * slope))


def flux2_schedule(steps: int, image_seq_len: int, dynamic_shift: bool = True, shift: float = 1.0) -> list[float]:
    """The steps + 1 sigmas of a FLUX.2 run, as Flux2KleinPipeline sets the scheduler: linspace(1,
    1/steps) in float64, then float32, shifted by t' = e^mu / (e^mu + 1/t - 1) in float32 with
    mu = flux2_mu (`use_dynamic_shifting`), else by the static shift s t / (1 + (s - 1) t); then 0."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    if dynamic_shift:
        e_mu = math.exp(flux2_mu(image_seq_len, steps))
        sigmas = e_mu / (e_mu + (1 / sigmas - 1))  # numpy float32 throughout, as the scheduler (SCH:655)
    else:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [float(s) for s in sigmas.astype(np.float32)] + [0.0]


def euler_step_in_model_dtype(x: mx.array, v: mx.array, t: float, t_next: float) -> mx.array:
    """diffusers' FlowMatchEulerDiscreteScheduler.step as it runs on a low-precision model output
    (SCH:493-526): the sample is upcast to float32, but dt (a 0-dim float32 tensor) times v is
    computed in v's dtype (dt and the product rounded to bf16), then added in float32 and cast
    back. In float32 this is `euler_step`."""
    dt = mx.array(np.float32(t_next) - np.float32(t))
    return (x.astype(mx.float32) + dt.astype(v.dtype) * v).astype(v.dtype)


def img2img_schedule(schedule: list[float], strength: float) -> list[float]:
    """Image-to-image starts part way: of n steps, the last round(n · strength) are run
    (as diffusers' FluxImg2ImgPipeline counts them), from the time they begin at."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    steps = len(schedule) - 1
    start = int(max(steps - min(steps * strength, steps), 0))  # < steps for any strength > 0
    return schedule[start:]


def noise_image(x0: mx.array, noise: mx.array, t: float) -> mx.array:
    """A point on the straight path: x_t = (1 - t) x0 + t ε."""
    return (1.0 - t) * x0 + t * noise


def euler_step(x: mx.array, v: mx.array, t: float, t_next: float) -> mx.array:
    """One Euler step, in float32 whatever the model's dtype (as the reference does)."""
    return (x.astype(mx.float32) + (t_next - t) * v.astype(mx.float32)).astype(x.dtype)


def classifier_free_guidance(v_pos: mx.array, v_neg: mx.array, scale: float) -> mx.array:
    return v_neg + scale * (v_pos - v_neg)


def sample_noise(seed: int, shape: tuple[int, ...], dtype=mx.float32) -> mx.array:
    """Gaussian noise from a seed alone: the same seed gives the same image, run to run."""
    return mx.random.normal(shape, dtype=mx.float32, key=mx.random.key(seed)).astype(dtype)


def denoise(velocity: Callable[[mx.array, float], mx.array], x: mx.array, schedule: list[float]) -> Iterator[mx.array]:
    """Integrate from schedule[0] to schedule[-1]; yields x after every step (evaluated)."""
    for t, t_next in zip(schedule[:-1], schedule[1:]):
        x = euler_step(x, velocity(x, t), t, t_next)
        mx.eval(x)
        yield x
