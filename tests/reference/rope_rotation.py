"""Reference fixtures for the rotation itself: diffusers' FluxPosEmbed (the (cos, sin) tables of
FLUX's axial RoPE) and apply_rotary_emb (interleaved pairs, `use_real_unbind_dim=-1`) on seeded
q-like inputs at positions up to a few hundred (angles of hundreds of radians), in float32 and on
bfloat16 inputs (diffusers rotates `x.float()` and rounds once: the float32 island).

Writes out/rope_rotation/rope.safetensors:
  ids            (L, 3) position ids: FLUX-like image rows/cols plus random large positions
  cos, sin       (L, head_dim) the tables as diffusers makes them (each angle repeated for its pair)
  x, out         (B, H, L, head_dim) float32 input and its rotation
  x_bf16, out_bf16   the input rounded to bfloat16 and diffusers' rotation of it (bf16 result)
"""

from pathlib import Path

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from ._common import save, seeded

AXES, THETA = (4, 6, 6), 10_000


def make(out: Path) -> None:
    g = seeded(77)
    grid = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij"), -1).reshape(-1, 2)
    image = torch.cat([torch.zeros(len(grid), 1), grid], dim=1)
    far = torch.randint(0, 400, (9, 3), generator=g).float()
    ids = torch.cat([image, far])  # (24, 3)
    cos, sin = FluxPosEmbed(theta=THETA, axes_dim=list(AXES))(ids)
    x = torch.randn(2, 2, len(ids), sum(AXES), generator=g) * 3
    x_bf16 = x.bfloat16()
    save(out / "rope_rotation" / "rope.safetensors", {
        "ids": ids, "cos": cos, "sin": sin, "x": x, "out": apply_rotary_emb(x, (cos, sin), sequence_dim=2),
        "x_bf16": x_bf16, "out_bf16": apply_rotary_emb(x_bf16, (cos, sin), sequence_dim=2),
    })
