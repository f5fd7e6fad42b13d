"""Samplers for noise-prediction models (DDPM / DDIM / Euler), as Stable Diffusion 1.5 and DiT use.

Forward process (Ho et al., 2020). A discrete schedule of betas over T = 1000 training steps,
alpha_t = 1 - beta_t and abar_t = prod_{s <= t} alpha_s, noises data x0 as

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,      eps ~ N(0, I).

SD uses "scaled linear" betas, linear in sqrt(beta) from 0.00085 to 0.012; DiT "linear" betas
from 1e-4 to 0.02. The model predicts eps ("epsilon") or v = sqrt(abar) eps - sqrt(1 - abar) x0
("v_prediction", Salimans & Ho 2022); `predict_x0_eps` turns either into (x0, eps).

DDIM (Song et al., 2021, eq. 12). From the prediction at t, step to an earlier t' by

    x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t' - s^2) eps + s z,
    s = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t').

eta = 0 is deterministic DDIM; eta = 1 over consecutive steps is DDPM's ancestral sampler.
After the last step there is no abar_t': SD uses abar_0 (`set_alpha_to_one=False`), DiT 1.

Euler (Karras et al., 2022, "EDM", alg. 1 without churn). The same process seen as
x = x0 + sigma eps with sigma = sqrt((1 - abar) / abar): the model gets x / sqrt(sigma^2 + 1)
(which is x_t above), and its eps is the derivative dx/dsigma, so

    x_sigma' = x_sigma + (sigma' - sigma) eps.

Sigmas are interpolated linearly between the training steps at the chosen timesteps, or follow
Karras' rho = 7 schedule between the same end points (`use_karras_sigmas`).

Timestep spacing (Lin et al., 2024, table 2), of n steps out of T: "leading" t = k (T // n) +
steps_offset (SD 1.5's DDIM: 951, 901, ..., 1 for 20 steps), "linspace" t = round(linspace(0,
T - 1, n)) reversed (SD 1.5's Euler: fractional t, 999 ... 0), "trailing" t = round(T - k T / n) - 1.

Everything matches diffusers' DDIMScheduler / EulerDiscreteScheduler for the same config: the
tables are computed in float32 as torch computes them (the steps themselves in float32).
Classifier-free guidance is `sampling.classifier_free_guidance`: uncond + g (cond - uncond).
"""

from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .flow_matching import classifier_free_guidance  # noqa: F401  (re-exported: one CFG for every sampler)

# ---- the training schedule ------------------------------------------------------------------------


@dataclass(frozen=True)
class DDPMSchedule:
    """A scheduler_config.json: the training schedule and how a sampler spaces its steps."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    prediction_type: str = "epsilon"  # or "v_prediction"
    set_alpha_to_one: bool = False  # DDIM's abar after the last step: 1, or abar_0
    steps_offset: int = 1
    timestep_spacing: str = "leading"  # "leading" | "linspace" | "trailing"
    use_karras_sigmas: bool = False  # Euler only

    def __post_init__(self):
        for name, allowed in (("beta_schedule", ("scaled_linear", "linear")),
                              ("prediction_type", ("epsilon", "v_prediction")),
                              ("timestep_spacing", ("leading", "linspace", "trailing"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not supported: choose from {allowed}")

    @classmethod
    def from_diffusers(cls, cfg: dict, sampler: str = "ddim") -> "DDPMSchedule":
        """From a scheduler_config.json as diffusers reads it into DDIMScheduler ("ddim") or
        EulerDiscreteScheduler ("euler"): keys the config omits take that class's defaults
        (SD 1.5's PNDM config names no timestep_spacing: DDIM spaces "leading", Euler "linspace")."""
        if cfg.get("trained_betas") is not None or cfg.get("rescale_betas_zero_snr") or cfg.get("thresholding"):
            raise ValueError("trained betas, zero-SNR rescaling and thresholding are not implemented")
        if cfg.get("clip_sample") and sampler == "ddim":
            raise ValueError("clip_sample=True is not implemented (SD and DiT configs set it false)")
        defaults = _DEFAULTS[sampler]
        known = {f.name for f in fields(cls)}
        return cls(**{**defaults, **{k: v for k, v in cfg.items() if k in known and v is not None}})


# The classes' constructor defaults (diffusers 0.42), which a config.json may leave out.
_DEFAULTS = {
    "ddim": dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", set_alpha_to_one=True, steps_offset=0,
                 timestep_spacing="leading"),
    "euler": dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", steps_offset=0, timestep_spacing="linspace"),
}

