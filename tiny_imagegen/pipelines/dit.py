"""DiT-XL/2 (facebook/DiT-XL-2-256 / -512): what is DiT's own of the pipeline, as diffusers'
DiTPipeline does it. The shared loop is pipeline.py's.

- "prompts" are ImageNet classes: an id ("207") or a name from the repo's model_index.json
  `id2label` ("golden retriever"; each of the comma-separated synonyms there works, as in
  DiTPipeline.get_label_ids, here also case-insensitively). The empty prompt is the null class
  (index 1000), the unconditional branch of classifier-free guidance.
- noise: latents (1, H/8, W/8, 4) of the SD VAE (stabilityai/sd-vae-ft-ema), decoded as z / 0.18215.
- sampler: DDIM (the hub repos' DDIMScheduler: linear betas 1e-4..0.02) or Euler, diffusion/ddpm.py.
- guidance (> 1): [x; x] with labels [y; null] in one forward; DiTPipeline guides the eps half
  of the output, all `in_channels` = 4 channels of it (the original DiT sample.py guides only the
  first 3, "for exact reproducibility": `cfg_channels=3`), then keeps eps and drops the learned
  variance (the sampler's variance is fixed).
"""

import difflib
import json
from pathlib import Path

import mlx.core as mx

from ..diffusion import ddpm
from ..checkpoints.quantize import quantize_component
from ..checkpoints.dit import load_dit
from ..checkpoints.vae import load_vae
from .loading import load_converted_parts
from .batch import Conditioning
from .pipeline import Pipeline
from ..registry import SamplingDefaults
from ..diffusion.step_cache import CacheConfig, for_generation

QUANTIZED_ON_LOAD = ("dit",)


def read_id2label(folder: Path) -> dict[int, str]:
    """A DiT repo's class names: model_index.json `id2label` ({} when it has none)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return {int(k): v for k, v in (index.get("id2label") or {}).items()}


class ClassLabels:
    """The DiT's "text encoder": prompts -> {"y": (B,) int32 class labels}."""

    def __init__(self, id2label: dict[int, str], num_classes: int):
        self.num_classes = num_classes
        self.ids = {name.strip().lower(): i for i, names in id2label.items() for name in names.split(",")}

    def label(self, prompt: str) -> int:
        p = prompt.strip()
        if not p:
            return self.num_classes  # the null class
        if p.isdigit():
            if int(p) >= self.num_classes:
                raise ValueError(f"class {p} is out of range: this DiT knows classes 0-{self.num_classes - 1}")
            return int(p)
        if p.lower() in self.ids:
            return self.ids[p.lower()]
        if not self.ids:
            raise ValueError(f"{prompt!r}: this folder has no class names (model_index.json id2label); give a class id")
        close = difflib.get_close_matches(p.lower(), self.ids, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{prompt!r} is not an ImageNet class name of this model (or an id 0-{self.num_classes - 1}){hint}")

    def __call__(self, prompts: list[str]) -> dict:
        return {"y": mx.array([self.label(p) for p in prompts], dtype=mx.int32)}


class DiTPipeline(Pipeline):
    """`generate(prompts)` with class ids or names; the negative prompt is the null class unless
    given (then guidance steers away from that class). Options: `sampler` "ddim" (default) or
    "euler", `cfg_channels` (None: all eps channels, as DiTPipeline)."""

    family = "dit"
    img2img = False  # DiTPipeline has none
    scheduler_config: dict | None = None  # the folder's scheduler/scheduler_config.json

    @classmethod
    def load(cls, folder, *, spec, name, dtype, quantize, keep_text_encoders, verify):
        from ..registry.hub import is_converted

        folder = Path(folder)
        if is_converted(folder):
            parts, _ = load_converted_parts(folder, dtype, quantize, verify, QUANTIZED_ON_LOAD)
            transformer, vae = parts["dit"], parts["vae"]
        else:
            transformer = load_dit(folder / "transformer", dtype=dtype)
            vae = load_vae(folder / "vae", dtype=dtype)
            if quantize:
                quantize_component("dit", transformer, quantize)
        if transformer.config.num_classes is None:
            raise ValueError(f"{folder}: a text-conditioned DiT has no published pipeline; this one takes class labels")
        side = transformer.config.sample_size * vae.config.downscale
        defaults = spec.defaults if spec else SamplingDefaults(steps=50, guidance=4.0, text_length=0, width=side, height=side)
        id2label = read_id2label(folder)

        def text():
            return ClassLabels(id2label, transformer.config.num_classes)

        pipe = cls(name, transformer, vae, text(), defaults, dtype, keep_text_encoders, load_text_encoder=text, spec=spec)
        scheduler = folder / "scheduler" / "scheduler_config.json"
        pipe.scheduler_config = json.loads(scheduler.read_text()) if scheduler.is_file() else None
        return pipe

    # ---- DiT's own steps --------------------------------------------------------------------------

    def schedule(self, sampler: str) -> ddpm.DDPMSchedule:
        """The repo's scheduler config read for `sampler`, else the hub repos' DDIM config."""
        if self.scheduler_config is None:
            return ddpm.SCHEDULES["dit-ddim"]
        return ddpm.DDPMSchedule.from_diffusers(self.scheduler_config, sampler=sampler)

    def uses_negative(self, guidance, options) -> bool:
        return guidance > 1.0  # as DiTPipeline: guidance_scale > 1

    def latent_shape(self, width, height):
        f = self.vae.config.downscale
        return (height // f, width // f, self.transformer.config.in_channels)  # (h, w, C)

    def sample(self, noise, cond: Conditioning, *, steps, guidance, width, height, init, strength, run,
               sampler: str = "ddim", cfg_channels: int | None = None, cache: str | CacheConfig | None = None):
        """`cache`: step caching, "fbc[:T]" / "mag[:T]" (step_cache.py), contexts kept in `self.step_cache`."""
        if init is not None:
            raise ValueError("DiT has no image-to-image here (DiTPipeline has none): drop the init image")
        C = self.transformer.config.in_channels
        B = noise.shape[0]
        p = ddpm.plan(self.schedule(sampler), sampler, steps)
        guided = self.uses_negative(guidance, {})
        y = cond.positive["y"]
        if guided:
            y = mx.concatenate([y, cond.negative["y"]])  # [labels; null class]
        k = C if cfg_channels is None else cfg_channels
        if not 0 < k <= C:
            raise ValueError(f"cfg_channels must be 1..{C}, got {cfg_channels}")

        caches = self.step_cache = for_generation(cache, guidance=guided, steps=len(p.timesteps),
                                                   mag_ratios=self.defaults.mag_ratios,
                                                   mag_retention=self.defaults.mag_retention)
        context = caches and (caches.batched if guided else caches.positive)

        def eps(x, i):
            x_in = ddpm.scale_model_input(p, i, x)
            xs = mx.concatenate([x_in, x_in]) if guided else x_in
            t = mx.full((xs.shape[0],), float(p.timesteps[i]), dtype=mx.float32)
            out = self.transformer(xs.astype(self.dtype), t, y, cache=context)[..., :C]  # eps; the learned variance dropped
            if not guided:
                return out
            cond_eps, uncond_eps = out[:B], out[B:]
            guided_eps = ddpm.classifier_free_guidance(cond_eps[..., :k], uncond_eps[..., :k], guidance)
            return mx.concatenate([guided_eps, cond_eps[..., k:]], axis=-1)

        def step(i, x):
            return ddpm.step(p, i, x, eps(x, i))

        return run(step, noise.astype(mx.float32) * p.init_noise_sigma, len(p.timesteps))
