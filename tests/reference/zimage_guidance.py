"""Reference fixtures for Z-Image's guidance options at their edges: ZImagePipeline with
`cfg_truncation` set exactly to one step's model time (the pipeline compares `t_norm > truncation`,
so that step is still guided and only the later ones are not) and with `cfg_normalization` at 1.0
(the guided prediction's norm capped at the positive one's: a cap that bites on every guided step).

The tiny transformer, VAE, scheduler, caption features and noise are zimage.py's (the same seeds),
so the MLX test runs on tests/fixtures/zimage/pipeline and its io.safetensors.

Writes out/zimage_guidance/io.safetensors:
  model_t                  the four steps' model times (1000 - timestep) / 1000, float32
  boundary.truncation      model_t[2]: steps 0-2 are guided, step 3 is not
  boundary.latents         final latents (B, C, h, w), 4 steps, guidance 1.5, truncation at the boundary
  boundary_norm.latents    the same with cfg_normalization=1.0
"""

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

from ._common import save, seeded
from .zimage import CONFIG, HEIGHT, WIDTH, make_model, tiny_vae

STEPS, GUIDANCE, BOUNDARY_STEP = 4, 1.5, 2


def make(out: Path) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=tiny_vae(), text_encoder=None, tokenizer=None,
                          transformer=make_model())
    pipe.set_progress_bar_config(disable=True)
    g = seeded(5)  # the draws of zimage.make_pipeline, in its order
    pos = [torch.randn(n, CONFIG["cap_feat_dim"], generator=g) for n in (7, 40)]
    neg = [torch.randn(8, CONFIG["cap_feat_dim"], generator=g) for _ in range(2)]
    noise = torch.randn(2, CONFIG["in_channels"], HEIGHT // 8, WIDTH // 8, generator=g)
    run = dict(prompt_embeds=pos, negative_prompt_embeds=neg, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, latents=noise, output_type="latent")

    timesteps = []
    step = scheduler.step
    scheduler.step = lambda v, t, x, **kw: timesteps.append(t) or step(v, t, x, **kw)
    with torch.no_grad():
        pipe(**run)
    scheduler.step = step
    model_t = (1000 - torch.stack(timesteps).float()) / 1000  # as the pipeline's loop computes it
    truncation = float(model_t[BOUNDARY_STEP])
    io = {"model_t": model_t, "boundary.truncation": model_t[BOUNDARY_STEP : BOUNDARY_STEP + 1].clone()}
    with torch.no_grad():
        io["boundary.latents"] = pipe(**run, cfg_truncation=truncation).images
        io["boundary_norm.latents"] = pipe(**run, cfg_truncation=truncation, cfg_normalization=1.0).images
        io["untruncated.latents"] = pipe(**run).images
    save(out / "zimage_guidance" / "io.safetensors", io)
