"""Key tables for Qwen-Image in diffusers' layout: the transformer (the hub repo's `transformer/`)
and the VAE (`vae/`).

Our names are the MM-DiT's (models/mmdit.py), so the joint attention's rules are FLUX.1's
(`flux.joint_attention_rules`: diffusers names them alike, q/k/v fused into our qkv, with biases).
The rest: `img_mod.1`/`txt_mod.1` are the blocks' modulation Linears, `{img,txt}_mlp.net.{0.proj,2}`
the MLPs, `txt_norm.weight` the text RMSNorm, `time_text_embed.timestep_embedder.linear_{1,2}` the
timestep MLP, `norm_out.linear` the final modulation as (scale, shift), swapped into our (shift,
scale). The RoPE tables are not in the state dict (QT:199: plain attributes).

The VAE is built of AutoencoderKL's blocks, so its names are those (models/vae.py); its causal 3-D
convolutions become 2-D ones by their last time slice (models/vae_qwen.py says why), its 1x1x1
ones Linears, its fused mid-block q/k/v three Linears, its norm scales γ vectors; the resamplers'
`time_conv`s, never run on one frame, are left unread.
"""

from pathlib import Path

import mlx.core as mx

from . import flux
from .mapping import KeyTable, Rule, conv_channels_last, load_checkpoint, swap_halves
from .safetensors_io import read_diffusers_component
from .vae import linear_from_conv1x1

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

    tensors, config = read_diffusers_component(path, "transformer", "QwenImageTransformer2DModel",
                                               QwenImageConfig.from_diffusers, config)
    return load_checkpoint(QwenImageTransformer(config), DIFFUSERS, tensors, dtype)


# ---- the VAE -------------------------------------------------------------------------------------


def causal_conv_on_one_frame(xs: list[mx.array]) -> mx.array:
    """A causal 3-D kernel (O, I, t, kh, kw) -> the 2-D kernel (O, kh, kw, I) it is on one frame:
    its last time slice (the ones before it meet the zero padding). 2-D kernels: channels-last."""
    w = xs[0]
    return conv_channels_last([w[:, :, -1] if w.ndim == 5 else w])


def pointwise(xs: list[mx.array]) -> mx.array:
    """A 1x1x1 convolution (O, I, 1, 1, 1) -> a Linear's (O, I); biases as they are."""
    return xs[0].reshape(xs[0].shape[:2]) if xs[0].ndim > 2 else xs[0]


def flatten(xs: list[mx.array]) -> mx.array:
    """A norm scale γ stored (C, 1, 1[, 1]) -> (C,)."""
    return xs[0].reshape(-1)


def qkv_part(n: int):
    """q, k or v (n = 0, 1, 2) of the fused 1x1 `to_qkv` (3C, C, 1, 1), or of its bias (3C,)."""
    return lambda xs: mx.split(linear_from_conv1x1(xs), 3, axis=0)[n]


def _block(ours: str, theirs: str) -> list[Rule]:
    """A resnet (or any module) moved from `theirs` to `ours`, its leaves keeping their names."""
    return [Rule(ours + "nin_shortcut.{p}", theirs + "conv_shortcut.{p}", pointwise),
            Rule(ours + "{n:*}.gamma", theirs + "{n}.gamma", flatten),
            Rule(ours + "{p:*}", theirs + "{p}", causal_conv_on_one_frame)]


def vae_key_table(num_res_blocks: int = 2, levels: int = 4) -> KeyTable:
    """AutoencoderKL's names (models/vae.py) from diffusers'. diffusers numbers the encoder's
    resnets and downsamplers in one list, `num_res_blocks` + 1 entries a level, and the decoder's
    up blocks in the order they run (our `up.{i}` is `up_blocks.{levels - 1 - i}`)."""
    n, mid, rules = num_res_blocks, "{part}.mid_block.", []
    for i in range(levels):
        first, up = i * (n + 1), f"decoder.up_blocks.{levels - 1 - i}."  # first: level i's first resnet
        for j in range(n):
            rules += _block(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{first + j}.")
        rules.append(Rule(f"encoder.down.{i}.downsample.conv.{{p}}",
                          f"encoder.down_blocks.{first + n}.resample.1.{{p}}", conv_channels_last))
        rules += _block(f"decoder.up.{i}.block.{{j}}.", up + "resnets.{j}.")
        rules.append(Rule(f"decoder.up.{i}.upsample.conv.{{p}}", up + "upsamplers.0.resample.1.{p}",
                          conv_channels_last))
    rules += [*_block("{part}.mid.block_1.", mid + "resnets.0."), *_block("{part}.mid.block_2.", mid + "resnets.1."),
              *(Rule(f"{{part}}.mid.attn_1.{x}.{{p}}", mid + "attentions.0.to_qkv.{p}", qkv_part(c))
                for c, x in enumerate("qkv")),
              Rule("{part}.mid.attn_1.proj_out.{p}", mid + "attentions.0.proj.{p}", linear_from_conv1x1),
              Rule("{part}.mid.attn_1.norm.gamma", mid + "attentions.0.norm.gamma", flatten),
              Rule("{m:*}.gamma", "{m}.gamma", flatten),  # norm_out
              *(Rule(f"{name}.{{p}}", f"{name}.{{p}}", pointwise) for name in ("quant_conv", "post_quant_conv")),
              Rule("{key:*}", "{key}", causal_conv_on_one_frame)]  # conv_in, conv_out
    return KeyTable("Qwen-Image VAE (diffusers layout)", rules,
                    ignore=("{m:*}.time_conv.weight", "{m:*}.time_conv.bias"))


VAE_DIFFUSERS = vae_key_table()  # the released model's


def load_qwen_vae(path: str | Path, dtype=None, config=None):
    """Build an AutoencoderKLQwenImage and load a diffusers `vae/` folder (or a repo folder holding one)."""
    from ..models.vae_qwen import AutoencoderKLQwenImage, QwenVAEConfig

    tensors, config = read_diffusers_component(path, "vae", "AutoencoderKLQwenImage", QwenVAEConfig.from_dict, config)
    table = vae_key_table(config.layers_per_block, len(config.block_out_channels))
    return load_checkpoint(AutoencoderKLQwenImage(config), table, tensors, dtype)
