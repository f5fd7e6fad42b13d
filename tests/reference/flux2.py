"""Reference fixtures for the FLUX.2 transformer: diffusers' Flux2Transformer2DModel.

Writes under out/flux2/:
  <name>/diffusers/        config.json + 2 shards + index json, as the hub's transformer/ folder
  <name>/bfl.safetensors   the same weights in BFL's original single-file layout (klein_tiny)
  <name>/io.safetensors    inputs (batch 2, 3x5 image tokens, 7 text tokens) and outputs in fp32
                           and bf16 (the same weights cast, as torch_dtype=bfloat16 loads them),
                           with every block's output (`double.{i}.img|txt`, `single.{i}`)
  units.safetensors        4-axis RoPE tables (theta 2000), torch.nn.RMSNorm / SwiGLU / the
                           timestep sinusoid in bf16
  manifest_<model>_<layout>.json   key -> shape of the full-size klein 4B / 9B checkpoints

The original layout has no writer in diffusers; `to_bfl` below is ours, and it is proven by
diffusers' own converter (convert_flux2_transformer_checkpoint_to_diffusers) reproducing the
diffusers state dict exactly.
"""

from pathlib import Path

import torch
import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed, Flux2SwiGLU
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

from ._common import manifest, randomize, save, save_json, save_sharded, seeded

CONFIGS = {
    # klein-shaped: no guidance; 2 heads x 12 with an uneven 4-axis split, 2 double + 2 single blocks;
    # in_channels 4 x 4 latent channels, joint dim 3 x 8 text hidden
    "klein_tiny": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=12,
        num_attention_heads=2, joint_attention_dim=24, mlp_ratio=3.0, axes_dims_rope=(2, 4, 4, 2),
        rope_theta=2000, guidance_embeds=False,
    ),
    # [dev]-style: the guidance embedding; one head, one block of each kind
    "guidance_tiny": dict(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=1, joint_attention_dim=12, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000, guidance_embeds=True,
    ),
}
WITH_BFL = ("klein_tiny",)
# As reported for the released klein models (unverified offline; see models/flux2.py PRESETS)
FULL = {
    "flux2-klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                           guidance_embeds=False),
    "flux2-klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                           guidance_embeds=False),
}


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> BFL's original layout (the inverse of convert_flux2_transformer_checkpoint_to_diffusers)."""
    out = {}
    top = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
    }
    double = {
        "attn.to_out.0.weight": "img_attn.proj.weight", "attn.to_add_out.weight": "txt_attn.proj.weight",
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
        "ff.linear_in.weight": "img_mlp.0.weight", "ff.linear_out.weight": "img_mlp.2.weight",
        "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight",
    }
    single = {
        "attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
        "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale",
    }
    for src, dst in top.items():
        if f"{src}.weight" in sd:
            out[f"{dst}.weight"] = sd[f"{src}.weight"]
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])  # BFL: (shift, scale)
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        s, d = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out.update({d + dst: sd[s + src] for src, dst in double.items()})
        out[d + "img_attn.qkv.weight"] = torch.cat([sd[f"{s}attn.to_{x}.weight"] for x in "qkv"])
        out[d + "txt_attn.qkv.weight"] = torch.cat([sd[f"{s}attn.add_{x}_proj.weight"] for x in "qkv"])
    for i in range(n_single):
        s, d = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out.update({d + dst: sd[s + src] for src, dst in single.items()})
    assert len(out) == len(sd) - 4 * n_double, "to_bfl left tensors behind"  # q, k, v (x2) -> 2 fused
    return out


def check_bfl(sd: dict, bfl: dict) -> None:
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == sd.keys(), sorted(set(back) ^ set(sd))[:5]
    for k in sd:
        assert back[k].shape == sd[k].shape, k
        if sd[k].device.type != "meta":
            assert torch.equal(back[k], sd[k]), k


def text_ids(n: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n))  # (0,0,0,l)


def image_ids(h: int, w: int) -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))  # (0,h,w,0)


def run(model, io, dtype, prefix: str) -> dict[str, torch.Tensor]:
    """The model's output and every block's, through forward hooks."""
    found, hooks = {}, []
    for i, block in enumerate(model.transformer_blocks):
        def double(_, __, out, i=i):
            found[f"double.{i}.txt{prefix}"], found[f"double.{i}.img{prefix}"] = out
        hooks.append(block.register_forward_hook(double))
    for i, block in enumerate(model.single_transformer_blocks):
        hooks.append(block.register_forward_hook(lambda _, __, out, i=i: found.__setitem__(f"single.{i}{prefix}", out)))
    with torch.no_grad():
        found[f"out{prefix}"] = model(
            hidden_states=io["img"].to(dtype), encoder_hidden_states=io["txt"].to(dtype), timestep=io["timesteps"],
            img_ids=io["img_ids"], txt_ids=io["txt_ids"], guidance=io.get("guidance"), return_dict=False,
        )[0]
    for h in hooks:
        h.remove()
    return found


