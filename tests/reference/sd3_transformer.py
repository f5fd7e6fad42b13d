"""Reference fixtures for the SD3 / SD3.5 transformer: diffusers' SD3Transformer2DModel.

Writes under out/sd3_transformer/:
  <name>/diffusers/          config.json + 2 shards + index json, as the hub's transformer/ folder
  <name>/stability.safetensors   the same weights in Stability's single-file layout
                             (model.diffusion_model.*), proven by diffusers' own converter
  <name>/io.safetensors      batch 2, non-square latents (6x10 -> 3x5 patches in an 8x8 table), the
                             output, every block's output, the output with skip_layers=[1], and
                             the same run of a bfloat16 copy (keys bf16.*; t stays float32, as
                             StableDiffusion3Pipeline passes it)
  fresh_pos.safetensors      an untrained model's table (diffusers' sin-cos formula) and its config
  manifest_<model>_<layout>.json   key -> shape of the full-size SD3.5 Large / Medium checkpoints
"""

from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from ._common import bf16, manifest, randomize, recording, save, save_json, save_sharded, seeded

CONFIGS = {
    # SD3.5 Medium's kind: MMDiT-X blocks (0, 1), QK RMSNorm, the last block context_pre_only
    "mmditx_tiny": dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                        pooled_projection_dim=20, out_channels=16, pos_embed_max_size=8,
                        dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    # SD3.0's kind: plain joint blocks, no QK norm
    "sd3_tiny": dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                     pooled_projection_dim=20, out_channels=16, pos_embed_max_size=8),
}
FULL = {
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
}
_FULL_BASE = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, joint_attention_dim=4096,
                  pooled_projection_dim=2048, out_channels=16)


def _swap(t):
    a, b = t.chunk(2)
    return torch.cat([b, a])


def to_stability(sd: dict) -> dict:
    """diffusers -> Stability's layout (the inverse of convert_sd3_transformer_checkpoint_to_diffusers)."""
    P = "model.diffusion_model."
    out = {P + "pos_embed": sd["pos_embed.pos_embed"]}
    top = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
    n = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for p in ("weight", "bias"):
        for src, dst in top.items():
            out[f"{P}{dst}.{p}"] = sd[f"{src}.{p}"]
        out[f"{P}final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
        for i in range(n):
            s, x, c = f"transformer_blocks.{i}.", f"{P}joint_blocks.{i}.x_block.", f"{P}joint_blocks.{i}.context_block."
            last = i == n - 1
            out[x + f"attn.qkv.{p}"] = torch.cat([sd[f"{s}attn.to_{q}.{p}"] for q in "qkv"])
            out[c + f"attn.qkv.{p}"] = torch.cat([sd[f"{s}attn.add_{q}_proj.{p}"] for q in "qkv"])
            out[x + f"attn.proj.{p}"] = sd[f"{s}attn.to_out.0.{p}"]
            out[x + f"adaLN_modulation.1.{p}"] = sd[f"{s}norm1.linear.{p}"]
            ctx_mod = sd[f"{s}norm1_context.linear.{p}"]
            out[c + f"adaLN_modulation.1.{p}"] = _swap(ctx_mod) if last else ctx_mod
            out[x + f"mlp.fc1.{p}"], out[x + f"mlp.fc2.{p}"] = sd[f"{s}ff.net.0.proj.{p}"], sd[f"{s}ff.net.2.{p}"]
            if not last:
                out[c + f"attn.proj.{p}"] = sd[f"{s}attn.to_add_out.{p}"]
                out[c + f"mlp.fc1.{p}"] = sd[f"{s}ff_context.net.0.proj.{p}"]
                out[c + f"mlp.fc2.{p}"] = sd[f"{s}ff_context.net.2.{p}"]
            if f"{s}attn2.to_q.{p}" in sd:
                out[x + f"attn2.qkv.{p}"] = torch.cat([sd[f"{s}attn2.to_{q}.{p}"] for q in "qkv"])
                out[x + f"attn2.proj.{p}"] = sd[f"{s}attn2.to_out.0.{p}"]
        for i in range(n):
            s, x, c = f"transformer_blocks.{i}.", f"{P}joint_blocks.{i}.x_block.", f"{P}joint_blocks.{i}.context_block."
            if p == "weight" and f"{s}attn.norm_q.weight" in sd:
                out[x + "attn.ln_q.weight"], out[x + "attn.ln_k.weight"] = sd[s + "attn.norm_q.weight"], sd[s + "attn.norm_k.weight"]
                out[c + "attn.ln_q.weight"] = sd[s + "attn.norm_added_q.weight"]
                out[c + "attn.ln_k.weight"] = sd[s + "attn.norm_added_k.weight"]
                if f"{s}attn2.norm_q.weight" in sd:
                    out[x + "attn2.ln_q.weight"] = sd[s + "attn2.norm_q.weight"]
                    out[x + "attn2.ln_k.weight"] = sd[s + "attn2.norm_k.weight"]
    return out


def check_stability(sd: dict, single: dict) -> None:
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(single))
    assert back.keys() == sd.keys(), sorted(set(back) ^ set(sd))[:5]
    for k in sd:
        assert back[k].shape == sd[k].shape, k
        if sd[k].device.type != "meta":
            assert torch.equal(back[k], sd[k]), k


