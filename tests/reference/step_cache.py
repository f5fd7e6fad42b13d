"""Reference fixture for step caching: diffusers' First-Block Cache hook on a tiny FluxPipeline.

`FluxTransformer2DModel.enable_cache(FirstBlockCacheConfig(threshold))`, 20 steps, dev-like
(guidance embedding, FLUX.1-dev's scheduler). Random weights change the first block's residual by
40-50% a step, so nothing would ever be skipped; as in the turn-3 notes (section D), the time /
guidance / pooled embedding is damped (x0.07) so that the relative change is ~5-10% a step, as in a
trained model. Written under out/step_cache/:

  transformer/, scheduler/     the model and FLUX.1-dev's scheduler config (VAE and text: flux_pipeline's)
  io.safetensors               noise; per threshold: final packed latents and a 0/1 mask of the skipped
                               steps (which steps the tail block did not run); the same with true CFG
                               (negative prompt, true_cfg_scale 2: "cond" and "uncond" decide apart)
"""

import contextlib
import io
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.hooks import FirstBlockCacheConfig
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ._common import randomize, save, seeded
from .sampling import SCHEDULERS
from .vae import _config as vae_config

TEXT = Path(__file__).resolve().parents[1] / "fixtures" / "text_encoders" / "flux"
PROMPT, NEGATIVE = "a red cube", "blurry"
SIZE, STEPS, GUIDANCE, LENGTH = 32, 20, 3.5, 512
THRESHOLDS = (0.05, 0.1, 0.2)
CFG_THRESHOLD = 0.1


def transformer() -> FluxTransformer2DModel:
    cfg = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
               joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    model = randomize(FluxTransformer2DModel(**cfg), seed=80)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("time_text_embed"):
                p.mul_(0.07)
    return model


def run(pipe, model, noise, config, cfg: bool):
    """(final packed latents, skipped-step masks per context, what the hook printed) with a diffusers
    cache config (None: no cache), the hook's decisions read off the tail block: a call whose tail
    block did not run is a skipped one. MagCache's reference (mag_cache.py) runs it too."""
    ran, per_call = [], []
    # (on the block's attention: the hook replaces the block's forward, so the block itself is still called)
    hook = model.single_transformer_blocks[-1].attn.register_forward_hook(lambda m, a, o: ran.append(1))
    original = model.cache_context

    @contextlib.contextmanager
    def spy(name, **kw):  # which context each forward ran in, and whether its tail block ran
        before = len(ran)
        with original(name, **kw):
            yield
        per_call.append((name, len(ran) - before))

    model.cache_context = spy
    if config is not None:
        model.enable_cache(config)
    extra = dict(negative_prompt=NEGATIVE, true_cfg_scale=2.0) if cfg else {}
    printed = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(printed):
            latents = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           max_sequence_length=LENGTH, latents=noise, output_type="latent", **extra).images
    finally:
        if config is not None:
            model.disable_cache()
        hook.remove()
        model.cache_context = original
    masks = {}
    for context in ("cond", "uncond") if cfg else ("cond",):
        calls = [n for name, n in per_call if name == context]
        masks[context] = torch.tensor([float(n == 0) for n in calls])
    return latents, masks, printed.getvalue()


def tiny_pipeline():
    """-> (pipe, its transformer, the noise (1, 4, h, w), the noise packed): the tiny dev-like
    FluxPipeline (flux_pipeline's VAE and text encoders) both caching references run."""
    vae = randomize(AutoencoderKL(**vae_config((8, 8, 16, 16), 4, 1, 4, sd_style=False)), seed=60)  # flux_pipeline's
    text = dict(
        text_encoder=CLIPTextModel.from_pretrained(TEXT / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TEXT / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(TEXT / "text_encoder_2").eval(),
        tokenizer_2=T5Tokenizer.from_pretrained(TEXT / "tokenizer_2"),
    )
    model = transformer()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"])
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=model, **text)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=seeded(9))
    return pipe, model, noise, FluxPipeline._pack_latents(noise, 1, 4, SIZE // 8, SIZE // 8)


def make(out: Path) -> None:
    root = out / "step_cache"
    pipe, model, noise, packed = tiny_pipeline()
    scheduler = pipe.scheduler
    tensors = {"noise": noise}
    for threshold in (None, *THRESHOLDS):
        fbc = None if threshold is None else FirstBlockCacheConfig(threshold=threshold)
        latents, masks, _ = run(pipe, model, packed, fbc, cfg=False)
        name = "none" if threshold is None else f"{threshold:g}"
        tensors[f"latents_{name}"] = latents
        tensors[f"skipped_{name}"] = masks["cond"]
        print(f"  FBC {name}: skipped steps {[i for i, v in enumerate(masks['cond'].tolist()) if v]}")
    latents, masks, _ = run(pipe, model, packed, FirstBlockCacheConfig(threshold=CFG_THRESHOLD), cfg=True)
    tensors["latents_cfg"], tensors["skipped_cfg_cond"], tensors["skipped_cfg_uncond"] = latents, masks["cond"], masks["uncond"]
    print(f"  FBC {CFG_THRESHOLD:g} with true CFG: cond skips {[i for i, v in enumerate(masks['cond'].tolist()) if v]}, "
          f"uncond skips {[i for i, v in enumerate(masks['uncond'].tolist()) if v]}")
    model.save_pretrained(root / "transformer")
    scheduler.save_pretrained(root / "scheduler")
    save(root / "io.safetensors", tensors)
