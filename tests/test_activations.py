"""gelu_tanh (layers/activations.py) equals the tanh-approximated GELU, in float64, to 1e-6."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from conftest import assert_close
from tiny_imagegen.layers.activations import gelu_tanh, tanh_rational


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
