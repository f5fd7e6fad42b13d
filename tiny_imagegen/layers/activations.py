"""Activations computed as PyTorch computes them, and fast where MLX's CPU kernels are slow.

silu, rounded as PyTorch rounds it, for bit-faithful bf16:

PyTorch's elementwise kernels on bf16/fp16 tensors compute in float32 ("opmath") and round once.
MLX composes `nn.silu(x) = x * sigmoid(x)` from two ops, each rounded to the input dtype: in
bf16 that differs from torch in ~30% of elements by an ulp, and over 28 Qwen3 layers it moved
the hidden states 1.5x further from the fp32 result than torch's bf16 run (0.84x after this).

gelu_tanh, the tanh-approximated GELU of FLUX's and T5's MLPs, from multiplies and adds:

    gelu_tanh(x) = x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))        (Hendrycks & Gimpel 2016)

On Linux CPUs MLX evaluates tanh one element at a time (~50 ns each on a loaded 2-core machine):
the MLPs of a full-width 2 double + 4 single block FLUX step at 256 + 256 tokens hold 38 M
activations, whose GELU took 3 s, a sixth of the step. Here tanh is a rational function, Eigen's
float32 `generic_fast_tanh_float` fit (an odd degree-13 numerator over an even degree-6
denominator on [-7.9, 7.9], where tanh is within 3e-8 of ±1 outside; max error 4e-7 against
float64 tanh), which mx.compile fuses with the rest into one pass: 3-4x faster here (on the CPU only on
large tensors, where that repays building the kernel: compilation.py). It is
computed in float32 whatever the input dtype, as PyTorch computes a bf16 GELU, then cast back.
"""

import math

import mlx.core as mx
import mlx.nn as nn

from ..device.compilation import compiled_when_large


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) in float32, rounded once to x's dtype (bitwise torch's `F.silu` in bf16)."""
    return nn.silu(x.astype(mx.float32)).astype(x.dtype)

_CLAMP = 7.90531110763549805
_NUMERATOR = (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
              -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16)  # x^1, x^3, ..., x^13
_DENOMINATOR = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)  # x^0 .. x^6


def _horner(coefficients, x2: mx.array) -> mx.array:
    out = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        out = out * x2 + c
    return out


def tanh_rational(x: mx.array) -> mx.array:
    """tanh(x) for float32 x, to 4e-7."""
    x = mx.clip(x, -_CLAMP, _CLAMP)
    x2 = x * x
    return x * _horner(_NUMERATOR, x2) / _horner(_DENOMINATOR, x2)


@compiled_when_large  # fused where the tensor is large enough to repay building the kernel (compilation.py)
def gelu_tanh(x: mx.array) -> mx.array:
    """Same as nn.gelu_approx (PyTorch's gelu(approximate='tanh'), T5's gelu_new) to ~1e-7 |x|."""
    x32 = x.astype(mx.float32)
    u = math.sqrt(2 / math.pi) * (x32 + 0.044715 * x32 * x32 * x32)
    return (0.5 * x32 * (1 + tanh_rational(u))).astype(x.dtype)


@compiled_when_large
def silu_fast(x: mx.array) -> mx.array:
    """x · sigmoid(x) = h + h · tanh(h) with h = x/2, tanh as above: within 3e-7 |x| of the exact
    value, 3-4x faster than nn.silu on a Linux CPU (its sigmoid's exp runs one element at a time,
    ~25 ns each); computed in float32 and rounded once, as PyTorch computes a bf16 SiLU."""
    h = 0.5 * x.astype(mx.float32)
    return (h + h * tanh_rational(h)).astype(x.dtype)


class GELUTanh(nn.Module):
    """`gelu_tanh` as a layer (no weights), for nn.Sequential MLPs."""

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_tanh(x)
