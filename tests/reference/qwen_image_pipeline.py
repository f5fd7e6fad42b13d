"""Reference fixtures for the Qwen-Image pipeline: diffusers' QwenImagePipeline and
QwenImageImg2ImgPipeline on a tiny random repo (tiny Qwen2.5-VL, the small Qwen tokenizer, a
2-block transformer, a base-4 VAE, Qwen-Image's scheduler config).

Writes under out/qwen_image_pipeline/:
  repo/                  the repo as save_pretrained writes it (model_index.json, scheduler/,
                         text_encoder/, tokenizer/, transformer/, vae/)
  io.safetensors         per run: the packed noise it starts from, the final packed latents
                         (output_type="latent") and the decoded images in [0, 1] (output_type="np")
  runs.json              each run's arguments; init.png the image-to-image input

Runs (2 prompts, non-square 80x48, 4 steps): `plain` (no guidance), `cfg` (true CFG 3.0 against 2
negative prompts of other lengths), both in fp32 and bf16 (the whole pipeline cast); `img2img`
(strength 0.6, 5 steps, fp32) with the posterior's mode instead of a sample (retrieve_latents
patched to sample_mode="argmax": torch's random draw cannot be replayed; ours uses the mode) and
the noise recorded from randn_tensor.
"""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageImg2ImgPipeline,
                       QwenImagePipeline, QwenImageTransformer2DModel)
from diffusers.pipelines.qwenimage import pipeline_qwenimage_img2img as img2img_module
from PIL import Image
from transformers import AutoTokenizer

from ._common import randomize, save, save_json, seeded
from .qwen_image_text import SMALL_TOKENIZER, tiny_encoder

TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
VAE = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
           latents_mean=[0.1, -0.5, 0.9, -0.2], latents_std=[2.5, 1.5, 0.75, 1.25])
SCHEDULER = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                 max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
PROMPTS = ["a red cat sitting on a mat", "the quick brown fox jumps over the lazy dog near a river bank"]
NEGATIVES = ["blurry", "ugly and low quality with bad anatomy"]
H, W = 48, 80
RUNS = {
    "plain": dict(prompt=PROMPTS, true_cfg_scale=1.0, num_inference_steps=4),
    "cfg": dict(prompt=PROMPTS, negative_prompt=NEGATIVES, true_cfg_scale=3.0, num_inference_steps=4),
}


def build(folder: Path) -> QwenImagePipeline:
    transformer = randomize(QwenImageTransformer2DModel(**TRANSFORMER), seed=29, std=0.2)
    vae = randomize(AutoencoderKLQwenImage(**VAE), seed=30, std=0.3)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                             text_encoder=tiny_encoder(), tokenizer=AutoTokenizer.from_pretrained(SMALL_TOKENIZER),
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def init_image() -> Image.Image:
    g = seeded(5)
    return Image.fromarray((torch.rand(H, W, 3, generator=g).numpy() * 255).astype(np.uint8))


def make(out: Path) -> None:
    folder = out / "qwen_image_pipeline"
    pipe = build(folder / "repo")
    io = {}
    # image-to-image first: below, the pipeline is cast to bf16 (a round trip back would round the weights)
    i2i = QwenImageImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    drawn, original_randn, original_retrieve = [], img2img_module.randn_tensor, img2img_module.retrieve_latents

    def recording_randn(*args, **kwargs):
        drawn.append(original_randn(*args, **kwargs))
        return drawn[-1]

    img2img_module.randn_tensor = recording_randn
    img2img_module.retrieve_latents = lambda out_, generator=None, sample_mode="sample": original_retrieve(
        out_, generator, "argmax")
    try:
        with torch.no_grad():
            latents = i2i(prompt=PROMPTS, image=init_image(), strength=0.6, num_inference_steps=5, height=H, width=W,
                          generator=seeded(9), output_type="latent").images
    finally:
        img2img_module.randn_tensor, img2img_module.retrieve_latents = original_randn, original_retrieve
    noise = drawn[0]  # (B, 1, z, h, w), packed as the pipeline packs it
    B, _, C, h, w = noise.shape
    io["img2img.noise"] = noise.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * 4)
    io["img2img.latents"] = latents
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        pipe = pipe.to(dtype)
        for name, kwargs in RUNS.items():
            noise = torch.randn(2, (H // 16) * (W // 16), 16, generator=seeded(7)).to(dtype)  # packed (B, N, 4 z)
            with torch.no_grad():
                latents = pipe(**kwargs, height=H, width=W, latents=noise, output_type="latent").images
                images = pipe(**kwargs, height=H, width=W, latents=noise, output_type="np").images
            io[f"{name}.noise{suffix}"] = noise
            io[f"{name}.latents{suffix}"] = latents
            io[f"{name}.images{suffix}"] = torch.from_numpy(np.asarray(images, np.float32))

    init_image().save(folder / "init.png")
    save(folder / "io.safetensors", io)
    save_json(folder / "runs.json", {"runs": RUNS, "height": H, "width": W, "img2img": dict(strength=0.6, steps=5)})
