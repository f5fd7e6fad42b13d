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

Z-Image (Turbo) uses a static shift instead, t' = 3t / (1 + 2t), on linspace(1, 1/n, n), and
its model predicts x0 - ε at time 1 - σ: the pipeline flips the sign (`zimage_sigmas`).

Guidance. FLUX.1-dev was distilled from classifier-free guidance: the scale is an input to the
model (`guidance=`), one pass per step. True classifier-free guidance (Ho & Salimans, 2022) runs
the model with and without the prompt and extrapolates, v = v_neg + s (v_pos - v_neg).

numpy (the other families' float32 schedules) is imported where it is used: `generate` for the
FLUX.1-family models never loads it (0.075 s of the first image).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterator

import mlx.core as mx

if TYPE_CHECKING:
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
    import numpy as np

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
    import numpy as np

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


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32, bit for bit: step = (end - start) / (n - 1) in float32, the first
    half counted up from start and the second down from end, each one fused multiply-add (the
    product of two float32 values is exact in float64). np.linspace differs in the last bit for
    most n (it rounds start + i*step twice and counts from start only). Checked for n <= 300."""
    import numpy as np

    f32 = np.float32
    start, end = f32(start), f32(end)
    if n == 1:
        return np.array([start], f32)
    step = np.float64(f32(end - start) / f32(n - 1))
    i = np.arange(n)
    up = np.float64(start) + step * i
    down = np.float64(end) - step * (n - 1 - i)
    return np.where(i < n // 2, up, down).astype(f32)


def zimage_sigmas(steps: int, shift: float = 3.0) -> list[float]:
    """Z-Image's noise levels, steps + 1 of them ending at 0, as its pipeline sets them:

        σ_i = linspace(1, 1/n, n)_i          (torch, float32; ZImagePipeline)
        σ'  = shift σ / (1 + (shift - 1) σ)  (FlowMatchEulerDiscreteScheduler's static shift, float32)

    then a terminal 0. Turbo: shift 3, 8 steps. Returned as Python floats of the float32 values."""
    import numpy as np

    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    s = torch_linspace_f32(1.0, 1.0 / steps, steps)
    f32 = np.float32
    s = (f32(shift) * s) / (f32(1.0) + f32(shift - 1.0) * s)  # float32 throughout, in the scheduler's order
    return [float(v) for v in s] + [0.0]


def timesteps_in_dtype(t: float, n: int, dtype: mx.Dtype) -> mx.array:
    """(n,) model times t as the FLUX.2 and Qwen-Image pipelines pass them: the scheduler's
    timestep t·1000 in float32, cast to the latents' dtype, then / 1000 (so a bf16 model sees t
    rounded at the 1000 scale; FP:841, 851, QP:643-647)."""
    import numpy as np

    return mx.full((n,), np.float32(np.float32(t) * np.float32(1000.0))).astype(dtype) / 1000


def zimage_model_time(sigma: float) -> float:
    """The time the Z-Image transformer is given at noise level σ: t = 1 - σ (0 = pure noise),
    computed as the pipeline does it, ((1000 - σ·1000) / 1000) in float32, which is not (1 - σ)
    to the last bit (up to 3e-8 apart; the model multiplies by 1000 again)."""
    import numpy as np

    f32 = np.float32
    timestep = f32(sigma) * f32(1000)  # the scheduler's timesteps = sigmas * 1000
    return float((f32(1000) - timestep) / f32(1000))


def zimage_guidance(pred_pos: mx.array, pred_neg: mx.array, scale: float) -> mx.array:
    """Z-Image's classifier-free guidance, in float32: pos + g (pos - neg). g = 0 is off (one
    pass), g = 1 is already 2 pos - neg: the usual s = g + 1 of `classifier_free_guidance`."""
    pos, neg = pred_pos.astype(mx.float32), pred_neg.astype(mx.float32)
    return pos + scale * (pos - neg)


def renormalize_guidance(pred: mx.array, pred_pos: mx.array, factor: float) -> mx.array:
    """ZImagePipeline's `cfg_normalization`: scale each sample's guided prediction down so that
    its L2 norm is at most `factor` times the positive prediction's (float32, per sample)."""
    axes = tuple(range(1, pred.ndim))
    norm = mx.sqrt(mx.sum(mx.square(pred), axis=axes, keepdims=True))
    limit = factor * mx.sqrt(mx.sum(mx.square(pred_pos.astype(mx.float32)), axis=axes, keepdims=True))
    return mx.where(norm > limit, pred * (limit / norm), pred)


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


# ---- Qwen-Image: the dynamic exponential shift, stretched to a terminal sigma -----------------------


def stretched_shift_schedule(steps: int, image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 8192,
                             base_shift: float = 0.5, max_shift: float = 0.9,
                             shift_terminal: float | None = 0.02) -> list[float]:
    """The steps + 1 sigmas of a Qwen-Image run, as QwenImagePipeline sets its scheduler (QP:598-606,
    SCH:336-361): σ = linspace(1, 1/n, n) (float64, then float32); the exponential shift
    e^mu / (e^mu + 1/σ - 1) with mu linear in the packed token count through (base_seq_len,
    base_shift) and (max_seq_len, max_shift); then stretched so that the last sigma is
    `shift_terminal`: σ'' = 1 - (1 - σ')(1 - terminal) / (1 - σ'_last); then 0. NumPy float32
    throughout, as the scheduler (a Python float stays float32 beside a float32 array). The
    defaults are Qwen-Image's scheduler config (unverified offline, REFERENCE-NOTES-TURN3 A4)."""
    import numpy as np

    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = image_seq_len * slope + (base_shift - slope * base_seq_len)  # calculate_shift (QP:59-69)
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    one_minus = 1 - sigmas
    if shift_terminal and one_minus[-1] > 0:  # 1 step: σ = [1] cannot be stretched (diffusers: NaN)
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    return [float(s) for s in sigmas.astype(np.float32)] + [0.0]
