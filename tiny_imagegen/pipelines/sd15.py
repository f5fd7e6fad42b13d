"""Stable Diffusion 1.5: what is its own of the pipeline (the shared loop is pipeline.py's).

- text: CLIP ViT-L/14's last hidden state (B, 77, 768) for each prompt, padded to 77 tokens with
  <|endoftext|> (SD 1.5's tokenizer), causal mask only, no padding mask, as diffusers'
  StableDiffusionPipeline; the U-Net cross-attends to all 77 positions.
- noise: latents (1, H/8, W/8, 4), times the sampler's init_noise_sigma (1 for DDIM, sigma_max
  for Euler).
- sampler: DDIM (default) or Euler on SD 1.5's DDPM schedule (diffusion/ddpm.py); the `sampler` option,
  and `karras=True` for Euler on Karras sigmas.
  The hub repo names PNDM, which is not implemented; DDIM and Euler read its config as diffusers
  does when a user swaps them in.
- guidance: classifier-free, eps_uncond + g (eps_text - eps_uncond), one batched forward of
  [text; negative] per step (`guidance` > 1; the negative prompt defaults to "").
- decoding: the SD VAE, latents / 0.18215.
- image-to-image and inpainting (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline on
  the base 4-channel U-Net): the init image's latents a sample of the VAE posterior (ε drawn before
  the noise), the last int(n·strength) steps; the mask nearest on the latent grid, and after every
  step the known region is the image re-noised to the next timestep with the same noise (the
  scheduler's add_noise), editing/masked_sampling.py. The 9-channel inpainting U-Net is not here.
"""

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from ..diffusion import ddpm
from ..checkpoints.quantize import quantize_component
from ..checkpoints.text_encoders import load_clip_text_model
from ..checkpoints.unet import load_unet
from ..checkpoints.vae import load_vae
from ..editing.masked_sampling import KnownRegion, masked_steps
from .loading import load_converted_parts, reloading
from .batch import Conditioning
from .pipeline import Pipeline
from ..registry import find
from ..diffusion.flow_matching import classifier_free_guidance
from ..text import CLIPTokenizer

QUANTIZED_ON_LOAD = ("unet", "clip")  # the VAE stays as it is
SAMPLERS = ("ddim", "euler")


class CLIPHiddenStates:
    """prompts -> {"context": CLIP's last hidden state (B, 77, D)}."""

    def __init__(self, tokenizer: CLIPTokenizer, clip):
        self.tokenizer, self.clip = tokenizer, clip

    def __call__(self, prompts: list[str]) -> dict:
        ids, _ = self.tokenizer(prompts)
        hidden, _ = self.clip(ids)  # no padding mask, as StableDiffusionPipeline
        return {"context": hidden}


def scheduler_config(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class SD15Pipeline(Pipeline):
    family = "sd15"
    inpaint = True  # StableDiffusionInpaintPipeline with the base U-Net
    init_posterior = "sample"  # retrieve_latents' default sample_mode, as the img2img/inpaint pipelines

    @classmethod
    def load(cls, folder, *, spec, name, dtype, quantize, keep_text_encoders, verify):
        from ..registry.hub import is_converted

        folder = Path(folder)
        defaults = spec.defaults if spec else find("sd15").defaults
        if is_converted(folder):
            parts, _ = load_converted_parts(folder, dtype, quantize, verify, QUANTIZED_ON_LOAD)
            unet, vae = parts["unet"], parts["vae"]

            component = reloading(parts, folder, dtype, quantize, QUANTIZED_ON_LOAD)

            def clip():
                return component("clip")
        else:
            unet, vae = load_unet(folder / "unet", dtype), load_vae(folder / "vae", dtype=dtype)
            if quantize:
                quantize_component("unet", unet, quantize)

            def clip():
                model = load_clip_text_model(folder / "text_encoder", dtype)
                if quantize:
                    quantize_component("clip", model, quantize)
                return model

        def text():
            return CLIPHiddenStates(CLIPTokenizer.from_folder(folder / "tokenizer"), clip())

        pipe = cls(name, unet, vae, text(), defaults, dtype, keep_text_encoders, load_text_encoder=text, spec=spec)
        pipe.scheduler = scheduler_config(folder)
        return pipe

    # ---- SD's own steps ---------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        return self.vae.config.downscale  # no patches: any multiple of 8

    def uses_negative(self, guidance, options) -> bool:
        return guidance > 1.0

    def latent_shape(self, width, height):
        f = self.vae.config.downscale
        return (height // f, width // f, self.vae.config.latent_channels)  # (h, w, 4)

    def schedule(self, sampler: str, karras: bool = False) -> ddpm.DDPMSchedule:
        """The folder's scheduler config read as `sampler` reads it (SD 1.5's when there is none)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for Stable Diffusion: choose from {SAMPLERS}")
        if karras and sampler != "euler":
            raise ValueError("Karras sigmas are a schedule of the Euler sampler: pass sampler='euler'")
        cfg = getattr(self, "scheduler", {})
        schedule = ddpm.DDPMSchedule.from_diffusers(cfg, sampler) if cfg else ddpm.SCHEDULES[f"sd15-{sampler}"]
        return replace(schedule, use_karras_sigmas=True) if karras else schedule

    def sample(self, noise, cond: Conditioning, *, steps, guidance, width, height, init, strength, run,
               sampler: str = "ddim", karras: bool = False, mask: mx.array | None = None):
        B = noise.shape[0]
        p = ddpm.plan(self.schedule(sampler, karras), sampler, steps)
        region = None
        if init is None:
            x = noise.astype(mx.float32) * p.init_noise_sigma
        else:
            p = ddpm.img2img_plan(p, strength)
            x0, eps = mx.broadcast_to(init, noise.shape), noise.astype(mx.float32)
            x = ddpm.noise_to_start(p, x0, eps)
            if mask is not None:  # the known region re-noised to the next timestep (add_noise)
                region = KnownRegion(x0, eps, mask, lambda x0, eps, i: ddpm.noised_at(p, x0, eps, i))
        context = cond.positive["context"]
        cfg = guidance > 1.0
        if cfg:  # one forward for both: [text; negative]
            context = mx.concatenate([context, cond.negative["context"]])

        def step(i, x):
            x_in = ddpm.scale_model_input(p, i, x).astype(self.dtype)
            eps = self.transformer(mx.concatenate([x_in, x_in]) if cfg else x_in, float(p.timesteps[i]), context)
            if cfg:
                eps = classifier_free_guidance(eps[:B], eps[B:], guidance)
            return ddpm.step(p, i, x, eps)

        n = len(p.timesteps)
        return run(masked_steps(step, region, list(range(n + 1))), x, n)

