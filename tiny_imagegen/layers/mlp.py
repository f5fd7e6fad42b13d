"""Feed-forward blocks. FLUX.1's GELU MLP lives with its blocks (models/mmdit.py); this module holds
the gated one the newer families share.

SwiGLU (Shazeer, 2020, "GLU Variants Improve Transformer", eq. 6):

    FFN_SwiGLU(x) = W_down ( SiLU(W_gate x) ⊙ W_up x )

a gate branch and a value branch of the same width, multiplied, then projected back. Used by
Llama-style decoders (Qwen3), Z-Image and FLUX.2 (the latter fuses gate and up into one Linear).
"""

import mlx.core as mx
import mlx.nn as nn


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """SiLU(gate) ⊙ up, elementwise."""
    return nn.silu(gate) * up


class SwiGLU(nn.Module):
    """dim -> hidden (twice: gate and up) -> dim, with or without biases."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        """x (..., dim) -> (..., dim)."""
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
