"""Adaptive LayerNorm (adaLN, adaLN-Zero): the conditioning vector sets each block's norms.

A LayerNorm without affine parameters, then

    modulate(x) = x · (1 + scale) + shift                      (DiT, Peebles & Xie 2023, eq. in §3.2)

with (shift, scale) regressed from the conditioning vector c (timestep + pooled text). adaLN-Zero
adds a gate on each residual branch, x + gate · f(modulate(norm(x))); initialising the regression
to zero makes every block start as the identity.
"""

import mlx.core as mx
import mlx.nn as nn


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """x (B, L, D); shift, scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """LayerNorm without affine parameters: the modulation supplies them."""
    return mx.fast.layer_norm(x, None, None, eps)


class Modulation(nn.Module):
    """c (B, D) -> n chunks (B, D) each, via SiLU then one Linear. FLUX's order per branch is
    (shift, scale, gate); a double block takes 6 (attention then MLP), a single block 3."""

    def __init__(self, dim: int, n: int, zero_init: bool = False):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim)
        if zero_init:  # adaLN-Zero
            self.lin.weight = mx.zeros_like(self.lin.weight)
            self.lin.bias = mx.zeros_like(self.lin.bias)

    def __call__(self, c: mx.array) -> list[mx.array]:
        return mx.split(self.lin(nn.silu(c)), self.n, axis=-1)
