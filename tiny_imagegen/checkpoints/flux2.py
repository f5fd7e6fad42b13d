"""Key tables for FLUX.2: the transformer in BFL's original single-file layout and in diffusers',
and the AutoencoderKLFlux2 in diffusers' layout.

Our transformer's names are BFL's (as diffusers' converter reads them, single_file_utils.py
`convert_flux2_transformer_checkpoint_to_diffusers`): `img_in`, `txt_in`, `time_in.{in,out}_layer`,
`guidance_in.*`, `double_stream_modulation_{img,txt}.lin`, `single_stream_modulation.lin`,
`double_blocks.{i}.{img,txt}_attn.{qkv,proj}`, `..._attn.norm.{query,key}_norm.scale`,
`double_blocks.{i}.{img,txt}_mlp.{0,2}`, `single_blocks.{i}.linear1|linear2|norm.*`,
`final_layer.adaLN_modulation.1` (shift, scale) and `final_layer.linear`; only weights, no biases.
So the original table is FLUX.1's (checkpoints/flux.py). diffusers splits the double blocks'
q, k and v, renames the rest, and stores the final modulation as (scale, shift).

The VAE's diffusers layout is AutoencoderKL's plus the BatchNorm buffers `bn.running_mean` and
`bn.running_var` (its counter `bn.num_batches_tracked` is unused). diffusers has no converter for
BFL's original FLUX.2 autoencoder file, so that layout is not derivable here and not supported.
"""

import json
from pathlib import Path

from . import flux, vae
from .mapping import CheckpointError, KeyTable, Rule, load_checkpoint, swap_halves
from .safetensors_io import read_checkpoint, read_diffusers_component

BFL = KeyTable("FLUX.2 transformer (original layout)", flux.BFL.rules)

_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."
DIFFUSERS = KeyTable(
    "FLUX.2 transformer (diffusers layout)",
    [
        Rule("img_in.weight", "x_embedder.weight"),
        Rule("txt_in.weight", "context_embedder.weight"),
        *flux.embedder_rules("time_guidance_embed", ("time_in", "timestep_embedder"),
                             ("guidance_in", "guidance_embedder"), p="weight"),
        # the shared modulation, once per model
        Rule("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight"),
        Rule("double_stream_modulation_txt.lin.weight", "double_stream_modulation_txt.linear.weight"),
        Rule("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"),
        # double-stream blocks: attention as in FLUX.1, then the MLPs
        *flux.joint_attention_rules("weight"),
        Rule("double_blocks.{i}.img_mlp.layers.0.weight", _D + "ff.linear_in.weight"),
        Rule("double_blocks.{i}.img_mlp.layers.2.weight", _D + "ff.linear_out.weight"),
        Rule("double_blocks.{i}.txt_mlp.layers.0.weight", _D + "ff_context.linear_in.weight"),
        Rule("double_blocks.{i}.txt_mlp.layers.2.weight", _D + "ff_context.linear_out.weight"),
        # single-stream blocks: fused already, [q | k | v | gate | up] and [attention | MLP]
        Rule("single_blocks.{i}.linear1.weight", _S + "attn.to_qkv_mlp_proj.weight"),
        Rule("single_blocks.{i}.linear2.weight", _S + "attn.to_out.weight"),
        Rule("single_blocks.{i}.norm.query_norm.scale", _S + "attn.norm_q.weight"),
        Rule("single_blocks.{i}.norm.key_norm.scale", _S + "attn.norm_k.weight"),
        # final layer: diffusers keeps (scale, shift), the original (shift, scale)
        Rule("final_layer.modulation.lin.weight", "norm_out.linear.weight", swap_halves),
        Rule("final_layer.linear.weight", "proj_out.weight"),
    ],
)

VAE_DIFFUSERS = KeyTable("FLUX.2 VAE (diffusers layout)", vae.DIFFUSERS.rules, ignore=("bn.num_batches_tracked",))


