"""Reference fixtures for Qwen-Image's VAE: diffusers' AutoencoderKLQwenImage on one frame.

Writes under out/qwen_vae/:
  tiny/diffusers/        config.json + weights, as the hub's vae/ folder (base_dim 4, z_dim 4, 4 levels)
  tiny/io.safetensors    encode (posterior mean, log-variance) of 2 non-square 24x40 images, decode
                         of (2, 4, 3, 5) latents, a tiled decode (32-pixel tiles every 24) of 7x9
                         latents; fp32 and bf16 (the same weights cast)
  units.safetensors      a causal 3-D convolution (3x3x3) and a 1x1x1 one on one frame, run by
                         diffusers' QwenImageCausalConv3d: weights, input, output
  manifest_qwen-image.json   key -> shape of the full-size VAE (126,892,531 values), on the meta device
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

from ._common import manifest, randomize, save, save_json, seeded

TINY = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
            latents_mean=[0.1, -0.5, 0.9, -0.2], latents_std=[2.5, 1.5, 0.75, 1.25])


def run(vae, dtype, io, suffix):
    with torch.no_grad():
        posterior = vae.encode(io["images"].to(dtype)[:, :, None]).latent_dist
        io[f"mean{suffix}"], io[f"logvar{suffix}"] = posterior.mean[:, :, 0], posterior.logvar[:, :, 0]
        io[f"decoded{suffix}"] = vae.decode(io["z"].to(dtype)[:, :, None]).sample[:, :, 0]
        vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                          tile_sample_stride_height=24, tile_sample_stride_width=24)
        io[f"tiled{suffix}"] = vae.decode(io["z_big"].to(dtype)[:, :, None]).sample[:, :, 0]
        vae.disable_tiling()


def make_tiny(out: Path) -> None:
    vae = randomize(AutoencoderKLQwenImage(**TINY), seed=27, std=0.4)  # outputs beyond [-1, 1]: the clamp shows
    folder = out / "qwen_vae" / "tiny"
    save(folder / "diffusers" / "diffusion_pytorch_model.safetensors", vae.state_dict())
    save_json(folder / "diffusers" / "config.json", {"_class_name": "AutoencoderKLQwenImage", **TINY})
    g = seeded(1)
    io = {"images": torch.rand(2, 3, 24, 40, generator=g) * 2 - 1, "z": torch.randn(2, 4, 3, 5, generator=g),
          "z_big": torch.randn(1, 4, 7, 9, generator=g)}
    run(vae, torch.float32, io, "")
    run(vae.to(torch.bfloat16), torch.bfloat16, io, "_bf16")
    save(folder / "io.safetensors", io)


def make_units(out: Path) -> None:
    g = seeded(2)
    units = {}
    for name, k, pad in (("conv3", 3, 1), ("conv1", 1, 0)):
        conv = randomize(QwenImageCausalConv3d(5, 6, k, padding=pad), seed=3 + k)
        x = torch.randn(2, 5, 1, 7, 6, generator=g)  # one frame
        with torch.no_grad():
            units.update({f"{name}.weight": conv.weight, f"{name}.bias": conv.bias, f"{name}.x": x[:, :, 0],
                          f"{name}.out": conv(x)[:, :, 0]})
    save(out / "qwen_vae" / "units.safetensors", units)


def make_manifest(out: Path) -> None:
    with torch.device("meta"):
        sd = AutoencoderKLQwenImage().state_dict()  # the defaults are Qwen-Image's (QV:687-697)
    save_json(out / "qwen_vae" / "manifest_qwen-image.json", manifest(sd))


def make(out: Path) -> None:
    make_tiny(out)
    make_units(out)
    make_manifest(out)
