"""Key tables for the SD3 / SD3.5 transformer: diffusers' `transformer/` folder and the single file
Stability AI publishes (`sd3.5_medium.safetensors`: `model.diffusion_model.joint_blocks...`).

Our names (models/sd3.py) are the MM-DiT's: Stability's `x_block` / `context_block` are our
`img_*` / `txt_*` streams, its fused `qkv` is ours as it is; diffusers' separate q, k, v are fused
by FLUX's joint-attention rules. Both layouts store the patch embedding as a 2x2 conv (flattened
here to the Linear on packed patches) and the position table as a tensor. diffusers keeps the
adaLN-Continuous layers (the final layer, the last block's pre-only text modulation) as
(scale, shift); Stability and we keep (shift, scale). The Stability table is proven by diffusers'
own single-file converter (tests/reference/sd3_transformer.py).
"""

import json
from pathlib import Path

import mlx.core as mx

from .flux import joint_attention_rules
from .mapping import CheckpointError, KeyTable, Rule, concat, load_checkpoint, swap_halves
from .safetensors_io import read_checkpoint

_D = "transformer_blocks.{i}."


def conv_to_linear(xs: list[mx.array]) -> mx.array:
    """(D, C, p, p) stride-p conv -> (D, C p p) Linear on patches packed c·p² + dy·p + dx."""
    return xs[0].reshape(xs[0].shape[0], -1)


DIFFUSERS = KeyTable(
    "SD3 transformer (diffusers layout)",
    [
        Rule("x_embedder.weight", "pos_embed.proj.weight", conv_to_linear),
        Rule("x_embedder.bias", "pos_embed.proj.bias"),
        Rule("pos_embed", "pos_embed.pos_embed"),
        Rule("t_embedder.in_layer.{p}", "time_text_embed.timestep_embedder.linear_1.{p}"),
        Rule("t_embedder.out_layer.{p}", "time_text_embed.timestep_embedder.linear_2.{p}"),
        Rule("y_embedder.in_layer.{p}", "time_text_embed.text_embedder.linear_1.{p}"),
        Rule("y_embedder.out_layer.{p}", "time_text_embed.text_embedder.linear_2.{p}"),
        Rule("context_embedder.{p}", "context_embedder.{p}"),
        *joint_attention_rules("{p}"),
        Rule("double_blocks.{i}.img_attn2.qkv.{p}", tuple(f"{_D}attn2.to_{x}.{{p}}" for x in "qkv"), concat),
        Rule("double_blocks.{i}.img_attn2.norm.query_norm.scale", _D + "attn2.norm_q.weight"),
        Rule("double_blocks.{i}.img_attn2.norm.key_norm.scale", _D + "attn2.norm_k.weight"),
        Rule("double_blocks.{i}.img_attn2.proj.{p}", _D + "attn2.to_out.0.{p}"),
        Rule("double_blocks.{i}.img_mod.lin.{p}", _D + "norm1.linear.{p}"),
        Rule("double_blocks.{i}.txt_mod.lin.{p}", _D + "norm1_context.linear.{p}"),
        Rule("double_blocks.{i}.txt_mod_pre_only.lin.{p}", _D + "norm1_context.linear.{p}", swap_halves),
        Rule("double_blocks.{i}.img_mlp.layers.0.{p}", _D + "ff.net.0.proj.{p}"),
        Rule("double_blocks.{i}.img_mlp.layers.2.{p}", _D + "ff.net.2.{p}"),
        Rule("double_blocks.{i}.txt_mlp.layers.0.{p}", _D + "ff_context.net.0.proj.{p}"),
        Rule("double_blocks.{i}.txt_mlp.layers.2.{p}", _D + "ff_context.net.2.{p}"),
        Rule("final_layer.modulation.lin.{p}", "norm_out.linear.{p}", swap_halves),
        Rule("final_layer.linear.{p}", "proj_out.{p}"),
    ],
)


