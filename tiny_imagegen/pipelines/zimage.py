"""Z-Image (Turbo): what is Z-Image's own of the pipeline. The shared loop is pipeline.py's.

- text: Qwen3-4B's hidden states after its second-to-last layer (no final norm), of the prompt in
  Qwen's chat template, truncated to 512 tokens; pad tokens are dropped, so every prompt has its own
  length: {"cap_feats": (B, L_max, 2560) right-padded, "cap_lengths": (B,)}.
- noise: float32 latents (1, H/8, W/8, 16), channels last; they stay float32 between steps, the
  transformer sees them cast to its dtype.
- sampler: Euler on the flow, σ = shift-3 warp of linspace(1, 1/n, n) (sampling.zimage_sigmas);
  the model gets t = 1 - σ and predicts x0 - ε, so the velocity is its negative.
- guidance: classifier-free, on when `guidance` > 0, v = pos + g (pos - neg), one batched forward
  [pos; neg] (captions padded to a common length, each keeps its own). g is ZImagePipeline's
  guidance_scale as it is: Turbo is distilled for g = 0; g = 1 is already 2 pos - neg.
- decode: the FLUX.1 VAE, latents / 0.3611 + 0.1159, as every FLUX VAE (vae/config.json).

- image-to-image and inpainting (ZImageImg2ImgPipeline, ZImageInpaintPipeline): the size is the
  image's, floored to 16; its latents a sample of the VAE posterior (ε drawn before the noise);
  the start σ·ε + (1 - σ)·x0 at the truncated schedule's first σ, computed in the model dtype like
  the reference's first latents; inpainting's mask nearest on the latent grid and the shared
  masked sampling (editing/masked_sampling.py).

The text encoder (7.5 GB in bf16) is released after encoding, before the transformer runs, and
re-loaded lazily by the next `generate` (pipeline.py).
"""

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoints.quantize import quantize_component
from ..checkpoints.vae import load_vae
from ..checkpoints.zimage import load_zimage_transformer
from ..editing.masked_sampling import KnownRegion, flow_noised, masked_steps
from .batch import Conditioning
from .pipeline import Pipeline
from ..conditioning.qwen import ZIMAGE_HIDDEN_STATES, QwenPromptEncoder
from ..registry import SamplingDefaults, find
from ..diffusion.flow_matching import (euler_step, img2img_schedule, renormalize_guidance, zimage_guidance,
                                       zimage_model_time, zimage_sigmas)
from ..diffusion.step_cache import CacheConfig, for_generation
from ..text import QwenTokenizer

TRANSFORMER, TEXT_ENCODER = "zimage_transformer", "qwen3"
QUANTIZED_ON_LOAD = (TRANSFORMER, TEXT_ENCODER)  # the VAE stays as it is


class ZImageText:
    """prompts -> {"cap_feats": (B, L, 2560) Qwen3 hidden_states[-2], right-padded to the longest
    prompt, "cap_lengths": (B,) its prompt tokens}. The padding rows are never read: Z-Image
    drops them (ZP:248), and with causal attention they do not change the real rows."""

    def __init__(self, encoder: QwenPromptEncoder):
        self.encoder = encoder

    def __call__(self, prompts: list[str]) -> dict:
        embeds, mask = self.encoder(prompts)
        return {"cap_feats": embeds, "cap_lengths": mask.sum(axis=1).astype(mx.int32)}


def pad_captions(feats: mx.array, length: int) -> mx.array:
    """(B, L, D) -> (B, length, D) with zero rows appended (they are never read: cap_lengths)."""
    extra = length - feats.shape[1]
    return feats if extra <= 0 else mx.pad(feats, [(0, 0), (0, extra), (0, 0)])


def join_conditions(a: dict, b: dict) -> tuple[mx.array, list[int]]:
    """[pos; neg] as one batch: captions padded to a common length, lengths kept per row."""
    length = max(a["cap_feats"].shape[1], b["cap_feats"].shape[1])
    feats = mx.concatenate([pad_captions(a["cap_feats"], length), pad_captions(b["cap_feats"], length)])
    return feats, _lengths(a) + _lengths(b)


def _lengths(cond: dict) -> list[int]:
    return np.array(cond["cap_lengths"]).astype(int).tolist()


def defaults_for_folder(folder: Path) -> SamplingDefaults:
    """A Z-Image folder the registry does not know: Turbo's defaults, with the static shift its
    scheduler config says."""
    base = find("z-image-turbo").defaults
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        return replace(base, shift=float(json.loads(scheduler.read_text()).get("shift", base.shift)))
    return base