SCHEDULES = {
    # stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler/scheduler_config.json (PNDMScheduler):
    # scaled_linear 0.00085..0.012, set_alpha_to_one false, steps_offset 1, epsilon
    "sd15-ddim": DDPMSchedule(),
    "sd15-euler": DDPMSchedule(timestep_spacing="linspace"),
    # diffusers' scripts/convert_dit_to_diffusers.py: DDIMScheduler(beta_schedule="linear",
    # clip_sample=False), so 1e-4..0.02, set_alpha_to_one true, steps_offset 0
    "dit-ddim": DDPMSchedule(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", set_alpha_to_one=True,
                             steps_offset=0),
}


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32), bit for bit: float32 ends and step, each
    value one fused multiply-add from the nearer end."""
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(n - 1))
    i = np.arange(n)
    out = np.where(i < n // 2, np.float64(a) + np.float64(step) * i, np.float64(b) - np.float64(step) * (n - 1 - i))
    return out.astype(np.float32)


def betas(schedule: DDPMSchedule) -> np.ndarray:
    """(T,) float32."""
    T = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        return _torch_linspace(schedule.beta_start, schedule.beta_end, T)
    return _torch_linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, T) ** 2  # scaled_linear


def alphas_cumprod(schedule: DDPMSchedule) -> np.ndarray:
    """abar_t (T,) float32; the product is accumulated in float64, as torch.cumprod does."""
    alphas = np.float32(1.0) - betas(schedule)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def add_noise(x0: mx.array, noise: mx.array, abar: float) -> mx.array:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (training, image-to-image)."""
    return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise


