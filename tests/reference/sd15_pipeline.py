"""Reference fixture for the Stable Diffusion 1.5 pipeline: diffusers' StableDiffusionPipeline, tiny.

Its text half is the tiny CLIP text model and tokenizer of text_encoders.py (tests/fixtures/
text_encoders/flux: text_encoder/, tokenizer/; the tokenizer pads with <|endoftext|> as SD 1.5's
does). Here we add a tiny U-Net of SD's structure (cross-attention to the 64-wide CLIP states)
and an SD-style VAE (4 latent channels, quant convs, scale 0.18215) with seeded weights, SD 1.5's
scheduler config, and run the pipeline from given noise with classifier-free guidance and a
negative prompt, with DDIMScheduler and EulerDiscreteScheduler (from that config, as a user swaps them
in; Euler also on Karras sigmas). Writes under out/sd15_pipeline/:

  unet/ vae/ scheduler/ model_index.json   the repo folders (the test adds text_encoder/, tokenizer/)
  io.safetensors   the noise; per sampler the final latents and the images in [0, 1]; image-to-image
                   (StableDiffusionImg2ImgPipeline from given init latents, strength 0.6 of 5 steps):
                   its noise (drawn from seed 7 as the pipeline draws it) and final latents
"""

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextModel, CLIPTokenizer

from ._common import randomize, save, save_json, seeded
from .ddpm import SD15
from .unet import SMALL
from .vae import _config as vae_config

TEXT = Path(__file__).resolve().parents[1] / "fixtures" / "text_encoders" / "flux"
PROMPTS = ["a red circle to the left of a blue square", "Ein Café in Tōkyō"]
NEGATIVE = ["blurry", "a green triangle"]
HEIGHT, WIDTH = 32, 48  # latents 4x6: the U-Net's 3 levels go 4x6 -> 2x3 -> 1x2 and crop on the way up
STEPS, GUIDANCE = 4, 7.5
UNET = {**SMALL["sd_small"], "cross_attention_dim": 64}
SAMPLERS = {"ddim": (DDIMScheduler, SD15), "euler": (EulerDiscreteScheduler, SD15),
            "euler_karras": (EulerDiscreteScheduler, {**SD15, "use_karras_sigmas": True})}


def make(out: Path) -> None:
    root = out / "sd15_pipeline"
    unet = randomize(UNet2DConditionModel(**UNET), seed=80)
    vae = randomize(AutoencoderKL(**vae_config((8, 8, 16, 16), 4, 1, 4, sd_style=True)), seed=81)
    text = dict(text_encoder=CLIPTextModel.from_pretrained(TEXT / "text_encoder").eval(),
                tokenizer=CLIPTokenizer.from_pretrained(TEXT / "tokenizer"))
    noise = torch.randn(len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8, generator=seeded(6))
    io = {"noise": noise}
    for name, (cls, config) in SAMPLERS.items():
        pipe = StableDiffusionPipeline(vae=vae, unet=unet, scheduler=cls.from_config(config), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **text)
        pipe.set_progress_bar_config(disable=True)
        run = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, latents=noise.clone())
        with torch.no_grad():
            io[f"{name}.latents"] = pipe(**run, output_type="latent").images
            io[f"{name}.images"] = pipe(**run, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    init = torch.randn(len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8, generator=seeded(8))
    io["img2img.init"] = init
    io["img2img.noise"] = torch.randn(init.shape, generator=seeded(7))  # what the pipeline draws below
    for name in ("ddim", "euler"):
        cls, config = SAMPLERS[name]
        pipe = StableDiffusionImg2ImgPipeline(vae=vae, unet=unet, scheduler=cls.from_config(config), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False, **text)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():  # 4-channel images are taken as latents, not encoded
            io[f"img2img.{name}.latents"] = pipe(
                prompt=PROMPTS, negative_prompt=NEGATIVE, image=init, strength=0.6, num_inference_steps=5,
                guidance_scale=GUIDANCE, generator=seeded(7), output_type="latent").images
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    save_json(root / "scheduler" / "scheduler_config.json", SD15)
    save_json(root / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    })
    save(root / "io.safetensors", io)
