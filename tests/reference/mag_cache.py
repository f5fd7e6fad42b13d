"""Reference fixture for MagCache: diffusers' MagCache hook on the tiny FluxPipeline of step_cache.py.

The same model (2 double + 2 single blocks, its time/guidance/pooled embedding damped x0.07 so a
step changes the residual as a trained model's does: turn-3 notes, section D), scheduler, text
encoders, prompt and noise as tests/reference/step_cache.py (whose transformer/ and scheduler/ the
test loads); `FluxTransformer2DModel.enable_cache(MagCacheConfig(threshold, mag_ratios=FLUX_MAG_RATIOS,
num_inference_steps=20))` (28 ratios resampled to 20 by the hook), 20 steps. Written under
out/mag_cache/io.safetensors:

  latents_<thr>, skipped_<thr>     final packed latents and a 0/1 mask of the skipped steps (the tail
                                   block did not run) at thresholds 0 (steps whose ratio is exactly 1 still
                                   skip), 0.06 (the default), 0.1, 0.2
  latents_k1_0.2, skipped_k1_0.2   threshold 0.2 with max_skip_steps 1 and retention_ratio 0.3
  latents_cfg, skipped_cfg_*       threshold 0.1 with true CFG (negative prompt, true_cfg_scale 2): the
                                   "cond" and "uncond" contexts
  calibration                      the ratios the hook prints with calibrate=True (no CFG)
  flux_mag_ratios                  diffusers' FLUX_MAG_RATIOS (the registry's FLUX.1 ratios must equal them)
  interp_<n>                       nearest_interp(FLUX_MAG_RATIOS, n) for n = 1, 7, 20, 50
"""

import ast
from pathlib import Path

import torch
from diffusers.hooks import MagCacheConfig
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp

from ._common import save
from .step_cache import STEPS, run, tiny_pipeline

THRESHOLDS = (0.0, 0.06, 0.1, 0.2)
CFG_THRESHOLD = 0.1
INTERP = (1, 7, 20, 50)


def _steps(mask) -> list[int]:
    return [i for i, v in enumerate(mask.tolist()) if v]


def make(out: Path) -> None:
    root = out / "mag_cache"
    pipe, model, _, packed = tiny_pipeline()  # step_cache.py's model, scheduler, text encoders and noise
    tensors = {"flux_mag_ratios": FLUX_MAG_RATIOS.clone()}
    for n in INTERP:
        tensors[f"interp_{n}"] = nearest_interp(FLUX_MAG_RATIOS, n)

    def config(threshold, **kw):
        return MagCacheConfig(threshold=threshold, num_inference_steps=STEPS, mag_ratios=FLUX_MAG_RATIOS.clone(), **kw)

    for name, cfg in [(f"{t:g}", config(t)) for t in THRESHOLDS] + [
            ("k1_0.2", config(0.2, max_skip_steps=1, retention_ratio=0.3))]:
        latents, masks, _ = run(pipe, model, packed, cfg, cfg=False)
        tensors[f"latents_{name}"], tensors[f"skipped_{name}"] = latents, masks["cond"]
        print(f"  MagCache {name}: skipped steps {_steps(masks['cond'])}")
    latents, masks, _ = run(pipe, model, packed, config(CFG_THRESHOLD), cfg=True)
    tensors["latents_cfg"] = latents
    tensors["skipped_cfg_cond"], tensors["skipped_cfg_uncond"] = masks["cond"], masks["uncond"]
    print(f"  MagCache {CFG_THRESHOLD:g} with true CFG: cond skips {_steps(masks['cond'])}, "
          f"uncond skips {_steps(masks['uncond'])}")
    _, _, printed = run(pipe, model, packed, MagCacheConfig(calibrate=True, num_inference_steps=STEPS), cfg=False)
    lists = [line for line in printed.splitlines() if line.startswith("[") and not line.startswith("[MagCache")]
    assert len(lists) == 1, printed
    tensors["calibration"] = torch.tensor(ast.literal_eval(lists[0]), dtype=torch.float64)
    print(f"  MagCache calibration: {[round(r, 4) for r in tensors['calibration'].tolist()]}")
    save(root / "io.safetensors", tensors)
