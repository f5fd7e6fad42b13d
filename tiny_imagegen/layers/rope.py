"""Rotary position embedding (RoPE) and its variants for images.

RoPE (Su et al., 2021) rotates each pair of channels (x[2j], x[2j+1]) of a query or key by an angle
θ_j · p that grows with the token's position p. Because a rotation by a and one by b meet in a dot
product as a rotation by b - a,

    <R(θ p_q) q, R(θ p_k) k> = <q, R(θ (p_k - p_q)) k>,

attention sees only relative positions. The variants differ in how a position becomes angles:

- 1-D:   angle_j = p · ω_j,            ω_j = theta^(-2j/d)                        (`rope_angles`)
- axial: the channels are split between axes (FLUX: axes_dim = (16, 56, 56) for
         (index, row, col)), each axis a 1-D RoPE of its own                      (`axial_rope_angles`)
- mixed: every channel pair sees all axes, angle_j = x · f_x,j + y · f_y,j, with learnable
         per-head frequencies (f_x, f_y) (Heo et al., 2024, "Rotary Position Embedding for
         Vision Transformer"), so diagonal directions are expressible                (`MixedRoPE`)

A RoPE table is the pair (cos, sin) of the angles, each (L, d/2) or, per head, (H, L, d/2);
`apply_rope` rotates (B, H, L, d) by it.

The axial tables are computed in float64 with numpy, imported in the functions that build them:
mixed RoPE (the shipped model's) needs none, and its `generate` never loads numpy (0.075 s).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

from ..device.compilation import compiled_when_large

if TYPE_CHECKING:
    import numpy as np


def rope_frequencies(dim: int, theta: float = 10_000.0) -> np.ndarray:
    """ω_j = theta^(-2j/dim), j = 0 .. dim/2 - 1, in float64."""
    import numpy as np

    assert dim % 2 == 0, f"RoPE needs an even dimension, got {dim}"
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def rope_angles(positions, dim: int, theta: float = 10_000.0) -> np.ndarray:
    """1-D RoPE: positions (L,) -> angles (L, dim/2), float64."""
    import numpy as np

    return np.outer(np.asarray(positions, np.float64), rope_frequencies(dim, theta))


def axial_rope(ids, axes_dim: tuple[int, ...], theta: float = 10_000.0) -> tuple[mx.array, mx.array]:
    """Multi-axis (axial) RoPE as in FLUX: ids (L, n_axes) -> (cos, sin), each (L, sum(axes_dim)/2).

    Axis i owns axes_dim[i] channels. The table is computed in float64, as the reference does:
    angles reach hundreds of radians, where float32 would be off by ~4e-6."""
    import numpy as np

    ids = np.asarray(ids, np.float64)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"position ids must be (L, {len(axes_dim)}) for axes_dim {axes_dim}, got {ids.shape}")
    angles = np.concatenate([rope_angles(ids[:, i], d, theta) for i, d in enumerate(axes_dim)], axis=-1)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


def axial_rope_fp32_angles(ids, axes_dim: tuple[int, ...], theta: float = 10_000.0) -> tuple[mx.array, mx.array]:
    """`axial_rope` with every angle rounded to float32 before its cos and sin, as Z-Image's
    reference builds its table (diffusers' RopeEmbedder: outer(pos, ω) in float64, `.float()`,
    then torch.polar in float32). At angles of hundreds of radians that rounding moves cos/sin by
    up to ~3e-5, so the two tables are not interchangeable. cos/sin of the float32 angle are then
    taken in float64 and rounded (torch's float32 kernels are 1 ulp off in ~1% of entries)."""
    import numpy as np

    ids = np.asarray(ids, np.float64)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"position ids must be (L, {len(axes_dim)}) for axes_dim {axes_dim}, got {ids.shape}")
    angles = np.concatenate([rope_angles(ids[:, i], d, theta) for i, d in enumerate(axes_dim)], axis=-1)
    angles = angles.astype(np.float32).astype(np.float64)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