def forward_with_blocks(model, io: dict, dtype, prefix: str) -> dict:
    blocks = {f"double.{i}": b for i, b in enumerate(model.transformer_blocks)}
    kw = dict(encoder_hidden_states=io["txt"].to(dtype), pooled_projections=io["pooled"].to(dtype),
              timestep=io["timesteps"] * 1000, return_dict=False)  # σ·1000, float32, as the pipeline passes it
    with torch.no_grad(), recording(blocks) as seen:
        out = model(hidden_states=io["x"].to(dtype), **kw)[0]
    with torch.no_grad():
        skipped = model(hidden_states=io["x"].to(dtype), skip_layers=[1], **kw)[0]
    result = {f"{prefix}out": out, f"{prefix}out_skip1": skipped}
    for name, (txt, img) in seen.items():  # diffusers returns (text, image); the last block's text is None
        result[f"{prefix}{name}.img"] = img
        if txt is not None:
            result[f"{prefix}{name}.txt"] = txt
    assert all(v.dtype == dtype for v in result.values()), f"torch returned another dtype than {dtype}"
    return result


def make_model(name: str, out: Path) -> None:
    cfg = CONFIGS[name]
    model = SD3Transformer2DModel(**cfg)
    fresh = model.pos_embed.pos_embed.clone()
    randomize(model, seed=sum(map(ord, name)))
    with torch.no_grad():  # a random table too, so that a wrong crop cannot hide in a smooth sin-cos
        model.pos_embed.pos_embed.copy_(torch.randn(fresh.shape, generator=seeded(5)) * 0.5)
    sd = model.state_dict()
    folder = out / "sd3_transformer" / name
    save_sharded(folder / "diffusers", "diffusion_pytorch_model", sd, shards=2)
    save_json(folder / "diffusers" / "config.json", {"_class_name": "SD3Transformer2DModel", **cfg})
    single = to_stability(sd)
    check_stability(sd, single)
    save(folder / "stability.safetensors", single)

    g = seeded(1)
    io = {"x": torch.randn(2, cfg["in_channels"], 6, 10, generator=g),
          "txt": torch.randn(2, 9, cfg["joint_attention_dim"], generator=g),
          "pooled": torch.randn(2, cfg["pooled_projection_dim"], generator=g),
          "timesteps": torch.tensor([1.0, 0.4375])}
    io.update(forward_with_blocks(model, io, torch.float32, ""))
    io.update(forward_with_blocks(bf16(model), io, torch.bfloat16, "bf16."))
    save(folder / "io.safetensors", io)
    if name == "mmditx_tiny":
        save(out / "sd3_transformer" / "fresh_pos.safetensors", {"pos_embed": fresh[0]})


def make_manifests(out: Path) -> None:
    for name, extra in FULL.items():
        with torch.device("meta"):
            sd = SD3Transformer2DModel(**_FULL_BASE, **extra).state_dict()
        single = to_stability(sd)
        check_stability(sd, single)  # diffusers' converter proves the single-file manifest
        save_json(out / "sd3_transformer" / f"manifest_{name}_diffusers.json", manifest(sd))
        save_json(out / "sd3_transformer" / f"manifest_{name}_stability.json", manifest(single))


def make(out: Path) -> None:
    for name in CONFIGS:
        make_model(name, out)
    make_manifests(out)
