"""Key tables for Qwen-Image in diffusers' layout: the transformer (the hub repo's `transformer/`)
and the VAE (`vae/`).

Our names are the MM-DiT's (models/mmdit.py), so the joint attention's rules are FLUX.1's
(`flux.joint_attention_rules`: diffusers names them alike, q/k/v fused into our qkv, with biases).
The rest: `img_mod.1`/`txt_mod.1` are the blocks' modulation Linears, `{img,txt}_mlp.net.{0.proj,2}`
the MLPs, `txt_norm.weight` the text RMSNorm, `time_text_embed.timestep_embedder.linear_{1,2}` the
timestep MLP, `norm_out.linear` the final modulation as (scale, shift), swapped into our (shift,
scale). The RoPE tables are not in the state dict (QT:199: plain attributes).

The VAE's names are diffusers' own; its causal 3-D convolutions become 2-D ones by their last time
slice (models/vae_qwen.py says why), its 1x1(x1) convolutions Linears, its norm scales γ vectors;
the resamplers' `time_conv`s, never run on one frame, are left unread.
"""

import json
from pathlib import Path

from . import flux
import mlx.core as mx

from .mapping import CheckpointError, KeyTable, Rule, conv_channels_last, load_checkpoint, swap_halves
from .safetensors_io import read_checkpoint

_D = "transformer_blocks.{i}."
DIFFUSERS = KeyTable(
    "Qwen-Image transformer (diffusers layout)",
    [
        Rule("img_in.{p}", "img_in.{p}"),
        Rule("txt_norm.scale", "txt_norm.weight"),
        Rule("txt_in.{p}", "txt_in.{p}"),
        Rule("time_in.in_layer.{p}", "time_text_embed.timestep_embedder.linear_1.{p}"),
        Rule("time_in.out_layer.{p}", "time_text_embed.timestep_embedder.linear_2.{p}"),
        *flux.joint_attention_rules("{p}"),
        Rule("double_blocks.{i}.{s}_mod.lin.{p}", _D + "{s}_mod.1.{p}"),
        Rule("double_blocks.{i}.{s}_mlp.layers.0.{p}", _D + "{s}_mlp.net.0.proj.{p}"),
        Rule("double_blocks.{i}.{s}_mlp.layers.2.{p}", _D + "{s}_mlp.net.2.{p}"),
        Rule("final_layer.modulation.lin.{p}", "norm_out.linear.{p}", swap_halves),
        Rule("final_layer.linear.{p}", "proj_out.{p}"),
    ],
)


def load_qwen_image_transformer(path: str | Path, dtype=None, config=None):
    """Build a QwenImageTransformer and load a diffusers `transformer/` folder (shards + index +
    config.json) into it, in `dtype` if given. Every key is checked before anything is loaded."""
    from ..models.qwen_image import QwenImageConfig, QwenImageTransformer

    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    if not path.is_dir():
        raise CheckpointError(f"{path}: the Qwen-Image transformer loads from a diffusers transformer/ folder")
    if config is None:
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{path} has no config.json")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("_class_name", "QwenImageTransformer2DModel") != "QwenImageTransformer2DModel":
            raise CheckpointError(f"{path} holds a {cfg['_class_name']}, not a QwenImageTransformer2DModel")
        try:
            config = QwenImageConfig.from_diffusers(cfg)
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
    tensors = read_checkpoint(path, prefix="diffusion_pytorch_model")
    return load_checkpoint(QwenImageTransformer(config), DIFFUSERS, tensors, dtype)


# ---- the VAE -------------------------------------------------------------------------------------


def causal_conv_on_one_frame(xs: list[mx.array]) -> mx.array:
    """(O, I, 3, kh, kw) causal 3-D kernel -> the 2-D kernel (O, kh, kw, I) it is on one frame:
    its last time slice (the two before it meet the zero padding)."""
    return mx.moveaxis(xs[0][:, :, -1], 1, -1)


def pointwise(xs: list[mx.array]) -> mx.array:
    """A 1x1 or 1x1x1 convolution (O, I, 1, ...) -> a Linear's (O, I)."""
    return xs[0].reshape(xs[0].shape[0], xs[0].shape[1])


def flatten(xs: list[mx.array]) -> mx.array:
    """A norm scale γ stored (C, 1, 1[, 1]) -> (C,)."""
    return xs[0].reshape(-1)


VAE_DIFFUSERS = KeyTable(
    "Qwen-Image VAE (diffusers layout)",
    [
        Rule("encoder.down_blocks.{i}.conv.{p}", "encoder.down_blocks.{i}.resample.1.{p}", conv_channels_last),
        Rule("decoder.up_blocks.{i}.upsample.conv.{p}", "decoder.up_blocks.{i}.upsamplers.0.resample.1.{p}",
             conv_channels_last),
        Rule("{m:*}.gamma", "{m}.gamma", flatten),
        *(Rule(f"{{m:*}}.{name}.weight", f"{{m}}.{name}.weight", pointwise)
          for name in ("conv_shortcut", "to_qkv", "proj")),
        *(Rule(f"{name}.weight", f"{name}.weight", pointwise) for name in ("quant_conv", "post_quant_conv")),
        Rule("{m:*}.weight", "{m}.weight", causal_conv_on_one_frame),
        Rule("{key:*}", "{key}"),
    ],
    ignore=("{m:*}.time_conv.weight", "{m:*}.time_conv.bias"),
)


def load_qwen_vae(path: str | Path, dtype=None, config=None):
    """Build an AutoencoderKLQwenImage and load a diffusers `vae/` folder (or a repo folder holding one)."""
    from ..models.vae_qwen import AutoencoderKLQwenImage, QwenVAEConfig

    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    if not path.is_dir():
        raise CheckpointError(f"{path}: the Qwen-Image VAE loads from a diffusers vae/ folder")
    if config is None:
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{path} has no config.json")
        try:
            config = QwenVAEConfig.from_dict(json.loads(cfg_file.read_text()))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
    tensors = read_checkpoint(path, prefix="diffusion_pytorch_model")
    return load_checkpoint(AutoencoderKLQwenImage(config), VAE_DIFFUSERS, tensors, dtype)
