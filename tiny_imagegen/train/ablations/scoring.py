"""The two training objectives of the ablations, a sampler for each, and how a run is scored.

    flow   flow matching as the shipped model is trained (flow_matching.py: logit-normal t, loss
           ||v_θ(x_t, t) - (ε - x0)||²); sampled with 20 Euler steps on FLUX's unshifted schedule
           (diffusion/flow_matching.py), exactly as the Pipeline samples tiny-shapes (tests/test_ablations.py
           checks the two agree on the shipped weights).
    ddpm   DDPM ε-prediction (Ho et al., 2020) on DiT's linear schedule (ddpm.SCHEDULES["dit-ddim"]:
           betas 1e-4..0.02 over 1000 steps): k uniform on 0..999, x_k = sqrt(abar_k) x0 +
           sqrt(1 - abar_k) ε, loss ||ε_θ(x_k, k / 1000) - ε||²; sampled with 20 DDIM steps (eta 0),
           diffusion/ddpm.py.

Both are guided the same way: classifier-free guidance on the model output with the empty caption
as the unconditional branch, [cond; uncond] in one forward (as the Pipeline batches it).

Scoring, by the scene parser (scene_parser.evaluate), one image per caption, image i from noise seed i:

    train      the first n train-split captions of caption stream 2026: the same captions as
               `tiny-imagegen evaluate --split train`, so the shipped row is comparable to docs/tiny-shapes.md
    binding    the first m captions of that stream that relate two objects of different colours
               ("a red square to the left of a blue circle"): the colour of each object must be
               tied to the right shape and the right place
    train_128  the train captions at 128x128 (the dataset renders the same scenes larger; the
               model saw only 64x64): the position-encoding rows' extrapolation test
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

from ...diffusion import ddpm
from ...models.pixels import to_pil
from ...diffusion.flow_matching import classifier_free_guidance, denoise, flux_schedule, sample_noise
from ..objectives import flow_matching_loss, interpolate
from ..scene_parser import evaluate
from ..shapes_dataset import parse_caption, sample_scene

OBJECTIVES = ("flow", "ddpm")
DDPM_SCHEDULE = ddpm.SCHEDULES["dit-ddim"]
CAPTION_SEED = 2026  # the evaluate command's caption stream
LATENT_SIZE = 16  # 64x64 images through the shipped VAE (4x down)


# ---- losses ----------------------------------------------------------------------------------------


def flow_loss(model, x0, ids, mask, noise, t) -> mx.array:
    """x0, noise (B, h, w, C) latents, ids/mask (B, L), t (B,) in (0, 1)."""
    txt, pooled = model.encode_text(ids, mask)
    return flow_matching_loss(model(interpolate(x0, noise, t), t, txt, pooled), x0, noise)


@lru_cache(maxsize=1)
def _abar() -> mx.array:
    return mx.array(ddpm.alphas_cumprod(DDPM_SCHEDULE))  # (1000,)


def ddpm_loss(model, x0, ids, mask, noise, k) -> mx.array:
    """As flow_loss, with k (B,) integer DDPM steps in 0..999."""
    abar = _abar()[k].reshape(-1, *([1] * (x0.ndim - 1)))
    x_k = ddpm.add_noise(x0, noise, abar)
    txt, pooled = model.encode_text(ids, mask)
    eps = model(x_k, k.astype(mx.float32) / DDPM_SCHEDULE.num_train_timesteps, txt, pooled)
    return mx.mean(mx.square(eps - noise))


def ddpm_steps(key: mx.array, batch: int) -> mx.array:
    """(batch,) training steps k, uniform on 0..999."""
    return mx.random.randint(0, DDPM_SCHEDULE.num_train_timesteps, (batch,), key=key)


LOSSES = {"flow": flow_loss, "ddpm": ddpm_loss}


# ---- samplers --------------------------------------------------------------------------------------


def guided(denoiser, cond: tuple, uncond: tuple, scale: float):
    """predict(x, t) -> the guided output, one forward over [cond; uncond]; cond/uncond = (T5 states, pooled)."""
    txt, pooled = mx.concatenate([cond[0], uncond[0]]), mx.concatenate([cond[1], uncond[1]])

    def predict(x: mx.array, t: float) -> mx.array:
        B = x.shape[0]
        out = denoiser(mx.concatenate([x, x]), mx.full((2 * B,), t, dtype=mx.float32), txt, pooled)
        return classifier_free_guidance(out[:B], out[B:], scale)

    return predict


def sample_flow(predict, noise: mx.array, steps: int) -> mx.array:
    """Euler from t = 1 to 0 on the unshifted schedule, as Flux1Pipeline.sample for tiny-shapes."""
    x = noise
    for x in denoise(predict, noise, flux_schedule(steps, noise.shape[1] * noise.shape[2] // 4, shift=False)):
        pass
    return x


def sample_ddpm(predict, noise: mx.array, steps: int) -> mx.array:
    """Deterministic DDIM over `steps` of the 1000 training steps ("leading" spacing, DiT's config)."""
    plan = ddpm.plan(DDPM_SCHEDULE, "ddim", steps)
    T = DDPM_SCHEDULE.num_train_timesteps
    x = noise * plan.init_noise_sigma
    for x in ddpm.denoise(lambda x_in, k: predict(x_in, k / T), x, plan):
        pass
    return x


SAMPLERS = {"flow": sample_flow, "ddpm": sample_ddpm}


def generate(denoiser, objective: str, vae, tokenizer, captions: list[str], seeds: list[int], size: int = 64,
             steps: int = 20, guidance: float = 4.0, chunk: int = 50) -> np.ndarray:
    """(N, size, size, 3) uint8: caption i from noise seed i (the Pipeline's per-image noise)."""
    if objective not in SAMPLERS:
        raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")
    if len(captions) != len(seeds):
        raise ValueError(f"{len(captions)} captions but {len(seeds)} seeds")
    f, C = vae.config.downscale, vae.config.latent_channels
    chunk = max(1, chunk * 64 * 64 // (size * size))  # the same activations at every canvas size
    out = []
    for s in range(0, len(captions), chunk):
        part, part_seeds = captions[s : s + chunk], seeds[s : s + chunk]
        cond = denoiser.encode_text(*tokenizer(part))
        uncond = denoiser.encode_text(*tokenizer([""] * len(part)))
        noise = mx.concatenate([sample_noise(seed, (1, size // f, size // f, C)) for seed in part_seeds])
        latents = SAMPLERS[objective](guided(denoiser, cond, uncond, guidance), noise, steps)
        out.append(np.stack([np.asarray(im) for im in to_pil(vae.decode_latents(latents))]))
    return np.concatenate(out)


# ---- what is scored --------------------------------------------------------------------------------


def is_binding_case(caption: str) -> bool:
    """Two objects in a relation, of different colours."""
    spec = parse_caption(caption)
    return spec.relation is not None and spec.objects[0].colour != spec.objects[1].colour


@lru_cache(maxsize=4)
def caption_sets(n_train: int, n_binding: int) -> dict[str, tuple[str, ...]]:
    train = tuple(sample_scene(CAPTION_SEED, i, "train").caption for i in range(n_train))
    binding, i = [], 0
    while len(binding) < n_binding:
        caption = sample_scene(CAPTION_SEED, i, "train").caption
        if is_binding_case(caption):
            binding.append(caption)
        i += 1
    return {"train": train, "binding": tuple(binding)}


def score_denoiser(denoiser, objective: str, vae, tokenizer, n_train: int, n_binding: int, steps: int,
                   guidance: float, extrapolate: bool, grid: int = 4) -> tuple[dict, dict[str, np.ndarray]]:
    """-> ({set: parser accuracies}, {set: the first `grid` images}) for train, binding and, with
    `extrapolate`, train_128."""
    sets = caption_sets(n_train, n_binding)
    jobs = [("train", sets["train"], 64), ("binding", sets["binding"], 64)]
    if extrapolate:
        jobs.append(("train_128", sets["train"], 128))
    metrics, samples = {}, {}
    for name, captions, size in jobs:
        images = generate(denoiser, objective, vae, tokenizer, list(captions), list(range(len(captions))), size,
                          steps, guidance)
        metrics[name] = evaluate(list(captions), images, verbose=False)
        samples[name] = images[:grid]
    return metrics, samples
