"""Reference fixtures for FLUX.2's VAE: diffusers' AutoencoderKLFlux2, and the Flux2KleinPipeline's
latent normalisation around it.

Writes under out/flux2_vae/:
  small/diffusers/     config.json + diffusion_pytorch_model.safetensors (with the bn buffers)
  small/io.safetensors inputs and outputs, batch 2, non-square, fp32 and bf16 (`*_bf16`): encode
                       (mean, logvar), decode, the pipeline's encode normalisation
                       (`_encode_vae_image`), its decode de-normalisation from packed tokens
                       (FP:906-922), and diffusers' tiled_decode
  manifest_flux2_diffusers.json   key -> shape of the full-size AutoencoderKLFlux2 (its defaults:
                       the published config is unverified offline)
"""

from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

from ._common import manifest, randomize, save, save_json, seeded

SMALL = dict(
    in_channels=3, out_channels=3, latent_channels=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, mid_block_add_attention=True,
    use_quant_conv=True, use_post_quant_conv=True, batch_norm_eps=1e-4, patch_size=(2, 2),
)
P = Flux2KleinPipeline


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def pipeline_decode_latents(vae, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flux2KleinPipeline.__call__'s end (FP:906-917): packed tokens -> un-normalised z."""
    ids = P._prepare_latent_ids(torch.zeros(tokens.shape[0], 1, h, w))
    latents = P._unpack_latents_with_ids(tokens, ids, h, w)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return P._unpatchify_latents(latents * std + mean)


def outputs(vae, io: dict, dtype, suffix: str) -> dict:
    pipe = SimpleNamespace(vae=vae, _patchify_latents=P._patchify_latents)
    h, w = io["tokens_hw"].tolist()
    with torch.no_grad():
        q = vae.encode(io["images"].to(dtype)).latent_dist
        z = pipeline_decode_latents(vae, io["tokens"].to(dtype), h, w)
        out = {
            "mean": q.mean, "logvar": q.logvar,
            "decode": vae.decode(io["z"].to(dtype)).sample,
            "encode_latents": P._encode_vae_image(pipe, io["images"].to(dtype), None),  # (B, 128, H/16, W/16)
            "decode_latents_z": z,
            "decode_latents": vae.decode(z).sample,
        }
        # diffusers' tiled decode with 4-position tiles overlapping by 1 (ours: tile=4, overlap=1)
        vae.use_tiling = False
        vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = 4, 32, 0.25
        out["decode_tiled"] = vae.tiled_decode(io["z_tiled"].to(dtype)).sample
    return {k + suffix: nhwc(v) if v.ndim == 4 else v for k, v in out.items()}


def make(out: Path) -> None:
    vae = randomize(AutoencoderKLFlux2(**SMALL), seed=300)
    g = seeded(301)
    with torch.no_grad():  # buffers: randomize() sets parameters only; statistics far from (0, 1)
        vae.bn.running_mean.copy_(torch.randn(128, generator=g) * 0.5)
        vae.bn.running_var.copy_(torch.rand(128, generator=g) * 2 + 0.05)
    folder = out / "flux2_vae" / "small"
    save(folder / "diffusers" / "diffusion_pytorch_model.safetensors", vae.state_dict())
    save_json(folder / "diffusers" / "config.json", {"_class_name": "AutoencoderKLFlux2", **SMALL})

    io = {
        "images": torch.rand(2, 3, 32, 48, generator=g) * 2 - 1,  # non-square, multiples of 16
        "z": torch.randn(2, 32, 4, 6, generator=g),
        "tokens": torch.randn(2, 2 * 3, 128, generator=g),  # what the sampler hands over: 2 x 3 tokens
        "tokens_hw": torch.tensor([2, 3]),
        "z_tiled": torch.randn(1, 32, 7, 10, generator=g),
    }
    io.update(outputs(vae, io, torch.float32, ""))
    io.update(outputs(vae.to(torch.bfloat16), io, torch.bfloat16, "_bf16"))
    save(folder / "io.safetensors", {k: nhwc(v) if k in ("images", "z", "z_tiled") else v for k, v in io.items()})

    with torch.device("meta"):
        sd = AutoencoderKLFlux2().state_dict()
    save_json(out / "flux2_vae" / "manifest_flux2_diffusers.json", manifest(sd))