def axial_rope_fp32(ids, axes_dim: tuple[int, ...], theta: float = 10_000.0) -> tuple[mx.array, mx.array]:
    """`axial_rope` computed in float32 throughout, as Qwen-Image's MSRoPE table is (QT:222-231):
    ω_j = 1 / theta^(float32(2j) / d) in float32, angle = float32(p) · ω_j rounded to float32, then
    cos/sin of that angle. The power is taken in float64 and rounded (torch's float32 `pow` is not
    correctly rounded: it differs from this in 112 of 8256 frequencies for d = 2 .. 256, by 1 ulp,
    which moves cos/sin by up to ~2e-6 at position 600), cos/sin likewise. The float32 ω and angle
    differ from a float64 table (`axial_rope`) by up to ~3e-5 at positions of 500."""
    import numpy as np

    ids = np.asarray(ids, np.float32)
    if ids.ndim != 2 or ids.shape[1] != len(axes_dim):
        raise ValueError(f"position ids must be (L, {len(axes_dim)}) for axes_dim {axes_dim}, got {ids.shape}")
    parts = []
    for i, d in enumerate(axes_dim):
        exponent = (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)).astype(np.float64)
        omega = np.float32(1.0) / (float(theta) ** exponent).astype(np.float32)
        parts.append(np.outer(ids[:, i], omega).astype(np.float32))
    angles = np.concatenate(parts, axis=-1).astype(np.float64)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


def apply_rope(x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
    """Rotate interleaved channel pairs (x[2j], x[2j+1]) of x (B, H, L, d) by a (cos, sin) table
    of shape (L, d/2) or (H, L, d/2), in float32 as the references do (diffusers and BFL rotate
    `x.float()`); the result has x's dtype. Compiled where it pays (compilation.py): one pass instead of ~10 kernels."""
    return _rotate_pairs(x, *rope)


@compiled_when_large
def _rotate_pairs(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def mixed_rope_init(head_dim: int, num_heads: int, theta: float = 10.0, seed: int = 0) -> mx.array:
    """Initial (f_x, f_y) of mixed RoPE, shape (2, num_heads, head_dim/2), as Heo et al. do it:
    magnitudes theta^(-4j/head_dim) for j < head_dim/4, each used twice along two perpendicular
    directions, the pair of directions turned by a random angle per head. The angles come from
    MLX's generator (numpy's until the first image was made numpy-free): only the starting point
    of a training run from scratch depends on them; trained weights carry their own frequencies."""
    assert head_dim % 4 == 0, f"mixed RoPE needs head_dim divisible by 4, got {head_dim}"
    mag = 1.0 / theta ** (mx.arange(0, head_dim, 4) / head_dim)  # (d/4,)
    turn = mx.random.uniform(0.0, 2 * math.pi, (num_heads, 1), key=mx.random.key(seed))  # (H, 1)
    directions = mx.concatenate([turn, turn + math.pi / 2], axis=-1)  # (H, 2)
    dirs = mx.repeat(directions, mag.size, axis=-1)  # (H, d/2): d/4 of each direction
    mags = mx.tile(mag, 2)[None]  # (1, d/2)
    return mx.stack([mags * mx.cos(dirs), mags * mx.sin(dirs)])


class MixedRoPE(nn.Module):
    """2-D RoPE with learnable frequencies mixing both axes in every channel pair."""

    def __init__(self, head_dim: int, num_heads: int, theta: float = 10.0, seed: int = 0):
        super().__init__()
        self.freqs = mixed_rope_init(head_dim, num_heads, theta, seed)  # (2, H, d/2)

    def __call__(self, ids: mx.array) -> tuple[mx.array, mx.array]:
        """ids (L, 2) as (y, x) -> (cos, sin), each (H, L, d/2)."""
        ids = mx.array(ids).astype(mx.float32)
        if ids.ndim != 2 or ids.shape[1] != 2:
            raise ValueError(f"mixed RoPE takes 2-D position ids (L, 2), got {tuple(ids.shape)}")
        # angles in float32 whatever the weights' dtype: in bf16 x * f_x would be off by ~0.1 rad at x = 32
        f_x, f_y = self.freqs[0].astype(mx.float32), self.freqs[1].astype(mx.float32)  # (H, d/2)
        y, x = ids[:, 0], ids[:, 1]
        angles = x[None, :, None] * f_x[:, None, :] + y[None, :, None] * f_y[:, None, :]
        return mx.cos(angles), mx.sin(angles)


class AxialRoPE(nn.Module):
    """FLUX's multi-axis RoPE as a module (no weights), so the MM-DiT can hold either variant."""

    def __init__(self, axes_dim: tuple[int, ...], theta: float = 10_000.0):
        super().__init__()
        self.axes_dim, self.theta = tuple(axes_dim), theta

    def __call__(self, ids) -> tuple[mx.array, mx.array]:
        return axial_rope(ids, self.axes_dim, self.theta)
