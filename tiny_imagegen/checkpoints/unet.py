"""Key tables for the SD U-Net: diffusers' `unet/` folder and the original single file
(`v1-5-pruned-emaonly.safetensors`, keys `model.diffusion_model.*`).

Our names are diffusers' (see models/unet.py), so that table only converts tensors: convolution
weights (O, I, kh, kw) -> (O, kh, kw, I), proj_in / proj_out stored as 1x1 convolutions (SD 1.5)
-> Linear weights, and three renames (`to_out.0`, `ff.net.0.proj`, `ff.net.2`).

The original (LDM) code numbers its blocks as one flat list per path, as diffusers' converter
`convert_ldm_unet_checkpoint` reads them (L = layers_per_block):

    input_blocks.0.0                 conv_in
    input_blocks.{1 + i(L+1) + j}    level i, resnet j: .0 the resnet, .1 its transformer
    input_blocks.{1 + i(L+1) + L}.0.op   level i's downsampler
    middle_block.{0, 1, 2}           resnet, transformer, resnet
    output_blocks.{u(L+1) + j}       up block u, resnet j (.0), transformer (.1), and on j = L the
                                     upsampler (.1.conv without a transformer, .2.conv with one)
    time_embed.{0, 2}, out.{0, 2}    time MLP; final GroupNorm and conv

and names a resnet's layers by position (in_layers.0 = norm1, in_layers.2 = conv1, emb_layers.1 =
time_emb_proj, out_layers.0 = norm2, out_layers.3 = conv2, skip_connection = conv_shortcut). Since
the flat index depends on layers_per_block, that table is built from the config.
"""

import json
from pathlib import Path

from .mapping import CheckpointError, KeyTable, Rule, conv_channels_last, load_checkpoint
from .safetensors_io import read_checkpoint
from .vae import linear_from_conv1x1

LDM_PREFIX = "model.diffusion_model."


def _attention_rules(ours: str, theirs: str) -> list[Rule]:
    """One Transformer2D block, from its prefix in the checkpoint to ours (placeholders allowed)."""
    return [
        Rule(ours + ".{b:*}.attn{n}.to_out.{p}", theirs + ".{b}.attn{n}.to_out.0.{p}"),
        Rule(ours + ".{b:*}.ff.proj_in.{p}", theirs + ".{b}.ff.net.0.proj.{p}"),
        Rule(ours + ".{b:*}.ff.proj_out.{p}", theirs + ".{b}.ff.net.2.{p}"),
        Rule(ours + ".proj_{io}.weight", theirs + ".proj_{io}.weight", linear_from_conv1x1),
        Rule(ours + ".{p:*}", theirs + ".{p}"),
    ]


DIFFUSERS = KeyTable(
    "U-Net (diffusers layout)",
    [
        *_attention_rules("{a:*}.attentions.{k}", "{a}.attentions.{k}"),
        Rule("{key:*}", "{key}", conv_channels_last),
    ],
)

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_blocks(cfg) -> list[tuple[str, str, str]]:
    """(kind, our prefix, original prefix) of every block, kind "resnet" | "attention" | "layer"."""
    L, last = cfg.layers_per_block, len(cfg.block_out_channels) - 1
    blocks = [("layer", "conv_in", "input_blocks.0.0"), ("layer", "time_embedding.linear_1", "time_embed.0"),
              ("layer", "time_embedding.linear_2", "time_embed.2"), ("layer", "conv_norm_out", "out.0"),
              ("layer", "conv_out", "out.2")]
    for i in range(last + 1):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            blocks.append(("resnet", f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0"))
            if cfg.has_attention(i):
                blocks.append(("attention", f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
        if i < last:
            blocks.append(("layer", f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (L + 1) + L}.0.op"))
    blocks += [("resnet", "mid_block.resnets.0", "middle_block.0"), ("attention", "mid_block.attentions.0", "middle_block.1"),
               ("resnet", "mid_block.resnets.1", "middle_block.2")]
    for u in range(last + 1):
        attention = cfg.has_attention(last - u)
        for j in range(L + 1):
            k = u * (L + 1) + j
            blocks.append(("resnet", f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0"))
            if attention:
                blocks.append(("attention", f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1"))
        if u < last:
            k = u * (L + 1) + L
            blocks.append(("layer", f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{k}.{2 if attention else 1}.conv"))
    return blocks


def ldm_table(cfg) -> KeyTable:
    """The original layout for this config (keys without the `model.diffusion_model.` prefix)."""
    rules = []
    for kind, ours, theirs in ldm_blocks(cfg):
        if kind == "attention":
            rules += _attention_rules(ours, theirs)
        elif kind == "resnet":
            rules += [Rule(f"{ours}.{a}.{{p}}", f"{theirs}.{b}.{{p}}", conv_channels_last) for a, b in _RESNET.items()]
        else:
            rules.append(Rule(ours + ".{p}", theirs + ".{p}", conv_channels_last))
    return KeyTable("U-Net (original single-file layout)", rules)


def read_unet(path: str | Path):
    """A U-Net checkpoint -> (tensors, "diffusers" | "ldm", diffusers config or None).

    `path`: a diffusers `unet/` folder, a repo folder holding `unet/`, or the original single
    file (only its `model.diffusion_model.*` tensors are read; the VAE and text encoder in the
    same file are other components)."""
    path = Path(path)
    if path.is_dir() and (path / "unet").is_dir():
        path = path / "unet"
    if path.is_dir():
        config = path / "config.json"
        cfg = json.loads(config.read_text()) if config.exists() else None
        return read_checkpoint(path, prefix="diffusion_pytorch_model"), "diffusers", cfg
    tensors = read_checkpoint(path)
    if any(k.startswith(LDM_PREFIX) for k in tensors):
        return {k[len(LDM_PREFIX):]: v for k, v in tensors.items() if k.startswith(LDM_PREFIX)}, "ldm", None
    if "conv_in.weight" in tensors:
        return tensors, "diffusers", None
    if "input_blocks.0.0.weight" in tensors:
        return tensors, "ldm", None
    raise CheckpointError(f"{path} holds no U-Net: neither diffusers keys (conv_in.weight) nor {LDM_PREFIX}* keys")


def load_unet(path: str | Path, dtype=None, config=None):
    """Build the U-Net and load a checkpoint of either layout into it, every key checked first.

    The config comes from `config`, else the diffusers config.json, else SD 1.5's (the original
    file holds none)."""
    from ..models.unet import UNET_PRESETS, UNet2DConditionModel, UNetConfig

    tensors, layout, diffusers_cfg = read_unet(path)
    if config is None:
        config = UNetConfig.from_diffusers(diffusers_cfg) if diffusers_cfg else UNET_PRESETS["sd15"]
    table = DIFFUSERS if layout == "diffusers" else ldm_table(config)
    return load_checkpoint(UNet2DConditionModel(config), table, tensors, dtype)
