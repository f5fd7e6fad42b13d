"""Reference schedules from diffusers' FlowMatchEulerDiscreteScheduler, configured as the FLUX.1
repos configure it (scheduler/scheduler_config.json), and set as FluxPipeline sets it."""

from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ._common import save

SCHEDULERS = {
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
}
CASES = [(4, 256), (4, 4096), (28, 1024), (50, 4096), (1, 64), (20, 1600)]


def make(out: Path) -> None:
    tensors = {}
    for model, cfg in SCHEDULERS.items():
        for steps, seq_len in CASES:
            scheduler = FlowMatchEulerDiscreteScheduler(**cfg)
            sigmas = np.linspace(1.0, 1 / steps, steps)
            mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
            tensors[f"{model}.{steps}.{seq_len}"] = scheduler.sigmas.to(torch.float32)
    # one Euler step through the scheduler itself
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.8)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    tensors.update({"euler.x": x, "euler.v": v, "euler.sigmas": scheduler.sigmas,
                    "euler.out": scheduler.step(v, scheduler.timesteps[1], x, return_dict=False)[0]})
    save(out / "sampling" / "schedules.safetensors", tensors)
