"""Multi-head attention with QK-RMSNorm and RoPE, as the MM-DiT blocks use it.

Joint attention (SD3, FLUX) is plain attention over the concatenation [text; image]: each stream
projects its own q, k, v with its own weights, the sequences are joined, and every token attends
to every other. Normalising q and k per head (RMSNorm with a learned scale) keeps the logits
bounded at large widths.
"""

import mlx.core as mx
import mlx.nn as nn

from .rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.scale, self.eps)


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def __call__(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        return self.query_norm(q), self.key_norm(k)


def split_heads(qkv: mx.array, num_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """(B, L, 3 H d) -> q, k, v each (B, H, L, d)."""
    B, L, _ = qkv.shape
    qkv = qkv.reshape(B, L, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attention(q: mx.array, k: mx.array, v: mx.array, rope: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """q, k, v (B, H, L, d), RoPE (cos, sin) table (see layers/rope.py) -> (B, L, H d)."""
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
    B, H, L, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * d)


def masked_attention(
    q: mx.array, k: mx.array, v: mx.array, rope: tuple[mx.array, mx.array] | None = None,
    key_mask: mx.array | None = None,
) -> mx.array:
    """`attention` where some keys are batch padding: key_mask (B, L) bool, True for keys that may
    be attended (None: all). The table may also be per sample, (B, 1, L, d/2). -> (B, L, H d)."""
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L): broadcast over heads, queries
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
    B, H, L, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * d)
