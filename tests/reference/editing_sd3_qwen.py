"""Reference fixtures for inpainting in the SD3.5 and Qwen-Image families: diffusers'
StableDiffusion3InpaintPipeline and QwenImageInpaintPipeline on the tiny random repos of
tests/fixtures/sd3_pipeline/repo and tests/fixtures/qwen_image_pipeline/repo, fp32 and bf16, run with a
seeded torch generator. Neither pipeline lets given `latents` be the noise of an inpainting run
(SD3: they replace the noised image; Qwen-Image: prepare_latents returns early), so the draws the
generator made are redrawn here in the same order (the posterior's ε, then the noise; a third draw,
for the unused masked-image latents, follows) and stored for the MLX side.

Writes under out/editing_sd3_qwen/:
  images.safetensors  the init images and masks, uint8 (H, W, 3) / (H, W), not the output size
                      (resized by the pipelines, LANCZOS) and not square
  sd3.safetensors     StableDiffusion3InpaintPipeline, 48x32 output (6x4 latents), 5 steps, strength
                      0.6 (the last 3), CFG 5 against "blurry", 16 T5 tokens: ε and noise
                      (B, h, w, 16), final latents (B, h, w, 16), `pixels` decoded as
                      StableDiffusion3Pipeline decodes (latents / scale + shift) and
                      `inpaint_pipeline_pixels`, the inpainting pipeline's own output, which forgets
                      the shift (SD3I:1368): uint8 as floats (B, H, W, 3); the run in bf16: its ε,
                      noise and final latents (`*_bf16`)
  qwen_image.safetensors  QwenImageInpaintPipeline, 80x48 output, 6 steps, strength 0.8 (the last
                      4), true CFG 3 against "blurry": ε (B, h, w, z), packed noise (B, h/2, w/2,
                      4z), the packed token mask, final packed latents (B, N, 4z), pixels; the run
                      in bf16: its ε, noise and final latents (`*_bf16`)
"""

from pathlib import Path

import numpy as np
import torch
from diffusers import QwenImageInpaintPipeline, StableDiffusion3InpaintPipeline

from ._common import save, seeded
from .editing import pil, run  # run: pipe(prompt=PROMPT, ...) -> (last latents, uint8 pixels)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def images() -> dict[str, np.ndarray]:
    """Seeded noise pictures with a white block to repaint and a grey (< 0.5: kept) patch."""
    rng = np.random.default_rng(2705)
    out = {"sd3_image": rng.integers(0, 256, (60, 40, 3), dtype=np.uint8),  # w 40, h 60 -> 32 x 48
           "qwen_image": rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)}  # w 70, h 50 -> 80 x 48
    mask = np.zeros((60, 40), np.uint8)
    mask[10:40, 8:30], mask[48:56, 2:12] = 255, 120
    out["sd3_mask"] = mask
    mask = np.zeros((50, 70), np.uint8)
    mask[5:30, 30:66], mask[38:46, 4:20] = 255, 110
    out["qwen_mask"] = mask
    return out