def _stability_rules(prefix: str) -> list[Rule]:
    b = prefix + "joint_blocks.{i}."
    rules = [
        Rule("x_embedder.weight", prefix + "x_embedder.proj.weight", conv_to_linear),
        Rule("x_embedder.bias", prefix + "x_embedder.proj.bias"),
        Rule("pos_embed", prefix + "pos_embed"),
        Rule("t_embedder.in_layer.{p}", prefix + "t_embedder.mlp.0.{p}"),
        Rule("t_embedder.out_layer.{p}", prefix + "t_embedder.mlp.2.{p}"),
        Rule("y_embedder.in_layer.{p}", prefix + "y_embedder.mlp.0.{p}"),
        Rule("y_embedder.out_layer.{p}", prefix + "y_embedder.mlp.2.{p}"),
        Rule("context_embedder.{p}", prefix + "context_embedder.{p}"),
        Rule("double_blocks.{i}.txt_mod_pre_only.lin.{p}", b + "context_block.adaLN_modulation.1.{p}"),
        Rule("final_layer.modulation.lin.{p}", prefix + "final_layer.adaLN_modulation.1.{p}"),
        Rule("final_layer.linear.{p}", prefix + "final_layer.linear.{p}"),
    ]
    for ours, theirs in (("img", "x_block"), ("txt", "context_block")):
        o, t = f"double_blocks.{{i}}.{ours}_", f"{b}{theirs}."
        for attn in ("attn", "attn2"):  # attn2: MMDiT-X's second attention (image stream only)
            rules += [
                Rule(o + attn + ".qkv.{p}", t + attn + ".qkv.{p}"),
                Rule(o + attn + ".norm.query_norm.scale", t + attn + ".ln_q.weight"),
                Rule(o + attn + ".norm.key_norm.scale", t + attn + ".ln_k.weight"),
                Rule(o + attn + ".proj.{p}", t + attn + ".proj.{p}"),
            ]
        rules += [
            Rule(o + "mod.lin.{p}", t + "adaLN_modulation.1.{p}"),
            Rule(o + "mlp.layers.0.{p}", t + "mlp.fc1.{p}"),
            Rule(o + "mlp.layers.2.{p}", t + "mlp.fc2.{p}"),
        ]
    return rules


STABILITY_PREFIX = "model.diffusion_model."
STABILITY = KeyTable(
    "SD3 transformer (Stability single file)", _stability_rules(STABILITY_PREFIX),
    ignore=("first_stage_model.{x:*}", "text_encoders.{x:*}"),  # the VAE and encoders some files bundle
)
STABILITY_BARE = KeyTable("SD3 transformer (Stability layout, no prefix)", _stability_rules(""))


def infer_config(tensors: dict, prefix: str):
    """An SD3Config read off a Stability file's shapes (it carries no config). Not in the shapes:
    the training sample size (128 in every release) and, without QK norm, the head width (64)."""
    from ..models.sd3 import SD3Config

    def t(name):
        return tensors[prefix + name]

    try:
        hidden, in_channels, patch, _ = t("x_embedder.proj.weight").shape
        blocks = {int(k[len(prefix):].split(".")[1]) for k in tensors if k.startswith(prefix + "joint_blocks.")}
        max_size = round(t("pos_embed").shape[1] ** 0.5)
        qk_norm = prefix + "joint_blocks.0.x_block.attn.ln_q.weight" in tensors
        head_dim = t("joint_blocks.0.x_block.attn.ln_q.weight").shape[0] if qk_norm else 64
        return SD3Config(
            in_channels=in_channels, out_channels=t("final_layer.linear.weight").shape[0] // (patch * patch),
            patch_size=patch, num_heads=hidden // head_dim, head_dim=head_dim, depth=len(blocks),
            context_dim=t("context_embedder.weight").shape[1], pooled_dim=t("y_embedder.mlp.0.weight").shape[1],
            pos_embed_max_size=max_size, qk_norm=qk_norm,
            dual_attention_layers=tuple(sorted(i for i in blocks if f"{prefix}joint_blocks.{i}.x_block.attn2.qkv.weight" in tensors)),
        )
    except KeyError as e:
        raise CheckpointError(f"not an SD3 transformer checkpoint: no tensor {e}") from None


def read_transformer(path: str | Path):
    """An SD3 transformer checkpoint in either layout -> (tensors, table, SD3Config)."""
    from ..models.sd3 import SD3Config

    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{path} has no config.json: not a diffusers SD3 transformer folder")
        return read_checkpoint(path, prefix="diffusion_pytorch_model"), DIFFUSERS, SD3Config.from_diffusers(
            json.loads(config.read_text()))
    tensors = read_checkpoint(path)
    if any(k.startswith("transformer_blocks.") for k in tensors):
        raise CheckpointError(f"{path}: a diffusers-layout transformer needs its folder (config.json beside it)")
    prefix = STABILITY_PREFIX if any(k.startswith(STABILITY_PREFIX) for k in tensors) else ""
    return tensors, STABILITY if prefix else STABILITY_BARE, infer_config(tensors, prefix)


def load_sd3_transformer(path: str | Path, config=None, dtype=None):
    """Build an SD3Transformer and load a checkpoint of either layout into it, lazily; every key is
    checked before anything is loaded."""
    from ..models.sd3 import SD3Transformer

    tensors, table, found = read_transformer(path)
    return load_checkpoint(SD3Transformer(config or found), table, tensors, dtype)
