"""Embedding the conditioning scalars and vectors, and (un)packing latents into tokens."""

import math
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn


@lru_cache(maxsize=None)
def sinusoid_frequencies(half: int, max_period: float = 10_000.0, shift: float = 0.0) -> mx.array:
    """ω_j = exp(-ln(max_period) j / (half - shift)), j = 0 .. half - 1, (half,) float32, computed
    once per size. As PyTorch computes them: the exponent in float32 (on the CPU stream, whose
    float32 arithmetic is IEEE on every machine), its exp in float64 (Python's), rounded to float32."""
    with mx.stream(mx.cpu):
        exponent = mx.array(-math.log(max_period), mx.float32) * mx.arange(half, dtype=mx.float32)
        exponent = exponent / mx.array(half - shift, mx.float32)
    return mx.array([math.exp(e) for e in exponent.tolist()], mx.float32)


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0,
                       arg_scale: float = 1.0):
    """Sinusoidal embedding of t in [0, 1] (B,) -> (B, dim), cos half first, as FLUX does.

    t is scaled by 1000 first (the DDPM timestep range); frequencies exp(-ln(max_period) j / (dim/2)).
    diffusers' `Timesteps(scale=1000)` (Qwen-Image) scales the arguments after the product instead,
    (t · ω) · 1000, which rounds differently in float32: time_factor=1, arg_scale=1000.
    The arguments reach 1000 rad, where one float32 ulp of a frequency moves sin/cos by 6e-5: the
    frequencies are rounded from float64, which reproduces PyTorch's float32 table."""
    t = time_factor * t.astype(mx.float32)
    freqs = sinusoid_frequencies(dim // 2, max_period)
    args = t[:, None] * freqs[None]
    if arg_scale != 1.0:
        args = args * arg_scale
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: lifts a timestep embedding or a pooled text vector to the model width."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_layer(nn.silu(self.in_layer(x)))


def pack_latents(z: mx.array, patch: int = 2) -> mx.array:
    """Latents (B, h, w, C) -> tokens (B, h/p * w/p, C p p), one token per p x p patch.

    Channel order c·p² + ph·p + pw, exactly as FLUX packs its (B, C, h, w) latents."""
    B, h, w, C = z.shape
    if h % patch or w % patch:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {patch}")
    z = z.reshape(B, h // patch, patch, w // patch, patch, C)
    z = z.transpose(0, 1, 3, 5, 2, 4)  # (B, h/p, w/p, C, ph, pw)
    return z.reshape(B, (h // patch) * (w // patch), C * patch * patch)


def unpack_latents(tokens: mx.array, h: int, w: int, patch: int = 2) -> mx.array:
    """Inverse of `pack_latents`: (B, h/p * w/p, C p p) -> (B, h, w, C)."""
    B, L, D = tokens.shape
    C = D // (patch * patch)
    z = tokens.reshape(B, h // patch, w // patch, C, patch, patch)
    z = z.transpose(0, 1, 4, 2, 5, 3)  # (B, h/p, ph, w/p, pw, C)
    return z.reshape(B, h, w, C)


def ddpm_timestep_embedding(t: mx.array, dim: int = 256, downscale_freq_shift: float = 1.0, max_period: float = 10_000.0):
    """Sinusoidal embedding of DDPM timesteps t in [0, 1000) (B,) -> (B, dim), cos half first:
    [cos(t ω_j), sin(t ω_j)], ω_j = exp(-ln(max_period) j / (dim/2 - downscale_freq_shift)).

    diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift)`, as its
    DiT (`CombinedTimestepLabelEmbeddings`) uses it with a shift of 1; the original DiT code and
    `timestep_embedding` above divide by dim/2 (a shift of 0) and take t in [0, 1]. Computed in
    float32 (the caller casts to its weights' dtype, as diffusers does); the frequencies are
    rounded from float64, as in `timestep_embedding`."""
    freqs = sinusoid_frequencies(dim // 2, max_period, downscale_freq_shift)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def unpatchify(tokens: mx.array, h: int, w: int, patch: int = 2) -> mx.array:
    """Tokens (B, h/p * w/p, p p C) with channel order ph·p·C + pw·C + c, as DiT (and MAE) lay out
    their output patches -> (B, h, w, C). (`unpack_latents` reads FLUX's c·p² + ph·p + pw.)"""
    B, L, D = tokens.shape
    C = D // (patch * patch)
    if L != (h // patch) * (w // patch) or D != C * patch * patch:
        raise ValueError(f"{L} tokens of width {D} are not a {h}x{w} latent in {patch}x{patch} patches")
    z = tokens.reshape(B, h // patch, w // patch, patch, patch, C)
    z = z.transpose(0, 1, 3, 2, 4, 5)  # (B, h/p, ph, w/p, pw, C)
    return z.reshape(B, h, w, C)