def make_model(name: str, out: Path) -> None:
    cfg = CONFIGS[name]
    model = randomize(Flux2Transformer2DModel(**cfg), seed=sum(map(ord, name)))
    sd = model.state_dict()
    folder = out / "flux2" / name
    save_sharded(folder / "diffusers", "diffusion_pytorch_model", sd, shards=2)
    save_json(folder / "diffusers" / "config.json", {"_class_name": "Flux2Transformer2DModel", **cfg})
    if name in WITH_BFL:
        bfl = to_bfl(sd)
        check_bfl(sd, bfl)
        save(folder / "bfl.safetensors", bfl)

    g = seeded(1)
    B, h, w, n_txt = 2, 3, 5, 7  # non-square 3x5 token grid (96x160 pixels)
    io = {
        "img": torch.randn(B, h * w, cfg["in_channels"], generator=g),
        "txt": torch.randn(B, n_txt, cfg["joint_attention_dim"], generator=g),
        "timesteps": torch.tensor([0.96738404, 0.3125]),  # sigmas, as the pipeline passes t / 1000
        "img_ids": image_ids(h, w).float(),
        "txt_ids": text_ids(n_txt).float(),
    }
    if cfg["guidance_embeds"]:
        io["guidance"] = torch.tensor([4.0, 2.5])
    io.update(run(model, io, torch.float32, ""))
    io.update(run(model.to(torch.bfloat16), io, torch.bfloat16, "_bf16"))
    save(folder / "io.safetensors", io)


def make_units(out: Path) -> None:
    g = seeded(2)
    units = {}
    # positions as far as a 2048-pixel side (127) and a 512-token prompt (511): where float32
    # angle tables would drift
    grid = torch.randint(0, 128, (64, 2), generator=g)
    text = text_ids(512)[torch.cat([torch.randint(0, 512, (63,), generator=g), torch.tensor([511])])]
    ids = torch.cat([text, torch.cat([torch.zeros(64, 1), grid, torch.zeros(64, 1)], dim=1)]).float()
    units["rope.ids"] = ids
    units["rope.cos"], units["rope.sin"] = Flux2PosEmbed(theta=2000, axes_dim=(32, 32, 32, 32))(ids)

    x = torch.randn(3, 40, 128, generator=g).to(torch.bfloat16)
    norm = torch.nn.RMSNorm(128, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(128, generator=g))
        norm = norm.to(torch.bfloat16)
        units.update({"rmsnorm.x_bf16": x, "rmsnorm.weight_bf16": norm.weight.detach().clone(), "rmsnorm.out_bf16": norm(x)})
        h = torch.randn(3, 40, 96, generator=g).to(torch.bfloat16)
        units.update({"swiglu.h_bf16": h, "swiglu.out_bf16": Flux2SwiGLU()(h)})
        # the timestep as the bf16 pipeline hands it over (t / 1000 in bf16), x1000 in bf16, the sinusoid
        model = Flux2Transformer2DModel(num_layers=0, num_single_layers=0, num_attention_heads=1, attention_head_dim=8,
                                        axes_dims_rope=(2, 2, 2, 2), in_channels=4, joint_attention_dim=4)
        t = (torch.tensor([967.38404, 908.14394, 767.19993, 1000.0]).to(torch.bfloat16) / 1000)
        units["timestep.t_bf16"] = t
        units["timestep.emb_bf16"] = model.time_guidance_embed.time_proj(t.to(torch.bfloat16) * 1000).to(torch.bfloat16)
    save(out / "flux2" / "units.safetensors", units)


def make_manifests(out: Path) -> None:
    for name, extra in FULL.items():
        with torch.device("meta"):
            sd = Flux2Transformer2DModel(**extra).state_dict()
        bfl = to_bfl(sd)
        check_bfl(sd, bfl)  # diffusers' converter turns our original-layout manifest back into its own
        save_json(out / "flux2" / f"manifest_{name}_diffusers.json", manifest(sd))
        save_json(out / "flux2" / f"manifest_{name}_bfl.json", manifest(bfl))


# (steps, packed image tokens): klein's 4 steps at 256² .. 2048² (16384 tokens, beyond the 4300
# switch), base models' 50, odd ones; the scheduler as FLUX.2's scheduler_config.json is reported
# to set it (dynamic exponential shift, unverified offline) and with a static shift
SCHEDULE_CASES = [(4, 256), (4, 1024), (4, 4096), (4, 4300), (4, 4301), (4, 16384), (50, 4096), (28, 1536), (1, 64)]
SCHEDULERS = {"dynamic": dict(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0),
              "static": dict(use_dynamic_shifting=False, shift=3.0)}


def make_schedules(out: Path) -> None:
    tensors = {}
    for kind, cfg in SCHEDULERS.items():
        for steps, seq_len in SCHEDULE_CASES:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **cfg)
            mu = compute_empirical_mu(image_seq_len=seq_len, num_steps=steps)
            retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FP:814-825
            tensors[f"{kind}.{steps}.{seq_len}"] = scheduler.sigmas
            tensors[f"mu.{steps}.{seq_len}"] = torch.tensor([mu], dtype=torch.float64)
    # one Euler step on a bf16 model output and bf16 latents (the pipeline's bf16 trap) and in fp32
    g = seeded(3)
    x, v = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **SCHEDULERS["dynamic"])
        retrieve_timesteps(scheduler, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4), mu=2.0)
        t = scheduler.timesteps[0]
        tensors[f"euler.out{suffix}"] = scheduler.step(v.to(dtype), t, x.to(dtype), return_dict=False)[0]
        tensors["euler.sigmas"] = scheduler.sigmas
    tensors.update({"euler.x": x, "euler.v": v})
    save(out / "flux2" / "schedules.safetensors", tensors)


def make(out: Path) -> None:
    for name in CONFIGS:
        make_model(name, out)
    make_units(out)
    make_manifests(out)
    make_schedules(out)
