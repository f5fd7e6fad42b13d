"""Qwen-Image (and Qwen-Image-2512): what is its own of the pipeline (diffusers' QwenImagePipeline,
QP:410-715, and QwenImageImg2ImgPipeline). The shared loop is pipeline.py's.

- text: Qwen2.5-VL-7B's language model, `hidden_states[-1]` of the prompt in Qwen-Image's system
  template, less the template's first 34 tokens, re-padded to the longest prompt with a mask
  (conditioning/qwen.py QwenImagePromptEncoder): {"txt": (B, L, 3584), "txt_mask": (B, L)}. The
  mask stays with its row, so several images per prompt keep the right mask (diffusers repeats
  the embeddings per prompt but the masks per batch, QP:260-263: a bug for > 1 prompt).
- noise: drawn in the packed space, (1, H/16, W/16, 64): a 2x2 patch of the 16-channel latent per
  token, feature c·4 + 2·dy + dx; the tokens are that grid row-major (QP:333-354).
- sampler: Euler on the flow, `flow_matching.stretched_shift_schedule` (dynamic exponential shift, then
  stretched to end at 0.02). The model sees (σ·1000 in float32, cast to the latents' dtype) / 1000;
  the latents stay in the model dtype between steps (`euler_step_in_model_dtype`).
- guidance: `guidance` is QwenImagePipeline's `true_cfg_scale`. Above 1 it runs true classifier-
  free guidance against the negative prompt (`negative_prompt`, "" unless given): two forwards per
  step, each with its own mask, v = neg + s (cond - neg) rescaled per token to the norm of cond
  (QP:668-672). At 1 or below, one forward. (diffusers runs no guidance unless a negative prompt is
  passed, whatever true_cfg_scale says; here the default guidance 4 with "" is its
  `negative_prompt=""`. The model card suggests `--negative-prompt " "`.)
- image-to-image and inpainting (QwenImageImg2ImgPipeline, QwenImageInpaintPipeline): the last
  int(n·strength) steps, from σ·noise + (1 - σ)·x0, x0 the image's latents as a sample of the VAE
  posterior (ε drawn before the noise, QI:251), normalised and packed. Inpainting: the mask nearest
  on the 8x latent grid, over every channel, then packed like the latents (QIP:476-520: so a token's
  four sub-positions keep their own mask values), and the shared masked sampling
  (editing/masked_sampling.py), the blend in the model dtype.
- decode: per-channel de-normalisation z = latents / (1/std) + mean, unpatchify, the VAE
  (models/vae_qwen.py), clamped to [-1, 1].
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..editing.masked_sampling import KnownRegion, flow_noised, masked_steps
from ..layers.attention import reading_out
from .loading import load_parts
from ..models.vae_flux2 import patchify, unpatchify
from .batch import Conditioning
from .pipeline import Pipeline
from ..conditioning.qwen import QwenImagePromptEncoder, qwen_image_tokens_cut
from ..registry import SamplingDefaults
from ..diffusion.flow_matching import (euler_step_in_model_dtype, img2img_schedule, noise_image,
                                      stretched_shift_schedule, timesteps_in_dtype)
from ..diffusion.step_cache import CacheConfig, for_generation
from ..text import QwenTokenizer

TRANSFORMER, VAE, TEXT_ENCODER = "qwen_image_transformer", "qwen_vae", "qwen3"
QUANTIZED_ON_LOAD = (TRANSFORMER, TEXT_ENCODER)  # the VAE stays as it is
DEFAULTS = SamplingDefaults(steps=50, guidance=4.0, shift=True, text_length=512)  # QP:412-432, the model card
# Qwen-Image's scheduler_config.json (REFERENCE-NOTES-TURN3 A4, unverified offline): used where a
# folder has none (a converted folder keeps only the weights)
SCHEDULER = dict(base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02)


class QwenImageText:
    """prompts -> {"txt": (B, L, 3584), "txt_mask": (B, L) int32, 1 on prompt rows}."""

    def __init__(self, encoder: QwenImagePromptEncoder):
        self.encoder = encoder

    def __call__(self, prompts: list[str]) -> dict:
        embeds, mask = self.encoder(prompts)
        return {"txt": embeds, "txt_mask": mx.ones(embeds.shape[:2], mx.int32) if mask is None else mask}


def read_scheduler(folder: Path) -> dict:
    """The schedule's parameters from scheduler/scheduler_config.json, with the pipeline's own
    fallbacks for absent keys (QP:600-606: 256, 4096, 0.5, 1.15); Qwen-Image's where there is no file."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return dict(SCHEDULER)
    cfg = json.loads(path.read_text())
    if not cfg.get("use_dynamic_shifting", False) or cfg.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"{path}: only the dynamic exponential shift (use_dynamic_shifting, exponential) is implemented")
    return dict(base_seq_len=cfg.get("base_image_seq_len", 256), max_seq_len=cfg.get("max_image_seq_len", 4096),
                base_shift=cfg.get("base_shift", 0.5), max_shift=cfg.get("max_shift", 1.15),
                shift_terminal=cfg.get("shift_terminal"))


def true_cfg(cond: mx.array, neg: mx.array, scale: float) -> mx.array:
    """neg + s (cond - neg), rescaled per token to ||cond|| (norms over the 64 packed channels,
    taken in float32 and rounded to the model dtype, as torch.norm on bf16)."""
    comb = neg + scale * (cond - neg)

    def norm(a):
        return mx.sqrt(mx.sum(mx.square(a.astype(mx.float32)), axis=-1, keepdims=True)).astype(a.dtype)

    return comb * (norm(cond) / norm(comb))