def sd3(out: Path, pics: dict) -> None:
    pipe = StableDiffusion3InpaintPipeline.from_pretrained(FIXTURES / "sd3_pipeline" / "repo")
    pipe.set_progress_bar_config(disable=True)
    seed = 281
    latents, pipeline_pixels = run(pipe, image=pil(pics["sd3_image"]), mask_image=pil(pics["sd3_mask"]), height=48,
                                   width=32, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                                   negative_prompt="blurry", max_sequence_length=16, generator=seeded(seed))
    g = seeded(seed)  # SD3I:751 then SD3I:727: the posterior's ε, then the noise
    eps = torch.randn(1, 16, 6, 4, generator=g)
    noise = torch.randn(1, 16, 6, 4, generator=g)
    vae = pipe.vae
    with torch.no_grad():  # as StableDiffusion3Pipeline decodes (SP:1131)
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    decoded = pipe.image_processor.postprocess(decoded, output_type="np")
    pixels = torch.from_numpy(np.round(decoded * 255).astype(np.float32))
    io = {"eps": eps.permute(0, 2, 3, 1), "noise": noise.permute(0, 2, 3, 1), "latents": latents.permute(0, 2, 3, 1),
          "pixels": pixels, "inpaint_pipeline_pixels": pipeline_pixels}
    pipe.to(torch.bfloat16)  # the same run in bf16: ε and the noise are drawn in bf16 (randn_tensor's dtype)
    latents, _ = run(pipe, image=pil(pics["sd3_image"]), mask_image=pil(pics["sd3_mask"]), height=48, width=32,
                     strength=0.6, num_inference_steps=5, guidance_scale=5.0, negative_prompt="blurry",
                     max_sequence_length=16, generator=seeded(seed))
    g = seeded(seed)
    io["eps_bf16"] = torch.randn(1, 16, 6, 4, generator=g, dtype=torch.bfloat16).permute(0, 2, 3, 1)
    io["noise_bf16"] = torch.randn(1, 16, 6, 4, generator=g, dtype=torch.bfloat16).permute(0, 2, 3, 1)
    io["latents_bf16"] = latents.permute(0, 2, 3, 1)
    save(out / "sd3.safetensors", io)


def qwen_image(out: Path, pics: dict) -> None:
    pipe = QwenImageInpaintPipeline.from_pretrained(FIXTURES / "qwen_image_pipeline" / "repo")
    pipe.set_progress_bar_config(disable=True)
    seed = 282
    latents, pixels = run(pipe, image=pil(pics["qwen_image"]), mask_image=pil(pics["qwen_mask"]), height=48, width=80,
                          strength=0.8, num_inference_steps=6, true_cfg_scale=3.0, negative_prompt="blurry",
                          generator=seeded(seed))
    z, h, w = pipe.vae.config.z_dim, 48 // 8, 80 // 8
    g = seeded(seed)  # QIP:251 then QIP:319: the posterior's ε (B, z, 1, h, w), then the noise (B, 1, z, h, w)
    eps = torch.randn(1, z, 1, h, w, generator=g)[:, :, 0]
    noise = torch.randn(1, 1, z, h, w, generator=g)[:, 0]
    packed = noise.view(1, z, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h // 2, w // 2, 4 * z)
    mask = pipe.mask_processor.preprocess(pil(pics["qwen_mask"]), height=48, width=80)
    mask = torch.nn.functional.interpolate(mask, size=(h, w)).repeat(1, z, 1, 1)
    token_mask = mask.view(1, z, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h // 2, w // 2, 4 * z)
    io = {"eps": eps.permute(0, 2, 3, 1), "noise": packed, "token_mask": token_mask, "latents": latents,
          "pixels": pixels}
    pipe.to(torch.bfloat16)  # the same run in bf16: ε and the noise are drawn in bf16 (randn_tensor's dtype)
    latents, _ = run(pipe, image=pil(pics["qwen_image"]), mask_image=pil(pics["qwen_mask"]), height=48, width=80,
                     strength=0.8, num_inference_steps=6, true_cfg_scale=3.0, negative_prompt="blurry",
                     generator=seeded(seed))
    g = seeded(seed)
    io["eps_bf16"] = torch.randn(1, z, 1, h, w, generator=g, dtype=torch.bfloat16)[:, :, 0].permute(0, 2, 3, 1)
    noise = torch.randn(1, 1, z, h, w, generator=g, dtype=torch.bfloat16)[:, 0]
    io["noise_bf16"] = noise.view(1, z, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, h // 2, w // 2, 4 * z)
    io["latents_bf16"] = latents
    save(out / "qwen_image.safetensors", io)


def make(out: Path) -> None:
    folder = out / "editing_sd3_qwen"
    pics = images()
    save(folder / "images.safetensors", {k: torch.from_numpy(v) for k, v in pics.items()})
    sd3(folder, pics)
    qwen_image(folder, pics)
