"""gelu_tanh and silu_fast (layers/activations.py) equal their formulas in float64: the
tanh-approximated GELU to 1e-6, SiLU to 3e-7 |x|."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from conftest import assert_close
from tiny_imagegen.layers.activations import gelu_tanh, silu_fast, tanh_rational


def test_tanh_rational_equals_tanh():
    x = np.linspace(-20, 20, 400_001).astype(np.float32)
    assert_close("rational tanh vs float64 tanh", tanh_rational(mx.array(x)), np.tanh(x.astype(np.float64)), atol=5e-7)


def test_gelu_tanh_equals_the_formula_and_keeps_the_dtype():
    x = np.linspace(-12, 12, 200_001).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)))
    assert_close("gelu_tanh vs float64 formula", gelu_tanh(mx.array(x)), ref, atol=1e-6)
    assert_close("gelu_tanh vs nn.gelu_approx", gelu_tanh(mx.array(x)), nn.gelu_approx(mx.array(x)), atol=1e-6)
    xb = mx.array(x).astype(mx.bfloat16)
    half = gelu_tanh(xb)
    assert half.dtype == mx.bfloat16
    # computed in float32 and rounded once: within half a bf16 ulp (<= 2^-8 relative) of the exact value
    x64 = np.array(xb.astype(mx.float32), np.float64)
    ref = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64**3)))
    assert np.all(np.abs(np.array(half.astype(mx.float32)) - ref) <= 2**-8 * np.abs(ref) + 1e-6)


def test_silu_fast_equals_silu_and_rounds_once():
    x = np.linspace(-30, 30, 600_001).astype(np.float32)
    x64 = x.astype(np.float64)
    exact = x64 / (1 + np.exp(-x64))
    err = np.abs(np.array(silu_fast(mx.array(x)), np.float64) - exact)
    print(f"[silu_fast] max |error| / max(|x|, 1e-3): {(err / np.maximum(np.abs(x64), 1e-3)).max():.2e}")
    assert np.all(err <= 3e-7 * np.abs(x64) + 1e-12)
    assert_close("silu_fast vs nn.silu", silu_fast(mx.array(x)), nn.silu(mx.array(x)), atol=3e-6)
    xb = mx.array(x[::7]).astype(mx.bfloat16)
    half = silu_fast(xb)
    assert half.dtype == mx.bfloat16
    x64 = np.array(xb.astype(mx.float32), np.float64)  # rounded once: within half a bf16 ulp, plus the float32 error
    ref = x64 / (1 + np.exp(-x64))
    assert np.all(np.abs(np.array(half.astype(mx.float32)) - ref) <= 2**-8 * np.abs(ref) + 3e-7 * np.abs(x64))