class QwenImagePipeline(Pipeline):
    family = "qwen_image"
    inpaint = True  # QwenImageInpaintPipeline
    init_posterior = "sample"  # retrieve_latents' default sample_mode (QI:251, QIP:251)

    def __init__(self, *args, schedule: dict | None = None, tokenizer: QwenTokenizer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule, self.tokenizer = schedule or dict(SCHEDULER), tokenizer

    @classmethod
    def load(cls, folder, *, spec, name, dtype, quantize, keep_text_encoders, verify):
        folder = Path(folder)
        defaults = spec.defaults if spec else DEFAULTS
        transformer, vae, encoder, _ = load_parts(folder, (TRANSFORMER, VAE, TEXT_ENCODER), dtype, quantize, verify,
                                                  QUANTIZED_ON_LOAD)
        tokenizer = QwenTokenizer.from_folder(folder / "tokenizer")

        def text():
            return QwenImageText(QwenImagePromptEncoder(tokenizer, encoder(), defaults.text_length))

        return cls(name, transformer, vae, text(), defaults, dtype, keep_text_encoders, load_text_encoder=text,
                   spec=spec, schedule=read_scheduler(folder), tokenizer=tokenizer)

    # ---- Qwen-Image's own steps -------------------------------------------------------------------

    def uses_negative(self, guidance, options) -> bool:
        return guidance > 1.0

    def latent_shape(self, width, height):
        f = self.size_multiple
        return (height // f, width // f, 4 * self.vae.config.latent_channels)  # (h, w, 64), packed

    def tokens_cut(self, prompt: str) -> int:
        return qwen_image_tokens_cut(self.tokenizer, prompt, self.defaults.text_length) if self.tokenizer else 0

    def init_latents(self, q, eps: mx.array | None) -> mx.array:
        """The init image's latents as the transformer reads them: normalised, packed (1, H/16, W/16, 64)."""
        return patchify(super().init_latents(q, eps))

    def latent_mask(self, mask, width: int, height: int) -> mx.array:
        """The mask nearest on the 8x latent grid, broadcast over the z channels and packed like
        the latents (QIP: prepare_mask_latents): (1, H/16, W/16, 4 z)."""
        m = super().latent_mask(mask, width, height)  # (1, h, w, 1)
        return patchify(mx.broadcast_to(m, (*m.shape[:3], self.vae.config.latent_channels)))

    def decode(self, latents, tiled=None):
        return self.vae.decode_latents(unpatchify(latents.astype(self.dtype)), tiled=bool(tiled))

    def sample(self, noise, cond: Conditioning, *, steps, guidance, width, height, init, strength, run,
               mask: mx.array | None = None, cache: str | CacheConfig | None = None):
        """`cache`: step caching, "fbc[:T]" / "mag[:T]" (step_cache.py, as diffusers' hook runs on
        QwenImagePipeline: the positive and the negative forward each in its own context, "cond"
        and "uncond"); its contexts are kept in `self.step_cache`."""
        B, h, w, C = noise.shape
        dtype = self.dtype  # the latents take the text's dtype (QP:590)
        schedule = stretched_shift_schedule(steps, h * w, **self.schedule)
        x, region = noise.astype(dtype), None
        if init is not None:  # scale_noise at the first kept sigma (QI:457), in float32
            schedule = img2img_schedule(schedule, strength)
            s = float(np.float32(schedule[0]))
            x = noise_image(mx.broadcast_to(init, noise.shape), noise.astype(mx.float32), s).astype(dtype)
            if mask is not None:  # the known region, as tokens (B, N, C) like x, in the model dtype (QIP:960-970)
                tokens = lambda a: mx.broadcast_to(a, noise.shape).reshape(B, h * w, C).astype(dtype)  # noqa: E731
                region = KnownRegion(tokens(init), tokens(noise), tokens(mask), flow_noised)
        x = x.reshape(B, h * w, C)
        streams = [cond.positive] + ([cond.negative] if self.uses_negative(guidance, {}) else [])
        streams = [(c["txt"], None if bool(mx.all(c["txt_mask"])) else c["txt_mask"],
                    self.transformer.rope_table(h, w, c["txt"].shape[1])) for c in streams]

        caches = self.step_cache = for_generation(cache, guidance=len(streams) == 2, steps=len(schedule) - 1,
                                                   mag_ratios=self.defaults.mag_ratios,
                                                   mag_retention=self.defaults.mag_retention)

        def forward(x, ts, stream, context):
            txt, mask, rope = stream
            return self.transformer(x, txt, ts, (h, w), mask, rope, cache=context)

        def velocity(x, t):
            ts = timesteps_in_dtype(t, B, dtype)  # σ·1000 rounded to the latents' dtype, / 1000
            v = forward(x, ts, streams[0], caches and caches.positive)
            if len(streams) == 1:
                return v
            with reading_out(None):  # the negative's pass is not read into attention maps
                v_neg = forward(x, ts, streams[1], caches and caches.negative)
            return true_cfg(v, v_neg, guidance)

        def step(i, x):
            return euler_step_in_model_dtype(x, velocity(x, schedule[i]), schedule[i], schedule[i + 1])

        x = run(masked_steps(step, region, schedule), x, len(schedule) - 1)
        return x.reshape(B, h, w, C)