def read_transformer(path: str | Path):
    """A FLUX.2 transformer checkpoint -> (tensors, table, diffusers config or None): BFL's single
    file (flux-2-klein-4b.safetensors) or a diffusers `transformer/` folder (shards + index + config)."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        cfg = json.loads(config.read_text()) if config.exists() else None
        return read_checkpoint(path, prefix="diffusion_pytorch_model"), DIFFUSERS, cfg
    tensors = read_checkpoint(path)
    table = DIFFUSERS if any(k.startswith("transformer_blocks.") for k in tensors) else BFL
    return tensors, table, None


def infer_config(tensors: dict, axes_dim: tuple[int, ...] | None = None):
    """A Flux2Config read off an original-layout checkpoint's shapes (the file holds no config).
    The RoPE split is not in the shapes: four equal axes unless given (klein: 4 x 32)."""
    from ..models.flux2 import Flux2Config

    def count(prefix):
        return len({k.split(".")[1] for k in tensors if k.startswith(prefix)})

    try:
        if "single_stream_modulation.lin.weight" not in tensors:
            raise KeyError("single_stream_modulation.lin.weight")
        hidden, in_channels = tensors["img_in.weight"].shape
        n_double, n_single = count("double_blocks."), count("single_blocks.")
        first_norm = "double_blocks.0.img_attn.norm.query_norm.scale" if n_double else "single_blocks.0.norm.query_norm.scale"
        head_dim = tensors[first_norm].shape[0]
        if axes_dim is None and head_dim % 8:
            raise CheckpointError(f"head_dim {head_dim} has no even 4-axis RoPE split: pass a Flux2Config (axes_dim)")
        mlp_hidden = (tensors["single_blocks.0.linear2.weight"].shape[1] - hidden if n_single
                      else tensors["double_blocks.0.img_mlp.2.weight"].shape[1])
        return Flux2Config(
            in_channels=in_channels,
            out_channels=tensors["final_layer.linear.weight"].shape[0],
            num_heads=hidden // head_dim,
            head_dim=head_dim,
            depth_double=n_double,
            depth_single=n_single,
            mlp_ratio=mlp_hidden / hidden,
            context_dim=tensors["txt_in.weight"].shape[1],
            guidance_embed="guidance_in.in_layer.weight" in tensors,
            axes_dim=axes_dim or (head_dim // 4,) * 4,
        )
    except KeyError as e:
        raise CheckpointError(f"not a FLUX.2 transformer checkpoint: no tensor {e}") from None


def load_flux2_transformer(path: str | Path, dtype=None, config=None):
    """Build a Flux2Transformer and load a checkpoint of either layout into it (in `dtype` if
    given). The config comes from `config`, else the diffusers config.json, else the shapes.
    Every key is checked before anything is loaded."""
    from ..models.flux2 import Flux2Config, Flux2Transformer

    tensors, table, diffusers_cfg = read_transformer(path)
    if diffusers_cfg and diffusers_cfg.get("_class_name", "Flux2Transformer2DModel") != "Flux2Transformer2DModel":
        raise CheckpointError(f"{path} holds a {diffusers_cfg['_class_name']}, not a Flux2Transformer2DModel")
    if config is None:
        config = Flux2Config.from_diffusers(diffusers_cfg) if diffusers_cfg else infer_config(tensors)
    return load_checkpoint(Flux2Transformer(config), table, tensors, dtype)


def load_flux2_vae(path: str | Path, dtype=None, config=None):
    """Build an AutoencoderKLFlux2 and load a diffusers `vae/` folder (or a repo folder holding one;
    there is no original-layout table)."""
    from ..models.vae_flux2 import AutoencoderKLFlux2, Flux2VAEConfig

    tensors, config = read_diffusers_component(path, "vae", "AutoencoderKLFlux2", Flux2VAEConfig.from_dict, config)
    return load_checkpoint(AutoencoderKLFlux2(config), VAE_DIFFUSERS, tensors, dtype)
