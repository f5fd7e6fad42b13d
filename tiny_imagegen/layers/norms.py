"""RMSNorm rounded once, as `torch.nn.RMSNorm` computes it in bfloat16.

Two RMSNorms in the references round differently in bf16. diffusers' own RMSNorm (FLUX.1) and
Qwen3's normalise in float32, round to bf16, then multiply by the bf16 weight: that is
`mx.fast.rms_norm` on bf16 (layers/attention.py). `torch.nn.RMSNorm` (FLUX.2's q/k norms)
upcasts input and weight, normalises *and* scales in float32 and rounds once at the end; on bf16
the two differ in ~25% of elements. In float32 they are the same function.
"""

import mlx.core as mx

from .attention import QKNorm, RMSNorm


def rms_norm_rounded_once(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """x / sqrt(mean(x²) + eps) · weight, all in float32, rounded once to x's dtype."""
    return mx.fast.rms_norm(x.astype(mx.float32), weight.astype(mx.float32), eps).astype(x.dtype)


class RMSNormRoundedOnce(RMSNorm):
    """`torch.nn.RMSNorm`'s rounding; the same `scale` parameter as RMSNorm."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm_rounded_once(x, self.scale, self.eps)


class QKNormRoundedOnce(QKNorm):
    """QK-norm (query_norm / key_norm, as QKNorm) with `torch.nn.RMSNorm`'s rounding."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__(head_dim)
        self.query_norm, self.key_norm = RMSNormRoundedOnce(head_dim, eps), RMSNormRoundedOnce(head_dim, eps)
