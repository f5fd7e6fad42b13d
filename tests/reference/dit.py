"""Reference fixtures for the DiT: diffusers' DiTTransformer2DModel (the model of facebook/DiT-XL-2-*).

Writes under out/dit/:
  tiny/diffusers/        config.json + diffusion_pytorch_model.safetensors, as the hub's transformer/
  tiny/io.safetensors    batch 2 (different class labels, one the null class, and timesteps):
                         inputs, the conditioning vector, every block's output and the model's, in
                         float32 and (keys with "bf16") torch's bfloat16 run of the same weights
  units.safetensors      the timestep sinusoid (shift 1) and sin-cos tables of grids other than the
                         trained one (non-square, stretched), as diffusers builds them
  manifest_<preset>.json key -> shape of the full-size DiT-XL/2 256 and 512 checkpoints

Every diffusers DiT block holds its own copy of the timestep and class embedders; the published
checkpoints were converted from the original code, which has one of each, so the copies are
equal (scripts/convert_dit_to_diffusers.py writes the same tensors into every block). The random
test model is made the same way: block 0's embedders copied into every block.
"""

from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

from ._common import manifest, randomize, save, save_json, seeded

TINY = dict(  # DiT-XL/2's structure, narrow: 4 heads x 16, 2 blocks, 8x8 latents in 2x2 patches
    num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
    sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    norm_elementwise_affine=False, activation_fn="gelu-approximate", attention_bias=True,
)
FULL = {  # facebook/DiT-XL-2-256 and -512, transformer/config.json
    f"dit-xl-2-{px}": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                           sample_size=px // 8, patch_size=2, num_embeds_ada_norm=1000)
    for px in (256, 512)
}


def share_embedders(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Every block's embedders := block 0's, as in the converted checkpoints."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
    return model


def tiny_model(seed: int = 11) -> DiTTransformer2DModel:
    return share_embedders(randomize(DiTTransformer2DModel(**TINY), seed=seed))


def run(model, latents, timesteps, labels):
    """Outputs of the conditioning, of every block and of the model."""
    blocks = []
    hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in model.transformer_blocks]
    with torch.no_grad():
        cond = model.transformer_blocks[0].norm1.emb(timesteps, labels, hidden_dtype=latents.dtype)
        out = model(latents, timestep=timesteps, class_labels=labels).sample
    for h in hooks:
        h.remove()
    return cond, blocks, out


def make_tiny(out: Path) -> None:
    model = tiny_model()
    folder = out / "dit" / "tiny"
    save(folder / "diffusers" / "diffusion_pytorch_model.safetensors", model.state_dict())
    save_json(folder / "diffusers" / "config.json", {"_class_name": "DiTTransformer2DModel", **TINY})

    g = seeded(12)
    io = {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([999, 17]),  # int64, as DiTPipeline passes the scheduler's timesteps
        "labels": torch.tensor([3, 10]),  # 10 = num_embeds_ada_norm: the null class
    }
    cond, blocks, io["out"] = run(model, io["latents"], io["timesteps"], io["labels"])
    io["cond"] = cond
    io.update({f"block{i}": b for i, b in enumerate(blocks)})
    cond, blocks, out = run(model.to(torch.bfloat16), io["latents"].bfloat16(), io["timesteps"], io["labels"])
    io.update({"cond_bf16": cond, "out_bf16": out, **{f"block{i}_bf16": b for i, b in enumerate(blocks)}})
    save(folder / "io.safetensors", io)


def make_units(out: Path) -> None:
    t = torch.tensor([0, 1, 17, 250, 500, 999])
    units = {"timestep.t": t, "timestep.emb": get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)}
    # (dim, height, width, base_size, interpolation_scale): the trained grid, non-square, a 512 grid
    # on a 256 model, a stretched one
    for name, (dim, h, w, base, scale) in {
        "square": (64, 4, 4, 4, 1.0), "wide": (64, 3, 5, 4, 1.0), "512_on_256": (48, 32, 32, 16, 1.0),
        "scaled": (32, 6, 6, 4, 2.0),
    }.items():
        units[f"pos.{name}"] = get_2d_sincos_pos_embed(dim, (h, w), base_size=base, interpolation_scale=scale).float()
    save(out / "dit" / "units.safetensors", units)


def make_manifests(out: Path) -> None:
    for name, cfg in FULL.items():
        with torch.device("meta"):
            sd = DiTTransformer2DModel(**cfg).state_dict()
        save_json(out / "dit" / f"manifest_{name}.json", manifest(sd))


def make(out: Path) -> None:
    make_tiny(out)
    make_units(out)
    make_manifests(out)