class ZImagePipeline(Pipeline):
    family = "zimage"
    img2img = True  # ZImageImg2ImgPipeline
    inpaint = True  # ZImageInpaintPipeline
    init_posterior = "sample"  # retrieve_latents' default sample_mode (ZI:327)
    batch_cfg = True  # positive and negative in one forward

    @classmethod
    def load(cls, folder, *, spec, name, dtype, quantize, keep_text_encoders, verify):
        from ..registry.hub import is_converted
        from .loading import load_converted_parts, reloading

        folder = Path(folder)
        defaults = spec.defaults if spec else defaults_for_folder(folder)
        if is_converted(folder):
            parts, _ = load_converted_parts(folder, dtype, quantize, verify, QUANTIZED_ON_LOAD)
            transformer, vae = parts[TRANSFORMER], parts["vae"]

            component = reloading(parts, folder, dtype, quantize, QUANTIZED_ON_LOAD)

            def text():
                model = component(TEXT_ENCODER)
                tokenizer = QwenTokenizer.from_folder(folder / "tokenizer")
                return ZImageText(QwenPromptEncoder(tokenizer, model, ZIMAGE_HIDDEN_STATES, enable_thinking=True,
                                                    keep_padding=False, max_length=defaults.text_length))
        else:
            transformer = load_zimage_transformer(folder / "transformer", dtype=dtype)
            vae = load_vae(folder / "vae", dtype=dtype)
            if quantize:
                quantize_component(TRANSFORMER, transformer, quantize)

            def text():  # reads only the 35 of Qwen3-4B's 36 layers that hidden_states[-2] needs
                return ZImageText(QwenPromptEncoder.zimage(folder, dtype=dtype, bits=quantize,
                                                           max_length=defaults.text_length))
        return cls(name, transformer, vae, text(), defaults, dtype, keep_text_encoders, load_text_encoder=text,
                   spec=spec)

    # ---- Z-Image's own steps ----------------------------------------------------------------------

    def uses_negative(self, guidance, options) -> bool:
        return guidance > 0  # ZImagePipeline.do_classifier_free_guidance: > 0, not > 1

    def latent_shape(self, width, height):
        f = self.vae.config.downscale
        return (height // f, width // f, self.vae.config.latent_channels)  # (h, w, C)

    def sample(self, noise, cond: Conditioning, *, steps, guidance, width, height, init, strength, run,
               shift: float | None = None, batch_cfg: bool | None = None, cfg_normalization: float = 0.0,
               cfg_truncation: float = 1.0, mask: mx.array | None = None, cache: str | CacheConfig | None = None):
        """Family options: `shift` overrides the static schedule shift (3); `batch_cfg=False` runs
        the negative prompt as a second forward (half the activations); ZImagePipeline's
        `cfg_normalization` (> 0: cap the guided prediction's norm at that multiple of the
        positive one's) and `cfg_truncation` (no guidance at steps whose model time exceeds it);
        `cache`: step caching, "fbc[:T]" / "mag[:T]" (step_cache.py; diffusers' hook cannot run on
        Z-Image, the same rule on its main layers here), contexts kept in `self.step_cache`."""
        B = noise.shape[0]
        sigmas = zimage_sigmas(steps, self.defaults.shift if shift is None else shift)
        x, region = noise.astype(mx.float32), None
        if init is not None:  # the first latents in the model dtype, float32 after the first step (ZI:344-345)
            sigmas = img2img_schedule(sigmas, strength)
            x0, eps = init.astype(self.dtype), noise.astype(self.dtype)
            x = flow_noised(x0, eps, sigmas[0]).astype(mx.float32)
            if mask is not None:
                region = KnownRegion(x0, eps, mask.astype(self.dtype), flow_noised)
        batched = guidance > 0 and (self.batch_cfg if batch_cfg is None else batch_cfg)
        pos = cond.positive["cap_feats"], _lengths(cond.positive)
        neg = (cond.negative["cap_feats"], _lengths(cond.negative)) if guidance > 0 else None
        joint = join_conditions(cond.positive, cond.negative) if batched else None
        caches = self.step_cache = for_generation(cache, guidance=guidance > 0, steps=len(sigmas) - 1,
                                                   mag_ratios=self.defaults.mag_ratios,
                                                   mag_retention=self.defaults.mag_retention)

        def forward(x, t, captions, context):  # the model's x0 - noise, float32
            ts = mx.full((x.shape[0],), t, dtype=mx.float32)  # t stays float32 in every dtype (ZP:510)
            return self.transformer(x.astype(self.dtype), ts, *captions, cache=caches and context(caches)).astype(mx.float32)

        def predict(x, t):
            if guidance <= 0 or t > cfg_truncation:  # ZP:504-515: CFG only when its scale is > 0
                return forward(x, t, pos, lambda c: c.positive)
            if batched:
                out = forward(mx.concatenate([x, x]), t, joint, lambda c: c.batched)
                out_pos, out_neg = out[:B], out[B:]
            else:  # unbatched guidance: a second forward
                out_pos, out_neg = forward(x, t, pos, lambda c: c.positive), forward(x, t, neg, lambda c: c.negative)
            pred = zimage_guidance(out_pos, out_neg, guidance)
            return renormalize_guidance(pred, out_pos, cfg_normalization) if cfg_normalization > 0 else pred

        def step(i, x):
            v = -predict(x, zimage_model_time(sigmas[i]))  # the flow's velocity noise - x0 (ZP:567)
            return euler_step(x, v, sigmas[i], sigmas[i + 1])

        return run(masked_steps(step, region, sigmas), x, len(sigmas) - 1)
