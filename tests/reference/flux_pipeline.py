"""Reference fixture for the whole pipeline: diffusers' FluxPipeline, tiny, four steps.

Its text half is the tiny FLUX text folder made by text_encoders.py (tests/fixtures/text_encoders/
flux: CLIP, T5 and their tokenizers); here we add a tiny transformer and VAE with seeded weights
and the FLUX.1 schedulers, run the pipeline from given noise, and write under out/flux_pipeline/:

  vae/                         AutoencoderKL (FLUX-style: no quant convs, scale 0.3611, shift 0.1159)
  <variant>/transformer/       FluxTransformer2DModel (schnell-like: no guidance; dev-like: guidance)
  <variant>/scheduler/         FlowMatchEulerDiscreteScheduler config as the FLUX.1 repos ship it
  <variant>/io.safetensors     the noise, the final packed latents and the images in [0, 1]

The MLX test assembles a folder laid out like the hub repo from these and runs our Pipeline on it.
"""

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ._common import randomize, save, seeded
from .sampling import SCHEDULERS
from .vae import _config as vae_config

TEXT = Path(__file__).resolve().parents[1] / "fixtures" / "text_encoders" / "flux"
PROMPTS = ["a red circle to the left of a blue square", "Ein Café in Tōkyō"]
HEIGHT, WIDTH = 32, 48  # latents 4x6, tokens 2x3
VARIANTS = {  # (guidance embedding, scheduler, guidance scale, T5 length) as the FLUX.1 pipelines use them
    "schnell_like": (False, "schnell", 0.0, 256),
    "dev_like": (True, "dev", 3.5, 512),
}


def transformer(guidance: bool) -> FluxTransformer2DModel:
    cfg = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    return randomize(FluxTransformer2DModel(**cfg), seed=70 + guidance)


def make(out: Path) -> None:
    root = out / "flux_pipeline"
    vae = randomize(AutoencoderKL(**vae_config((8, 8, 16, 16), 4, 1, 4, sd_style=False)), seed=60)
    vae.save_pretrained(root / "vae")
    text = dict(
        text_encoder=CLIPTextModel.from_pretrained(TEXT / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TEXT / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(TEXT / "text_encoder_2").eval(),
        tokenizer_2=T5Tokenizer.from_pretrained(TEXT / "tokenizer_2"),
    )
    noise = torch.randn(len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8, generator=seeded(5))
    for name, (guidance, scheduler_name, scale, length) in VARIANTS.items():
        model = transformer(guidance)
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[scheduler_name])
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=model, **text)
        packed = FluxPipeline._pack_latents(noise, len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8)
        run = dict(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=scale,
                   max_sequence_length=length, latents=packed)
        with torch.no_grad():
            latents = pipe(**run, output_type="latent").images
            images = pipe(**run, output_type="pt").images  # (B, 3, H, W) in [0, 1]
        model.save_pretrained(root / name / "transformer")
        scheduler.save_pretrained(root / name / "scheduler")
        save(root / name / "io.safetensors", {"noise": noise, "latents": latents, "images": images})
