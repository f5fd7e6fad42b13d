"""Key tables for the FLUX transformer: the original single-file layout and the diffusers one.

Our parameter names are the original (Black Forest Labs) ones, so that table is nearly the
identity. diffusers stores q, k and v (and in single blocks the MLP input) as separate Linears:
the table fuses them with `concat`, in the order our fused projections split them.
"""

import json
from pathlib import Path

from .mapping import CheckpointError, KeyTable, Rule, concat, swap_halves
from .safetensors_io import read_checkpoint

BFL = KeyTable(
    "FLUX transformer (original layout)",
    [
        Rule("double_blocks.{i}.{s}_mlp.layers.{n}.{p}", "double_blocks.{i}.{s}_mlp.{n}.{p}"),
        Rule("final_layer.modulation.lin.{p}", "final_layer.adaLN_modulation.1.{p}"),
        Rule("{key:*}", "{key}"),
    ],
)

_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."


def embedder_rules(theirs: str, *pairs: tuple[str, str], p: str) -> list[Rule]:
    """The conditioning MLPs (in_layer -> SiLU -> out_layer): ours `time_in.in_layer` is diffusers'
    `<theirs>.timestep_embedder.linear_1`, and so on for each (ours, their embedder) pair. FLUX.1
    groups them under time_text_embed, FLUX.2 under time_guidance_embed."""
    return [Rule(f"{ours}.{layer}.{p}", f"{theirs}.{embedder}.linear_{n}.{p}")
            for ours, embedder in pairs for n, layer in ((1, "in_layer"), (2, "out_layer"))]


def joint_attention_rules(p: str) -> list[Rule]:
    """The double blocks' attention in diffusers' names, both streams: q, k, v fused into our qkv
    (text: the `add_*` projections), the QK-norm scales, the output projection. FLUX.1 (p = "{p}":
    weight and bias) and FLUX.2 (p = "weight": no biases) name them alike."""
    rules = []
    for stream, q, k, v, norm, out in (("img", "to_q", "to_k", "to_v", "norm_", "to_out.0"),
                                       ("txt", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_", "to_add_out")):
        ours = f"double_blocks.{{i}}.{stream}_attn."
        rules += [
            Rule(ours + "qkv." + p, tuple(f"{_D}attn.{name}.{p}" for name in (q, k, v)), concat),
            Rule(ours + "norm.query_norm.scale", f"{_D}attn.{norm}q.weight"),
            Rule(ours + "norm.key_norm.scale", f"{_D}attn.{norm}k.weight"),
            Rule(ours + "proj." + p, f"{_D}attn.{out}.{p}"),
        ]
    return rules


DIFFUSERS = KeyTable(
    "FLUX transformer (diffusers layout)",
    [
        Rule("img_in.{p}", "x_embedder.{p}"),
        Rule("txt_in.{p}", "context_embedder.{p}"),
        *embedder_rules("time_text_embed", ("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                        ("guidance_in", "guidance_embedder"), p="{p}"),
        # double-stream blocks: the joint attention's projections, then each stream's modulation and MLP
        *joint_attention_rules("{p}"),
        Rule("double_blocks.{i}.img_mod.lin.{p}", _D + "norm1.linear.{p}"),
        Rule("double_blocks.{i}.img_mlp.layers.0.{p}", _D + "ff.net.0.proj.{p}"),
        Rule("double_blocks.{i}.img_mlp.layers.2.{p}", _D + "ff.net.2.{p}"),
        Rule("double_blocks.{i}.txt_mod.lin.{p}", _D + "norm1_context.linear.{p}"),
        Rule("double_blocks.{i}.txt_mlp.layers.0.{p}", _D + "ff_context.net.0.proj.{p}"),
        Rule("double_blocks.{i}.txt_mlp.layers.2.{p}", _D + "ff_context.net.2.{p}"),
        # single-stream blocks: linear1 = [q; k; v; mlp_in], linear2 = proj_out
        Rule("single_blocks.{i}.modulation.lin.{p}", _S + "norm.linear.{p}"),
        Rule(
            "single_blocks.{i}.linear1.{p}",
            (_S + "attn.to_q.{p}", _S + "attn.to_k.{p}", _S + "attn.to_v.{p}", _S + "proj_mlp.{p}"),
            concat,
        ),
        Rule("single_blocks.{i}.linear2.{p}", _S + "proj_out.{p}"),
        Rule("single_blocks.{i}.norm.query_norm.scale", _S + "attn.norm_q.weight"),
        Rule("single_blocks.{i}.norm.key_norm.scale", _S + "attn.norm_k.weight"),
        # final layer: diffusers keeps (scale, shift), the original (shift, scale)
        Rule("final_layer.modulation.lin.{p}", "norm_out.linear.{p}", swap_halves),
        Rule("final_layer.linear.{p}", "proj_out.{p}"),
    ],
)


def read_transformer(path: str | Path):
    """A FLUX transformer checkpoint in either layout -> (tensors, table, diffusers config or None).

    `path` is the original single file (flux1-schnell.safetensors) or a diffusers `transformer/`
    folder (sharded diffusion_pytorch_model-*.safetensors + index json + config.json)."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        cfg = json.loads(config.read_text()) if config.exists() else None
        return read_checkpoint(path, prefix="diffusion_pytorch_model"), DIFFUSERS, cfg
    tensors = read_checkpoint(path)
    table = DIFFUSERS if any(k.startswith("transformer_blocks.") for k in tensors) else BFL
    return tensors, table, None


def infer_config(tensors: dict, axes_dim: tuple[int, ...] | None = None):
    """An MMDiTConfig read off an original-layout checkpoint's shapes (it carries no config).
    Only the RoPE split is not in the shapes: FLUX's (16, 56, 56) unless given."""
    from ..models.mmdit import MMDiTConfig

    def count(prefix):
        return len({k.split(".")[1] for k in tensors if k.startswith(prefix)})

    try:
        hidden, in_channels = tensors["img_in.weight"].shape
        first_norm = ("double_blocks.0.img_attn.norm.query_norm.scale" if count("double_blocks.")
                      else "single_blocks.0.norm.query_norm.scale")
        head_dim = tensors[first_norm].shape[0]
        return MMDiTConfig(
            in_channels=in_channels,
            out_channels=tensors["final_layer.linear.weight"].shape[0],
            num_heads=hidden // head_dim,
            head_dim=head_dim,
            depth_double=count("double_blocks."),
            depth_single=count("single_blocks."),
            context_dim=tensors["txt_in.weight"].shape[1],
            vec_dim=tensors["vector_in.in_layer.weight"].shape[1],
            guidance_embed="guidance_in.in_layer.weight" in tensors,
            axes_dim=axes_dim or (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
        )
    except KeyError as e:
        raise CheckpointError(f"not a FLUX transformer checkpoint: no tensor {e}") from None


def load_flux_transformer(path: str | Path, config=None, dtype=None):
    """Build an MMDiT and load a FLUX transformer checkpoint of either layout into it.

    The config comes from `config` if given, else from the diffusers config.json, else from the
    checkpoint's shapes. Every key is checked before anything is loaded."""
    from ..models.mmdit import MMDiT, MMDiTConfig
    from .mapping import load_checkpoint

    tensors, table, diffusers_cfg = read_transformer(path)
    if config is None:
        config = MMDiTConfig.from_diffusers(diffusers_cfg) if diffusers_cfg else infer_config(tensors)
    return load_checkpoint(MMDiT(config), table, tensors, dtype)
