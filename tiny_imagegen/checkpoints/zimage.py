"""Key table for the Z-Image transformer in the diffusers layout (the hub's `transformer/` folder:
sharded diffusion_pytorch_model-*.safetensors + index json + config.json).

Our names are diffusers' except where MLX or our layers differ:
  - `all_x_embedder.2-1` / `all_final_layer.2-1` (a ModuleDict keyed "{patch}-{frame patch}") are
    `x_embedder` / `final_layer`: MLX attribute names cannot hold a '-';
  - q, k, v are one fused Linear `attention.qkv` (one matmul instead of three);
  - norms keep their gain as `scale` (layers/attention.py's RMSNorm), the SwiGLU its
    gate/up/down projections (diffusers' w1/w3/w2), Sequentials lose their index.
"""

from pathlib import Path

from .mapping import KeyTable, Rule, concat, load_checkpoint
from .safetensors_io import read_diffusers_component


def _block(name: str) -> list[Rule]:
    b, a = name + ".{i}.", name + ".{i}.attention."
    return [
        Rule(b + "attention.qkv.weight", (a + "to_q.weight", a + "to_k.weight", a + "to_v.weight"), concat),
        Rule(b + "attention.norm_q.scale", a + "norm_q.weight"),
        Rule(b + "attention.norm_k.scale", a + "norm_k.weight"),
        Rule(b + "attention.to_out.weight", a + "to_out.0.weight"),
        Rule(b + "feed_forward.gate_proj.weight", b + "feed_forward.w1.weight"),
        Rule(b + "feed_forward.up_proj.weight", b + "feed_forward.w3.weight"),
        Rule(b + "feed_forward.down_proj.weight", b + "feed_forward.w2.weight"),
        Rule(b + "{norm}.scale", b + "{norm}.weight"),  # attention_norm1/2, ffn_norm1/2
        Rule(b + "adaLN_modulation.{p}", b + "adaLN_modulation.0.{p}"),
    ]


def key_table(patch_size: int = 2, f_patch_size: int = 1) -> KeyTable:
    patch = f"{patch_size}-{f_patch_size}"
    return KeyTable(
        f"Z-Image transformer (diffusers layout, patch {patch})",
        [
            Rule("x_embedder.{p}", f"all_x_embedder.{patch}.{{p}}"),
            Rule("final_layer.adaLN_modulation.{p}", f"all_final_layer.{patch}.adaLN_modulation.1.{{p}}"),
            Rule("final_layer.linear.{p}", f"all_final_layer.{patch}.linear.{{p}}"),
            Rule("t_embedder.linear_1.{p}", "t_embedder.mlp.0.{p}"),
            Rule("t_embedder.linear_2.{p}", "t_embedder.mlp.2.{p}"),
            Rule("cap_embedder.norm.scale", "cap_embedder.0.weight"),
            Rule("cap_embedder.linear.{p}", "cap_embedder.1.{p}"),
            Rule("x_pad_token", "x_pad_token"),
            Rule("cap_pad_token", "cap_pad_token"),
            *_block("noise_refiner"),
            *_block("context_refiner"),
            *_block("layers"),
        ],
    )


DIFFUSERS = key_table()


def load_zimage_transformer(folder: str | Path, dtype=None, config=None):
    """Build a ZImageTransformer from a diffusers `transformer/` folder (config.json + shards) and
    load its weights (lazily: read when first evaluated), in `dtype` if given. Every key is
    checked before anything is loaded."""
    from ..models.zimage import ZImageConfig, ZImageTransformer

    tensors, config = read_diffusers_component(folder, "transformer", "ZImageTransformer2DModel",
                                               ZImageConfig.from_diffusers, config)
    return load_checkpoint(ZImageTransformer(config), key_table(config.patch_size), tensors, dtype)
