"""Reference fixtures for the FLUX.1 pipeline paths beside plain text-to-image: true classifier-free
guidance (FluxPipeline with `true_cfg_scale` and a negative prompt) and image-to-image
(FluxImg2ImgPipeline), on the tiny models of flux_pipeline.py (the same seeded transformer, VAE and
text folder, so the MLX test loads them from tests/fixtures/flux_pipeline and text_encoders).

Writes out/flux_paths/io.safetensors, per variant (schnell_like, dev_like):
  <variant>.cfg.latents / .images      true CFG, 3 steps: schnell-like with true_cfg_scale 3.0,
                                       dev-like with true_cfg_scale 2.0 beside its distilled 3.5
  <variant>.img2img.noise              the noise the pipeline drew (B, C, h, w)
  <variant>.img2img.init_latents       the init image's latents (its VAE posterior's mode: ours is
                                       deterministic, so the reference is asked for the mode too)
  <variant>.img2img.latents / .images  strength 0.6 of 5 steps (the last 3), from `init_pixels`
  init_pixels                          the init image, uint8 values (H, W, 3) stored as floats
"""

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline
from diffusers.pipelines.flux import pipeline_flux_img2img
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ._common import randomize, save, seeded
from .flux_pipeline import HEIGHT, PROMPTS, TEXT, VARIANTS, WIDTH, transformer
from .sampling import SCHEDULERS
from .vae import _config as vae_config

NEGATIVE = "a blurry photo"
TRUE_CFG = {"schnell_like": 3.0, "dev_like": 2.0}
CFG_STEPS, IMG2IMG_STEPS, STRENGTH = 3, 5, 0.6


def init_pixels() -> np.ndarray:
    """A smooth, seeded init image (H, W, 3) uint8: a gradient with noise, so no channel is flat."""
    g = np.random.default_rng(31)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([xx * 255 / WIDTH, yy * 255 / HEIGHT, (xx + yy) * 127 / (WIDTH + HEIGHT)], axis=-1)
    return np.clip(base + g.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _mode_latents(encoder_output, generator=None, sample_mode="sample"):
    return encoder_output.latent_dist.mode()


def make(out: Path) -> None:
    vae = randomize(AutoencoderKL(**vae_config((8, 8, 16, 16), 4, 1, 4, sd_style=False)), seed=60)
    text = dict(
        text_encoder=CLIPTextModel.from_pretrained(TEXT / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TEXT / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(TEXT / "text_encoder_2").eval(),
        tokenizer_2=T5Tokenizer.from_pretrained(TEXT / "tokenizer_2"),
    )
    pixels = init_pixels()
    io = {"init_pixels": torch.from_numpy(pixels.astype(np.float32))}
    noise = torch.randn(len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8, generator=seeded(5))
    for name, (guidance, scheduler_name, scale, length) in VARIANTS.items():
        model = transformer(guidance)
        parts = dict(vae=vae, transformer=model, **text)
        common = dict(prompt=PROMPTS, height=HEIGHT, width=WIDTH, guidance_scale=scale, max_sequence_length=length)

        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[scheduler_name]), **parts)
        packed = FluxPipeline._pack_latents(noise, len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8)
        run = dict(common, num_inference_steps=CFG_STEPS, true_cfg_scale=TRUE_CFG[name], negative_prompt=NEGATIVE,
                   latents=packed)
        with torch.no_grad():
            io[f"{name}.cfg.latents"] = pipe(**run, output_type="latent").images
            io[f"{name}.cfg.images"] = pipe(**run, output_type="pt").images

        pipe = FluxImg2ImgPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS[scheduler_name]), **parts)
        seen = {}
        scale_noise = pipe.scheduler.scale_noise

        def recording(sample, timestep, noise, seen=seen, scale_noise=scale_noise):
            seen["init"], seen["noise"] = sample.clone(), noise.clone()
            return scale_noise(sample, timestep, noise)

        pipe.scheduler.scale_noise = recording
        run = dict(common, image=Image.fromarray(pixels), strength=STRENGTH, num_inference_steps=IMG2IMG_STEPS)
        original = pipeline_flux_img2img.retrieve_latents
        pipeline_flux_img2img.retrieve_latents = _mode_latents
        try:
            with torch.no_grad():
                io[f"{name}.img2img.latents"] = pipe(**run, generator=seeded(6), output_type="latent").images
                io[f"{name}.img2img.images"] = pipe(**run, generator=seeded(6), output_type="pt").images
        finally:
            pipeline_flux_img2img.retrieve_latents = original
        io[f"{name}.img2img.noise"], io[f"{name}.img2img.init_latents"] = seen["noise"], seen["init"][:1]
    save(out / "flux_paths" / "io.safetensors", io)
