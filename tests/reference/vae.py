"""Reference fixtures for the VAE: diffusers' AutoencoderKL.

Writes under out/vae/:
  <name>/diffusers/        config.json + diffusion_pytorch_model.safetensors, as the hub's vae/ folder
  <name>/bfl.safetensors   the same weights in the original ae.safetensors layout (flux_small)
  <name>/io.safetensors    inputs and reference outputs (batch 2, non-square): decode, encode
                           (mean, logvar, std), the FLUX pipeline's latent scaling both ways, and
                           diffusers' tiled_decode; flux_small also the small levels' outputs and
                           the same decode / encode by a bfloat16 copy (keys bf16.*)
  processor.safetensors    VaeImageProcessor: decoder output -> uint8 images, and uint8 image -> input
  manifest_<model>_<layout>.json   key -> shape of the full-size FLUX / SD VAE checkpoints

The original layout has no writer in diffusers; `to_bfl` below is ours, and it is proven by
diffusers' own original -> diffusers converter (convert_ldm_vae_checkpoint) reproducing the
diffusers state dict exactly.
"""

import re
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image

from ._common import bf16, manifest, randomize, recording, save, save_json, seeded


def _config(block_out_channels, latent_channels, layers_per_block, norm_num_groups, sd_style):
    return dict(
        in_channels=3, out_channels=3, latent_channels=latent_channels, act_fn="silu",
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels, layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups, mid_block_add_attention=True,
        use_quant_conv=sd_style, use_post_quant_conv=sd_style,
        scaling_factor=0.18215 if sd_style else 0.3611, shift_factor=None if sd_style else 0.1159,
    )


FULL = {  # the published configurations (black-forest-labs/FLUX.1-*/vae, Stable Diffusion's VAE)
    "flux": _config((128, 256, 512, 512), 16, 2, 32, sd_style=False),
    "sd": _config((128, 256, 512, 512), 4, 2, 32, sd_style=True),
}
# Same structure, fewer channels. 8 groups of 2-4 channels (not 32 groups of one channel) so that
# the test sees how channels are grouped; diffusers requires the groups to divide every level.
SMALL = {
    "flux_small": _config((16, 32, 32, 32), 16, 2, 8, sd_style=False),
    "sd_small": _config((16, 16, 32, 32), 4, 1, 8, sd_style=True),
}
WITH_BFL = ("flux_small",)  # both layouts for one model keeps the fixtures small
WITH_BF16 = ("flux_small",)


def with_levels(vae: AutoencoderKL, images, z, dtype, prefix: str) -> dict[str, torch.Tensor]:
    """Decode and encode in `dtype`, with the outputs of the levels below full resolution (the
    larger ones would make the file 4x bigger), named as our modules are (the decoder's
    up_blocks.i is our decoder.up.{n-1-i})."""
    n = len(vae.decoder.up_blocks)
    levels = {f"encoder.down.{i}": b for i, b in enumerate(vae.encoder.down_blocks) if i > 0}
    levels.update({f"decoder.up.{n - 1 - i}": b for i, b in enumerate(vae.decoder.up_blocks) if i == 0})
    levels.update({"encoder.mid": vae.encoder.mid_block, "decoder.mid": vae.decoder.mid_block})
    with torch.no_grad(), recording(levels) as seen:
        result = {"decode": vae.decode(z.to(dtype)).sample}
        q = vae.encode(images.to(dtype)).latent_dist
    result.update(mean=q.mean, logvar=q.logvar)
    result.update(seen)
    assert all(v.dtype == dtype for v in result.values())
    return {prefix + k: v for k, v in result.items()}


def to_bfl(sd: dict[str, torch.Tensor], levels: int = 4) -> dict[str, torch.Tensor]:
    """diffusers -> original (LDM / BFL ae.safetensors) layout; the inverse of convert_ldm_vae_checkpoint."""
    subs = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        # the original numbers the decoder's levels from the output end
        (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in subs:
            key = re.sub(pattern, repl, key)
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]  # the original stores the projections as 1x1 convs
        out[key] = value
    return out


