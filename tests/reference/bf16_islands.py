"""Reference fixtures for the float32 islands of a bfloat16 model, each alone: torch's bf16 result
of the operations that compute inside in float32 and round once (the references keep these
islands; a port that drops one rounds more often and drifts from torch's bf16 run).

Writes out/bf16_islands/ops.safetensors (inputs bf16-exact; outputs `*.out_bf16`, torch's bf16 results):
  layer_norm.x / .out     F.layer_norm without affine (FLUX's adaLN norm), rows with an offset mean
  rms_norm.x / .w / .out  diffusers' RMSNorm (statistics in float32, scaled by the bf16 weight)
  sdpa.q/.k/.v / .out     F.scaled_dot_product_attention (softmax statistics in float32)
  sinusoid.t / .out       FLUX's Timesteps(256, flip_sin_to_cos) of t * 1000 in float32, then bf16
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import Timesteps
from diffusers.models.normalization import RMSNorm

from ._common import save, seeded


def make(out: Path) -> None:
    g = seeded(88)
    io = {}
    x = (torch.randn(2, 64, 48, generator=g) * 3 + torch.randn(2, 64, 1, generator=g) * 8).bfloat16()
    io["layer_norm.x"], io["layer_norm.out_bf16"] = x, F.layer_norm(x, (48,), eps=1e-6)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(48, generator=g))
    norm = norm.bfloat16()
    with torch.no_grad():
        io["rms_norm.x"], io["rms_norm.w"], io["rms_norm.out_bf16"] = x, norm.weight, norm(x)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=g).mul(s).bfloat16() for s in (2.0, 2.0, 1.0))
    io["sdpa.q"], io["sdpa.k"], io["sdpa.v"] = q, k, v
    io["sdpa.out_bf16"] = F.scaled_dot_product_attention(q, k, v, scale=16**-0.5)
    t = torch.tensor([1.0, 0.3125, 0.7731, 0.0421, 0.9375])
    io["sinusoid.t"] = t
    io["sinusoid.out_bf16"] = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t * 1000).bfloat16()
    save(out / "bf16_islands" / "ops.safetensors", {k: v.float() for k, v in io.items()})
