"""Key table for the DiT: diffusers' DiTTransformer2DModel layout (`transformer/` of facebook/DiT-XL-2-*).

Our names are the original code's (facebookresearch/DiT), so the table says what diffusers renamed:
the patch embedding is `pos_embed.proj`, a Conv2d (D, C, p, p) that we hold as the Linear it is
on flattened patches; q, k, v are separate Linears (fused here); the final adaLN is `proj_out_1`,
in the original (shift, scale) order (unlike FLUX's AdaLayerNormContinuous, no swap).

diffusers gives every block its own timestep and class embedder (`transformer_blocks.{i}.norm1.emb`)
and uses block 0's for the final layer. The original has one of each; the hub checkpoints were
converted from it by writing the same tensors into every block. We keep one: block 0's is read,
the other copies are checked equal to it (`check_shared_embedders`) and not loaded.
"""

import json
from pathlib import Path

import mlx.core as mx

from .mapping import CheckpointError, KeyTable, Rule, concat, load_checkpoint
from .safetensors_io import read_checkpoint


def flatten_patch_conv(xs: list[mx.array]) -> mx.array:
    """A stride-p, p x p Conv2d weight (D, C, p, p) is a Linear (D, C p p) on patches flattened
    in the order c·p² + ph·p + pw, which is how `pack_latents` flattens them."""
    w = xs[0]
    return w.reshape(w.shape[0], -1) if w.ndim == 4 else w


_B = "transformer_blocks.{i}."
_EMB = "transformer_blocks.0.norm1.emb."
DIFFUSERS = KeyTable(
    "DiT (diffusers DiTTransformer2DModel layout)",
    [
        Rule("x_embedder.{p}", "pos_embed.proj.{p}", flatten_patch_conv),
        Rule("t_embedder.in_layer.{p}", _EMB + "timestep_embedder.linear_1.{p}"),
        Rule("t_embedder.out_layer.{p}", _EMB + "timestep_embedder.linear_2.{p}"),
        Rule("y_embedder.weight", _EMB + "class_embedder.embedding_table.weight"),
        Rule("blocks.{i}.modulation.lin.{p}", _B + "norm1.linear.{p}"),
        Rule("blocks.{i}.attn.qkv.{p}", (_B + "attn1.to_q.{p}", _B + "attn1.to_k.{p}", _B + "attn1.to_v.{p}"), concat),
        Rule("blocks.{i}.attn.proj.{p}", _B + "attn1.to_out.0.{p}"),
        Rule("blocks.{i}.mlp.layers.0.{p}", _B + "ff.net.0.proj.{p}"),
        Rule("blocks.{i}.mlp.layers.2.{p}", _B + "ff.net.2.{p}"),
        Rule("final_layer.modulation.lin.{p}", "proj_out_1.{p}"),
        Rule("final_layer.linear.{p}", "proj_out_2.{p}"),
    ],
    ignore=("transformer_blocks.{i}.norm1.emb.{p:*}",),  # the copies in blocks 1..N-1
)


def check_shared_embedders(tensors: dict[str, mx.array]) -> None:
    """Every block's embedder copy equals block 0's (reads those tensors). A checkpoint trained
    with diffusers' per-block embedders would not fit a model with one: say so."""
    prefix = "transformer_blocks.0.norm1.emb."
    for key in sorted(k for k in tensors if ".norm1.emb." in k and not k.startswith(prefix)):
        first = prefix + key.split(".norm1.emb.", 1)[1]
        if first not in tensors or tensors[key].shape != tensors[first].shape or not mx.array_equal(tensors[key], tensors[first]).item():
            raise CheckpointError(
                f"{key} differs from {first}: this DiT has per-block timestep/class embedders; ours shares "
                "one, as the original DiT and the published checkpoints do"
            )


def read_dit(path: str | Path) -> tuple[dict[str, mx.array], dict | None]:
    """A diffusers DiT `transformer/` folder (or a repo folder holding one) -> (tensors, config)."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    config = path / "config.json" if path.is_dir() else None
    cfg = json.loads(config.read_text()) if config is not None and config.exists() else None
    return read_checkpoint(path, prefix="diffusion_pytorch_model" if path.is_dir() else ""), cfg


def load_dit(path: str | Path, config=None, dtype=None):
    """Build a DiT and load a diffusers-layout checkpoint into it (in `dtype` if given).

    The config comes from `config` if given, else from the folder's config.json. Every key is
    checked before anything is loaded; the per-block embedder copies are compared with block 0's."""
    from ..models.dit import DiT, DiTConfig

    tensors, diffusers_cfg = read_dit(path)
    if config is None:
        if diffusers_cfg is None:
            raise CheckpointError(f"{path}: no config.json next to the DiT weights; pass config=")
        config = DiTConfig.from_diffusers(diffusers_cfg)
    model = load_checkpoint(DiT(config), DIFFUSERS, tensors, dtype)
    check_shared_embedders(tensors)
    return model