def check_round_trip(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """to_bfl(sd), after checking that diffusers' own converter turns it back into sd exactly."""
    bfl = to_bfl(sd, len(config["block_out_channels"]))
    back = convert_ldm_vae_checkpoint(dict(bfl), config)
    assert set(back) == set(sd), f"key sets differ: {sorted(set(back) ^ set(sd))[:6]}"
    for k, v in sd.items():
        assert back[k].shape == v.shape, f"{k}: {tuple(back[k].shape)} != {tuple(v.shape)}"
        if v.device.type != "meta":
            assert torch.equal(back[k], v), f"{k}: values differ after the round trip"
    return bfl


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """Our arrays are channels-last; diffusers' are channels-first."""
    return t.permute(0, 2, 3, 1)


def make_small(out: Path, name: str, config: dict, seed: int) -> None:
    vae = randomize(AutoencoderKL(**config), seed=seed)
    sd = vae.state_dict()
    folder = out / "vae" / name
    save(folder / "diffusers" / "diffusion_pytorch_model.safetensors", sd)
    save_json(folder / "diffusers" / "config.json", {"_class_name": "AutoencoderKL", **config})
    if name in WITH_BFL:
        save(folder / "bfl.safetensors", check_round_trip(sd, config))

    g = seeded(seed + 1)
    c, f = config["latent_channels"], 2 ** (len(config["block_out_channels"]) - 1)
    images = torch.rand(2, 3, 6 * f, 8 * f, generator=g) * 2 - 1  # non-square, batch 2
    z = torch.randn(2, c, 5, 7, generator=g)  # odd, non-square latent
    latents = torch.randn(2, c, 6, 4, generator=g)  # what a sampler hands the VAE
    z_tiled = torch.randn(1, c, 10, 13, generator=g)
    s, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    with torch.no_grad():
        q = vae.encode(images).latent_dist
        io = {
            "images": images, "z": z, "latents": latents, "z_tiled": z_tiled,
            "decode": vae.decode(z).sample,
            "mean": q.mean, "logvar": q.logvar, "std": q.std,
            # FLUX pipelines: decode(latents / scale + shift); img2img: (mode - shift) * scale
            "decode_latents": vae.decode(latents / s + shift).sample,
            "encode_latents_mode": (q.mode() - shift) * s,
            "decode_untiled_big": vae.decode(z_tiled).sample,
        }
        # diffusers' tiled decode with 4-position tiles overlapping by 1 (ours: tile=4, overlap=1)
        vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = 4, 4 * f, 0.25
        io["decode_tiled"] = vae.tiled_decode(z_tiled).sample
    if name in WITH_BF16:
        vae.tile_latent_min_size, vae.tile_sample_min_size = 1 << 20, 1 << 20  # no tiling from here on
        io.update(with_levels(vae, images, z, torch.float32, ""))
        io.update(with_levels(bf16(vae), images, z, torch.bfloat16, "bf16."))
    save(folder / "io.safetensors", {k: nhwc(v) if v.ndim == 4 else v for k, v in io.items()})


def make_processor(out: Path) -> None:
    """VaeImageProcessor, as the pipelines use it: postprocess to uint8, preprocess from PIL."""
    g = seeded(7)
    proc = VaeImageProcessor(vae_scale_factor=8)
    decoded = torch.randn(2, 3, 16, 24, generator=g) * 0.7  # some values beyond [-1, 1]
    pil = proc.postprocess(decoded, output_type="pil")
    image = torch.randint(0, 256, (16, 24, 3), generator=g, dtype=torch.uint8)
    pre = proc.preprocess(Image.fromarray(image.numpy()))
    save(out / "vae" / "processor.safetensors", {
        "decoded": nhwc(decoded),
        "uint8": torch.from_numpy(np.stack([np.asarray(p) for p in pil])),
        "image": image,
        "preprocessed": nhwc(pre),
    })


def make_manifests(out: Path) -> None:
    for model, config in FULL.items():
        with torch.device("meta"):
            sd = AutoencoderKL(**config).state_dict()
        save_json(out / "vae" / f"manifest_{model}_diffusers.json", manifest(sd))
        save_json(out / "vae" / f"manifest_{model}_bfl.json", manifest(check_round_trip(sd, config)))


def make(out: Path) -> None:
    for i, (name, config) in enumerate(SMALL.items()):
        make_small(out, name, config, seed=100 + 10 * i)
    make_processor(out)
    make_manifests(out)
