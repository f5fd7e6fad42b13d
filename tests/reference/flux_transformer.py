"""Reference fixtures for the MM-DiT: diffusers' FluxTransformer2DModel.

Writes under out/flux_transformer/:
  <name>/diffusers/   config.json + 2 shards + index json, as the hub's transformer/ folder
  <name>/bfl.safetensors   the same weights in the original single-file layout (dev_tiny)
  <name>/io.safetensors    inputs and the reference output (batch 2, non-square latents), every
                           block's output (double.<i>.img/txt, single.<i>), and the same run of
                           a bfloat16 copy of the model on bf16-rounded inputs (keys bf16.*;
                           see forward_with_blocks for the timestep)
  units.safetensors        timestep embedding, RoPE tables, latent packing, one double and one
                           single block (weights: the dev model's block 0)
  manifest_<model>_<layout>.json   key -> shape of the full-size FLUX.1 schnell/dev checkpoints

The original layout has no writer in diffusers; `to_bfl` below is ours, and it is proven by
diffusers' own BFL -> diffusers converter reproducing the diffusers state dict exactly.
"""

import inspect
import json
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from diffusers.models.embeddings import get_timestep_embedding

from ._common import bf16, manifest, randomize, recording, save, save_json, save_sharded, seeded

CONFIGS = {
    # head_dim 128 and FLUX's axes (16, 56, 56); no guidance input
    "schnell_tiny": dict(
        in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
        joint_attention_dim=48, pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    ),
    # two heads, two blocks of each kind, guidance embedding
    "dev_tiny": dict(
        in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=40, pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(8, 12, 12),
    ),
    # the other two compositions: SD3-style double blocks only, and single blocks only
    "dual_stream_tiny": dict(
        in_channels=16, num_layers=2, num_single_layers=0, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ),
    "single_stream_tiny": dict(
        in_channels=16, num_layers=0, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ),
}
WITH_BFL = ("dev_tiny",)  # both layouts for one model keeps the fixtures small
FULL = {"flux1-schnell": dict(guidance_embeds=False), "flux1-dev": dict(guidance_embeds=True)}


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> original layout (the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers)."""
    out = {}
    pairs = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    }
    double = {
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    }
    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for p in ("weight", "bias"):
        for src, dst in pairs.items():
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
        a, b = sd["norm_out.linear." + p].chunk(2)
        out["final_layer.adaLN_modulation.1." + p] = torch.cat([b, a])
        for i in range(n_double):
            s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            for src, dst in double.items():
                out[f"{d}{dst}.{p}"] = sd[f"{s}{src}.{p}"]
            out[f"{d}img_attn.qkv.{p}"] = torch.cat([sd[f"{s}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{d}txt_attn.qkv.{p}"] = torch.cat([sd[f"{s}attn.add_{x}_proj.{p}"] for x in "qkv"])
        for i in range(n_single):
            s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[f"{d}modulation.lin.{p}"] = sd[f"{s}norm.linear.{p}"]
            out[f"{d}linear1.{p}"] = torch.cat([sd[f"{s}attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{s}proj_mlp.{p}"]])
            out[f"{d}linear2.{p}"] = sd[f"{s}proj_out.{p}"]
    for i in range(n_double):
        for src, dst in norms.items():
            out[f"double_blocks.{i}.{dst}.scale"] = sd[f"transformer_blocks.{i}.{src}.weight"]
    for i in range(n_single):
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    return out


def diffusers_converter(width: int):
    """diffusers' BFL -> diffusers converter. It hard-codes FLUX's width 3072 for the single-block
    split; for narrow test models we run its own source with the width replaced."""
    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    if width == 3072:
        return fn
    src = inspect.getsource(fn).replace("inner_dim = 3072", f"inner_dim = {width}")
    assert f"inner_dim = {width}" in src, "diffusers' converter changed: update diffusers_converter()"
    namespace = dict(vars(single_file_utils))
    exec(src, namespace)
    return namespace[fn.__name__]


def check_bfl(sd: dict, bfl: dict, width: int) -> None:
    back = diffusers_converter(width)(dict(bfl))
    assert back.keys() == sd.keys(), sorted(set(back) ^ set(sd))[:5]
    for k in sd:
        assert back[k].shape == sd[k].shape, k
        if sd[k].device.type != "meta":
            assert torch.equal(back[k], sd[k]), k


def make_model(name: str, out: Path) -> FluxTransformer2DModel:
    cfg = CONFIGS[name]
    model = randomize(FluxTransformer2DModel(**cfg), seed=hash_seed(name))
    sd = model.state_dict()
    folder = out / "flux_transformer" / name
    save_sharded(folder / "diffusers", "diffusion_pytorch_model", sd, shards=2)
    save_json(folder / "diffusers" / "config.json", {"_class_name": "FluxTransformer2DModel", **cfg})
    if name in WITH_BFL:
        bfl = to_bfl(sd)
        check_bfl(sd, bfl, cfg["num_attention_heads"] * cfg["attention_head_dim"])
        save(folder / "bfl.safetensors", bfl)

    # batch 2, 48x80 pixels -> 6x10 latents -> 3x5 packed tokens; 7 text tokens
    g = seeded(1)
    B, h, w, n_txt = 2, 3, 5, 7
    io = {
        "img": torch.randn(B, h * w, cfg["in_channels"], generator=g),
        "txt": torch.randn(B, n_txt, cfg["joint_attention_dim"], generator=g),
        "y": torch.randn(B, cfg["pooled_projection_dim"], generator=g),
        "timesteps": torch.tensor([1.0, 0.3125]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(B, h, w, "cpu", torch.float32),
        "txt_ids": torch.zeros(n_txt, 3),
    }
    if cfg["guidance_embeds"]:
        io["guidance"] = torch.tensor([3.5, 1.0])
    io.update(forward_with_blocks(model, io, torch.float32, ""))
    io.update(forward_with_blocks(bf16(model), io, torch.bfloat16, "bf16."))
    io["bf16_t_rounded.out"] = forward_with_blocks(bf16(model), io, torch.bfloat16, "", exact_t=False)["out"]
    save(folder / "io.safetensors", io)
    return model


def forward_with_blocks(model: FluxTransformer2DModel, io: dict, dtype, prefix: str, exact_t: bool = True):
    """The output and every block's output; inputs cast to `dtype`, position ids kept in float32.

    In bf16, diffusers rounds t * 1000 in bf16 before the sinusoid (t = 0.3125: 312.5 -> 312;
    guidance 3.5: 3500 -> 3504; BFL rounds t, then multiplies in float32), and at frequency 1 rad
    per unit that half-unit shift dominates its error (relative L2 0.5 on dev_tiny). Ours takes
    the sinusoid of float32 t (layers/embeddings.py), so with `exact_t` the bf16 run is given the
    float32 t * 1000 too (a pre-hook on time_text_embed; the embedding is still cast to bf16 as
    diffusers does) and everything else runs in bf16: the reference for the rest of the model."""
    blocks = {f"double.{i}": b for i, b in enumerate(model.transformer_blocks)}
    blocks.update({f"single.{i}": b for i, b in enumerate(model.single_transformer_blocks)})
    scalars = [io["timesteps"] * 1000] + ([io["guidance"] * 1000] if "guidance" in io else [])
    hook = model.time_text_embed.register_forward_pre_hook(
        lambda _m, args: (*scalars, args[-1]) if exact_t else None)
    with torch.no_grad(), recording(blocks) as seen:
        out = model(
            hidden_states=io["img"].to(dtype), encoder_hidden_states=io["txt"].to(dtype),
            pooled_projections=io["y"].to(dtype), timestep=io["timesteps"].to(dtype),
            img_ids=io["img_ids"], txt_ids=io["txt_ids"],
            guidance=io["guidance"].to(dtype) if "guidance" in io else None,
        ).sample
    hook.remove()
    result = {f"{prefix}out": out}
    for name, (txt, img) in seen.items():  # both kinds return (text, image)
        if name.startswith("double"):
            result.update({f"{prefix}{name}.img": img, f"{prefix}{name}.txt": txt})
        else:  # ours keeps the joint sequence [text; image]
            result[f"{prefix}{name}"] = torch.cat([txt, img], dim=1)
    assert all(v.dtype == dtype for v in result.values()), f"torch returned another dtype than {dtype}"
    return result


def hash_seed(name: str) -> int:
    return sum(map(ord, name))


def make_units(dev: FluxTransformer2DModel, out: Path) -> None:
    g = seeded(2)
    units = {}
    t = torch.tensor([0.0, 0.25, 0.7311, 1.0])
    units["timestep.t"] = t
    units["timestep.emb"] = get_timestep_embedding(t * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0)

    # positions up to 127 (a 2048-pixel side): where float32 angle tables would drift
    grid = torch.randint(0, 128, (64, 2), generator=g).float()
    ids = torch.cat([torch.zeros(7, 3), torch.cat([torch.zeros(64, 1), grid], dim=1)])
    cos, sin = FluxTransformer2DModel(axes_dims_rope=(16, 56, 56), num_layers=0, num_single_layers=0,
                                      in_channels=4, joint_attention_dim=4, pooled_projection_dim=4).pos_embed(ids)
    units.update({"rope.ids": ids, "rope.cos": cos, "rope.sin": sin})

    latents = torch.randn(2, 16, 6, 10, generator=g)
    units["pack.latents"] = latents
    units["pack.tokens"] = FluxPipeline._pack_latents(latents, 2, 16, 6, 10)

    D = dev.inner_dim
    img, txt = torch.randn(2, 15, D, generator=g), torch.randn(2, 7, D, generator=g)
    temb = torch.randn(2, D, generator=g)
    ids = torch.cat([torch.zeros(7, 3), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)])
    rotary = dev.pos_embed(ids)
    with torch.no_grad():
        txt_d, img_d = dev.transformer_blocks[0](img, txt, temb, rotary)
        txt_s, img_s = dev.single_transformer_blocks[0](img, txt, temb, rotary)
    units.update({"block.img": img, "block.txt": txt, "block.temb": temb, "block.ids": ids,
                  "double.img": img_d, "double.txt": txt_d, "single.img": img_s, "single.txt": txt_s})
    save(out / "flux_transformer" / "units.safetensors", units)


def make_manifests(out: Path) -> None:
    for name, extra in FULL.items():
        with torch.device("meta"):
            sd = FluxTransformer2DModel(**extra).state_dict()
        bfl = to_bfl(sd)
        check_bfl(sd, bfl, 3072)  # diffusers' converter at its native width proves the BFL manifest
        save_json(out / "flux_transformer" / f"manifest_{name}_diffusers.json", manifest(sd))
        save_json(out / "flux_transformer" / f"manifest_{name}_bfl.json", manifest(bfl))


def make(out: Path) -> None:
    for name in CONFIGS:
        model = make_model(name, out)
        if name == "dev_tiny":
            dev = model
    make_units(dev, out)
    make_manifests(out)
