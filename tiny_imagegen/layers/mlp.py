"""Gated feed-forward blocks: SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer").

    SwiGLU(x) = (SiLU(x W_gate) ⊙ x W_up) W_down

FLUX.2 fuses W_gate and W_up into one projection whose output is [gate | up] (its single blocks
fuse it further, with q, k and v); Qwen3 and Z-Image keep them as separate Linears and call the
same `swiglu_gate`. The hidden width is mlp_ratio x dim (FLUX.2: 3).
"""

import mlx.core as mx
import mlx.nn as nn


def silu(x: mx.array) -> mx.array:
    """SiLU computed in float32 and rounded once to x's dtype, as torch's fused kernel does
    (MLX's `nn.silu` on bf16 rounds the sigmoid and the product separately: 30% of bf16
    elements then differ by an ulp from torch's)."""
    return nn.silu(x.astype(mx.float32)).astype(x.dtype)


def swiglu_gate(gate: mx.array, up: mx.array) -> mx.array:
    """SiLU(gate) ⊙ up."""
    return silu(gate) * up


def swiglu(h: mx.array) -> mx.array:
    """A fused [gate | up] projection (..., 2 hidden) -> (..., hidden)."""
    gate, up = mx.split(h, 2, axis=-1)
    return swiglu_gate(gate, up)


class SwiGLU(nn.Module):
    """The activation of a fused [gate | up] projection, as a layer (it has no weights)."""

    def __call__(self, h: mx.array) -> mx.array:
        return swiglu(h)


def swiglu_mlp(dim: int, hidden: int, bias: bool = True) -> nn.Sequential:
    """Linear(dim -> 2 hidden, [gate | up]) -> SwiGLU -> Linear(hidden -> dim): FLUX.2's
    `img_mlp` / `txt_mlp` (layers 0 and 2, as the original checkpoint numbers them)."""
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=bias), SwiGLU(), nn.Linear(hidden, dim, bias=bias))
