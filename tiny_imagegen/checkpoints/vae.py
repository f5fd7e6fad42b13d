"""Key tables for the VAE (AutoencoderKL): the original `ae.safetensors` layout and diffusers' `vae/`.

Our parameter names are the original ones (BFL, from LDM), so that table only converts tensors:
convolution weights (O, I, kh, kw) -> (O, kh, kw, I) for MLX, and the attention's q, k, v and
proj_out, stored as 1x1 convolutions (C, C, 1, 1), -> Linear weights (C, C).

diffusers renames nearly everything and numbers the decoder's up blocks in the order they run,
while the original numbers them by resolution level: `decoder.up.{i}` is `decoder.up_blocks.{3-i}`.
Its attention projections are Linears already.
"""

import json
from pathlib import Path

import mlx.core as mx

from .mapping import CheckpointError, KeyTable, Rule, conv_channels_last, load_checkpoint
from .safetensors_io import read_checkpoint


def linear_from_conv1x1(xs: list[mx.array]) -> mx.array:
    """A 1x1 convolution (O, I, 1, 1) is a per-pixel Linear (O, I)."""
    w = xs[0]
    return w.reshape(w.shape[:2]) if w.ndim == 4 else w


# conv_channels_last leaves 1-D tensors (biases, norm scales) as they are, so whole blocks share one rule.
BFL = KeyTable(
    "VAE (original ae.safetensors layout)",
    [
        Rule("{part}.mid.attn_1.norm.{p}", "{part}.mid.attn_1.norm.{p}"),
        Rule("{part}.mid.attn_1.{proj}.weight", "{part}.mid.attn_1.{proj}.weight", linear_from_conv1x1),
        Rule("{key:*}", "{key}", conv_channels_last),
    ],
)

_MID = "{part}.mid_block."
_UP = "decoder.up_blocks.{3-i}."
DIFFUSERS = KeyTable(
    "VAE (diffusers layout)",
    [
        Rule("encoder.down.{i}.block.{j}.nin_shortcut.{p}", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}", conv_channels_last),
        Rule("encoder.down.{i}.block.{j}.{p:*}", "encoder.down_blocks.{i}.resnets.{j}.{p}", conv_channels_last),
        Rule("encoder.down.{i}.downsample.conv.{p}", "encoder.down_blocks.{i}.downsamplers.0.conv.{p}", conv_channels_last),
        Rule("decoder.up.{i}.block.{j}.nin_shortcut.{p}", _UP + "resnets.{j}.conv_shortcut.{p}", conv_channels_last),
        Rule("decoder.up.{i}.block.{j}.{p:*}", _UP + "resnets.{j}.{p}", conv_channels_last),
        Rule("decoder.up.{i}.upsample.conv.{p}", _UP + "upsamplers.0.conv.{p}", conv_channels_last),
        Rule("{part}.mid.block_1.{p:*}", _MID + "resnets.0.{p}", conv_channels_last),
        Rule("{part}.mid.block_2.{p:*}", _MID + "resnets.1.{p}", conv_channels_last),
        Rule("{part}.mid.attn_1.norm.{p}", _MID + "attentions.0.group_norm.{p}"),
        Rule("{part}.mid.attn_1.proj_out.{p}", _MID + "attentions.0.to_out.0.{p}"),
        Rule("{part}.mid.attn_1.{x}.{p}", _MID + "attentions.0.to_{x}.{p}"),  # q, k, v
        Rule("{part}.norm_out.{p}", "{part}.conv_norm_out.{p}"),
        Rule("{key:*}", "{key}", conv_channels_last),  # conv_in, conv_out, quant_conv, post_quant_conv
    ],
)


def read_vae(path: str | Path):
    """A VAE checkpoint in either layout -> (tensors, table, diffusers config or None).

    `path` is the original single file (`ae.safetensors`), a diffusers `vae/` folder
    (diffusion_pytorch_model.safetensors + config.json), or a diffusers repo folder holding `vae/`."""
    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    if path.is_dir():
        config = path / "config.json"
        cfg = json.loads(config.read_text()) if config.exists() else None
        return read_checkpoint(path, prefix="diffusion_pytorch_model"), DIFFUSERS, cfg
    tensors = read_checkpoint(path)
    table = DIFFUSERS if any(".up_blocks." in k or ".down_blocks." in k for k in tensors) else BFL
    return tensors, table, None


def infer_config(tensors: dict):
    """A VAEConfig read off an original-layout checkpoint's shapes. The file holds no latent scale
    and shift: those of FLUX for 16 latent channels, of Stable Diffusion for 4."""
    from ..models.vae import VAE_PRESETS, VAEConfig

    try:
        levels = len({k.split(".")[2] for k in tensors if k.startswith("encoder.down.")})
        latent = tensors["decoder.conv_in.weight"].shape[1]
        preset = {16: VAE_PRESETS["flux"], 4: VAE_PRESETS["sd"]}.get(latent)
        if preset is None:
            raise CheckpointError(f"{latent} latent channels: pass a VAEConfig (scale and shift are not in the file)")
        return VAEConfig(
            in_channels=tensors["encoder.conv_in.weight"].shape[1],
            out_channels=tensors["decoder.conv_out.weight"].shape[0],
            latent_channels=latent,
            block_out_channels=tuple(tensors[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)),
            layers_per_block=len({k.split(".")[4] for k in tensors if k.startswith("encoder.down.0.block.")}),
            use_quant_conv="quant_conv.weight" in tensors,
            use_post_quant_conv="post_quant_conv.weight" in tensors,
            scaling_factor=preset.scaling_factor,
            shift_factor=preset.shift_factor,
        )
    except KeyError as e:
        raise CheckpointError(f"not an AutoencoderKL checkpoint in the original layout: no tensor {e}") from None


def load_vae(path: str | Path, config=None, dtype=None):
    """Build an AutoencoderKL and load a checkpoint of either layout into it.

    The config comes from `config` if given, else from the diffusers config.json, else from the
    checkpoint's shapes. Every key is checked before anything is loaded."""
    from ..models.vae import AutoencoderKL, VAEConfig

    tensors, table, diffusers_cfg = read_vae(path)
    if config is None:
        config = VAEConfig.from_dict(diffusers_cfg) if diffusers_cfg else infer_config(tensors)
    if table is DIFFUSERS and len(config.block_out_channels) != 4:
        raise CheckpointError("the diffusers VAE table numbers decoder up blocks for four levels (up.{i} = up_blocks.{3-i})")
    return load_checkpoint(AutoencoderKL(config), table, tensors, dtype)
