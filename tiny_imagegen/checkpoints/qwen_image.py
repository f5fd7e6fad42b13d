"""Key table for the Qwen-Image transformer in diffusers' layout (the hub repo's `transformer/`).

Our names are the MM-DiT's (models/mmdit.py), so the joint attention's rules are FLUX.1's
(`flux.joint_attention_rules`: diffusers names them alike, q/k/v fused into our qkv, with biases).
The rest: `img_mod.1`/`txt_mod.1` are the blocks' modulation Linears, `{img,txt}_mlp.net.{0.proj,2}`
the MLPs, `txt_norm.weight` the text RMSNorm, `time_text_embed.timestep_embedder.linear_{1,2}` the
timestep MLP, `norm_out.linear` the final modulation as (scale, shift), swapped into our (shift,
scale). The RoPE tables are not in the state dict (QT:199: plain attributes).
"""

import json
from pathlib import Path

from . import flux
from .mapping import CheckpointError, KeyTable, Rule, load_checkpoint, swap_halves
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