def timesteps(schedule: DDPMSchedule, steps: int) -> np.ndarray:
    """The training timesteps a sampler of `steps` steps visits, noisiest first (float64;
    integers except for "linspace", which Euler keeps fractional and DDIM rounds)."""
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    if schedule.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, steps)[::-1].copy()
    if schedule.timestep_spacing == "leading":
        return (np.arange(steps) * (T // steps))[::-1].astype(np.float64) + schedule.steps_offset
    return np.round(np.arange(T, 0, -T / steps)) - 1  # trailing


def predict_x0_eps(x: mx.array, out: mx.array, abar, prediction_type: str) -> tuple[mx.array, mx.array]:
    """The model output at x_t -> (x0, eps): x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) for
    epsilon; x0 = sqrt(abar) x - sqrt(1 - abar) v, eps = sqrt(abar) v + sqrt(1 - abar) x for v."""
    a, b = abar**0.5, (1 - abar) ** 0.5
    if prediction_type == "epsilon":
        return (x - b * out) / a, out
    return a * x - b * out, a * out + b * x


# ---- a sampling plan: the tables of one run -------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one run needs: the timesteps the model sees, and per step the DDIM alphas
    (abar_t, abar_t') or the Euler sigmas (sigma_i, with a final 0). `init_noise_sigma` scales
    the initial Gaussian noise."""

    sampler: str  # "ddim" | "euler"
    prediction_type: str
    timesteps: np.ndarray  # (n,) what the model is called with
    abar: np.ndarray | None = None  # ddim: (n,) abar_t, float32
    abar_prev: np.ndarray | None = None  # ddim: (n,) abar_t'
    sigmas: np.ndarray | None = None  # euler: (n + 1,) float32, ending in 0
    init_noise_sigma: float = 1.0


def ddim_plan(schedule: DDPMSchedule, steps: int) -> Plan:
    ac = alphas_cumprod(schedule)
    ts = timesteps(schedule, steps)
    ts = np.round(ts).astype(np.int64) if schedule.timestep_spacing == "linspace" else ts.astype(np.int64)
    # diffusers steps back by T // n from each timestep, whatever the spacing
    prev = ts - schedule.num_train_timesteps // steps
    final = np.float32(1.0) if schedule.set_alpha_to_one else ac[0]
    abar_prev = np.array([ac[p] if p >= 0 else final for p in prev], np.float32)
    return Plan("ddim", schedule.prediction_type, ts, abar=ac[ts], abar_prev=abar_prev)


def euler_plan(schedule: DDPMSchedule, steps: int) -> Plan:
    ac = alphas_cumprod(schedule)
    train_sigmas = (((1 - ac) / ac) ** 0.5).astype(np.float32)  # sigma of every training step
    log_sigmas = np.log(train_sigmas)
    ts = timesteps(schedule, steps).astype(np.float32)  # diffusers makes the timesteps float32 first
    sigmas = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    if schedule.use_karras_sigmas:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
        ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    # linspace / trailing start from pure noise of std sigma_max, "leading" from x_t's own scale
    init = sigmas.max() if schedule.timestep_spacing in ("linspace", "trailing") else (sigmas.max() ** 2 + 1) ** 0.5
    return Plan("euler", schedule.prediction_type, ts.astype(np.float32), sigmas=sigmas, init_noise_sigma=float(init))


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The fractional training timestep of a sigma: linear interpolation in log sigma."""
    log_sigma = np.log(max(sigma, 1e-10))
    low = int(np.clip(np.cumsum(log_sigma - log_sigmas >= 0).argmax(), None, len(log_sigmas) - 2))
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return float((1 - w) * low + w * (low + 1))


def plan(schedule: DDPMSchedule, sampler: str, steps: int) -> Plan:
    if sampler not in ("ddim", "euler"):
        raise ValueError(f"unknown sampler {sampler!r}: choose 'ddim' or 'euler'")
    return ddim_plan(schedule, steps) if sampler == "ddim" else euler_plan(schedule, steps)


def img2img_plan(p: Plan, strength: float) -> Plan:
    """Image-to-image runs the last int(n strength) of the n steps (as diffusers'
    StableDiffusionImg2ImgPipeline counts them), from a noised image instead of pure noise."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = len(p.timesteps)
    start = n - min(int(n * strength), n)
    if start == n:
        raise ValueError(f"strength {strength} runs no step of {n}: raise it or the number of steps")
    cut = lambda a: None if a is None else a[start:]  # noqa: E731
    return replace(p, timesteps=p.timesteps[start:], abar=cut(p.abar), abar_prev=cut(p.abar_prev), sigmas=cut(p.sigmas))


def noise_to_start(p: Plan, x0: mx.array, noise: mx.array) -> mx.array:
    """Clean latents -> the plan's first point: sqrt(abar) x0 + sqrt(1 - abar) eps (DDIM), or
    x0 + sigma eps (Euler's x = x0 + sigma eps)."""
    if p.sampler == "ddim":
        return add_noise(x0, noise, mx.array(p.abar[0]))
    return x0 + mx.array(p.sigmas[0]) * noise


def noised_at(p: Plan, x0: mx.array, noise: mx.array, i: int) -> mx.array:
    """x0 noised to the plan's i-th point, as the schedulers' add_noise (inpainting's known region)."""
    if p.sampler == "ddim":
        return add_noise(x0, noise, mx.array(p.abar[i]))
    return x0 + mx.array(p.sigmas[i]) * noise


# ---- one step -------------------------------------------------------------------------------------


def scale_model_input(p: Plan, i: int, x: mx.array) -> mx.array:
    """What the model sees at step i: x itself (DDIM), x / sqrt(sigma^2 + 1) (Euler)."""
    if p.sampler == "ddim":
        return x
    return (x.astype(mx.float32) / float((np.float32(p.sigmas[i]) ** 2 + 1) ** 0.5)).astype(x.dtype)


def ddim_step(p: Plan, i: int, x: mx.array, out: mx.array, eta: float = 0.0, noise: mx.array | None = None) -> mx.array:
    """x_t -> x_t' (eq. 12), in float32, returned in x's dtype. eta > 0 needs `noise` ~ N(0, I)."""
    a_t, a_prev = p.abar[i], p.abar_prev[i]
    x32, out32 = x.astype(mx.float32), out.astype(mx.float32)
    x0, eps = predict_x0_eps(x32, out32, mx.array(a_t), p.prediction_type)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std, a_prev = mx.array(np.float32(eta * variance**0.5)), mx.array(a_prev)
    x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + std * noise.astype(mx.float32)
    return x_prev.astype(x.dtype)


def euler_step(p: Plan, i: int, x: mx.array, out: mx.array) -> mx.array:
    """x_sigma -> x_sigma' with dx/dsigma = (x - x0) / sigma, in float32 (as diffusers)."""
    sigma, sigma_next = mx.array(p.sigmas[i]), mx.array(p.sigmas[i + 1])
    x32, out32 = x.astype(mx.float32), out.astype(mx.float32)
    if p.prediction_type == "epsilon":
        x0 = x32 - sigma * out32
    else:  # v-prediction in sigma form: x0 = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1)
        x0 = out32 * (-sigma / (sigma**2 + 1) ** 0.5) + x32 / (sigma**2 + 1)
    derivative = (x32 - x0) / sigma
    return (x32 + derivative * (sigma_next - sigma)).astype(x.dtype)


def step(p: Plan, i: int, x: mx.array, out: mx.array) -> mx.array:
    return ddim_step(p, i, x, out) if p.sampler == "ddim" else euler_step(p, i, x, out)


def denoise(predict: Callable[[mx.array, float], mx.array], x: mx.array, p: Plan) -> Iterator[mx.array]:
    """Run the plan from noise `x` (already scaled by p.init_noise_sigma). predict(x_in, t) is
    the model output (after guidance) at the scaled input and training timestep t. Yields x
    after every step, evaluated, so memory does not grow with the number of steps."""
    for i, t in enumerate(p.timesteps):
        x = step(p, i, x, predict(scale_model_input(p, i, x), float(t)))
        mx.eval(x)
        yield x
