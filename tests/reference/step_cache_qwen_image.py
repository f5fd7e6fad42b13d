"""Reference fixture for step caching on Qwen-Image: diffusers' First-Block Cache hook on the tiny
QwenImagePipeline of qwen_image_pipeline.py (`QwenImageTransformer2DModel.enable_cache(
FirstBlockCacheConfig(threshold))`, 20 steps, one prompt at 80x48). As for FLUX.1 (step_cache.py,
the turn-3 notes section D), the timestep embedding is damped (x0.07) so that the first block's
residual changes by a few percent a step, as in a trained model (random weights: nothing would be
skipped). QwenImagePipeline wraps its forwards in cache contexts "cond" and "uncond", so with true
CFG the positive and negative passes decide apart. Written under out/step_cache_qwen_image/:

  transformer/         the damped transformer (the rest of the repo: qwen_image_pipeline's)
  io.safetensors       noise; per threshold: final packed latents and a 0/1 mask of the skipped steps;
                       the same with true CFG 3.0 against "blurry" (masks per context)
"""

import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.hooks import FirstBlockCacheConfig

from ._common import save, seeded
from .qwen_image_pipeline import H, W, build

PROMPT, NEGATIVE = "a red cat sitting on a mat", "blurry"
STEPS, TRUE_CFG = 20, 3.0
THRESHOLDS = (0.05, 0.1, 0.2)
CFG_THRESHOLD = 0.1
DAMPING = 0.07


def run(pipe, noise, threshold, cfg: bool):
    """(final packed latents, skipped-step mask per context), read off the last block: a forward
    whose last block's attention did not run is a skipped one."""
    model, ran, per_call = pipe.transformer, [], []
    hook = model.transformer_blocks[-1].attn.register_forward_hook(lambda m, a, o: ran.append(1))
    original = model.cache_context

    @contextmanager
    def spy(name, **kw):
        before = len(ran)
        with original(name, **kw):
            yield
        per_call.append((name, len(ran) - before))

    model.cache_context = spy
    if threshold is not None:
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    extra = dict(negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG) if cfg else dict(true_cfg_scale=1.0)
    try:
        with torch.no_grad():
            latents = pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, latents=noise,
                           output_type="latent", **extra).images
    finally:
        if threshold is not None:
            model.disable_cache()
        hook.remove()
        model.cache_context = original
    return latents, {c: torch.tensor([float(n == 0) for name, n in per_call if name == c])
                     for c in (("cond", "uncond") if cfg else ("cond",))}


def make(out: Path) -> None:
    root = out / "step_cache_qwen_image"
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build(Path(tmp))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if name.startswith("time_text_embed"):
                p.mul_(DAMPING)
    noise = torch.randn(1, (H // 16) * (W // 16), 16, generator=seeded(11))  # packed: 4 latent channels x 2 x 2
    tensors = {"noise": noise}
    for threshold in (None, *THRESHOLDS):
        latents, masks = run(pipe, noise, threshold, cfg=False)
        name = "none" if threshold is None else f"{threshold:g}"
        tensors[f"latents_{name}"], tensors[f"skipped_{name}"] = latents, masks["cond"]
        print(f"  FBC {name}: skipped steps {[i for i, v in enumerate(masks['cond'].tolist()) if v]}")
    latents, masks = run(pipe, noise, CFG_THRESHOLD, cfg=True)
    tensors["latents_cfg"], tensors["skipped_cfg_cond"], tensors["skipped_cfg_uncond"] = latents, masks["cond"], masks["uncond"]
    print(f"  FBC {CFG_THRESHOLD:g} with true CFG: cond skips {[i for i, v in enumerate(masks['cond'].tolist()) if v]}, "
          f"uncond skips {[i for i, v in enumerate(masks['uncond'].tolist()) if v]}")
    pipe.transformer.save_pretrained(root / "transformer")
    save(root / "io.safetensors", tensors)
