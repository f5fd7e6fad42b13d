"""Reference schedules and steps from diffusers' DDIMScheduler and EulerDiscreteScheduler.

Configured from Stable Diffusion 1.5's scheduler/scheduler_config.json (a PNDMScheduler config,
read into the other classes with from_config, as users swap schedulers), and from the DDIM
config of diffusers' DiT converter. Writes out/ddpm/schedules.safetensors:

  <case>.alphas_cumprod                       the training table
  <case>.<steps>.timesteps / .sigmas           after set_timesteps(steps), several step counts
  <case>.step.<i>.{x,out,next}                one step on random inputs at step i of 10
  ddim_eta1.step.<i>.{x,out,noise,next}       DDIM with eta 1 and given variance noise
"""

from pathlib import Path

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from ._common import save, save_json, seeded

# stable-diffusion-v1-5/stable-diffusion-v1-5, scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
# diffusers' scripts/convert_dit_to_diffusers.py
DIT = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
       "prediction_type": "epsilon", "clip_sample": False}

CASES = {
    "sd15_ddim": (DDIMScheduler, SD15),
    "sd15_ddim_v": (DDIMScheduler, {**SD15, "prediction_type": "v_prediction"}),
    "sd15_euler": (EulerDiscreteScheduler, SD15),
    "sd15_euler_v": (EulerDiscreteScheduler, {**SD15, "prediction_type": "v_prediction"}),
    "sd15_euler_karras": (EulerDiscreteScheduler, {**SD15, "use_karras_sigmas": True}),
    "sd15_ddim_trailing": (DDIMScheduler, {**SD15, "timestep_spacing": "trailing"}),
    "sd15_euler_leading": (EulerDiscreteScheduler, {**SD15, "timestep_spacing": "leading"}),
    "dit_ddim": (DDIMScheduler, DIT),
}
STEPS = (1, 4, 7, 20, 30, 50)


def make(out: Path) -> None:
    tensors = {}
    g = seeded(0)
    for name, (cls, cfg) in CASES.items():
        scheduler = cls.from_config(cfg)
        tensors[f"{name}.alphas_cumprod"] = scheduler.alphas_cumprod
        for steps in STEPS:
            scheduler.set_timesteps(steps)
            tensors[f"{name}.{steps}.timesteps"] = scheduler.timesteps.to(torch.float64)
            if hasattr(scheduler, "sigmas"):
                tensors[f"{name}.{steps}.sigmas"] = scheduler.sigmas
                tensors[f"{name}.{steps}.init_noise_sigma"] = torch.tensor(float(scheduler.init_noise_sigma))
        scheduler.set_timesteps(10)
        for i in (0, 4, 9):
            x, model_out = torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 4, 5, 3, generator=g)
            t = scheduler.timesteps[i]
            if cls is EulerDiscreteScheduler:
                scheduler._step_index = i
                tensors[f"{name}.step.{i}.scaled"] = scheduler.scale_model_input(x, t)
                scheduler._step_index = i
            tensors[f"{name}.step.{i}.x"], tensors[f"{name}.step.{i}.out"] = x, model_out
            tensors[f"{name}.step.{i}.next"] = scheduler.step(model_out, t, x, return_dict=False)[0]
    scheduler = DDIMScheduler.from_config(SD15)
    scheduler.set_timesteps(10)
    for i in (0, 4, 9):
        x, model_out, noise = (torch.randn(2, 4, 5, 3, generator=g) for _ in range(3))
        tensors.update({f"ddim_eta1.step.{i}.x": x, f"ddim_eta1.step.{i}.out": model_out,
                        f"ddim_eta1.step.{i}.noise": noise})
        tensors[f"ddim_eta1.step.{i}.next"] = scheduler.step(
            model_out, scheduler.timesteps[i], x, eta=1.0, variance_noise=noise, return_dict=False)[0]
    # image-to-image: the tail of the schedule and the noised start, as StableDiffusionImg2ImgPipeline
    x0, noise = torch.randn(1, 4, 3, 5, generator=g), torch.randn(1, 4, 3, 5, generator=g)
    tensors.update({"img2img.x0": x0, "img2img.noise": noise})
    for name, cls in (("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)):
        for steps, strength in ((10, 0.6), (7, 0.75), (4, 1.0)):
            scheduler = cls.from_config(SD15)
            scheduler.set_timesteps(steps)
            t_start = max(steps - min(int(steps * strength), steps), 0)
            timesteps = scheduler.timesteps[t_start:]
            if hasattr(scheduler, "set_begin_index"):  # Euler finds its sigma by this index
                scheduler.set_begin_index(t_start)
            key = f"img2img.{name}.{steps}.{strength}"
            tensors[key + ".timesteps"] = timesteps.to(torch.float64)
            tensors[key + ".start"] = scheduler.add_noise(x0, noise, timesteps[:1])
    save(out / "ddpm" / "schedules.safetensors", tensors)
    save_json(out / "ddpm" / "configs.json", {"sd15": SD15, "dit": DIT})
