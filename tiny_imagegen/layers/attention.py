"""Multi-head attention with QK-RMSNorm and RoPE, as the MM-DiT blocks use it.

Joint attention (SD3, FLUX) is plain attention over the concatenation [text; image]: each stream
projects its own q, k, v with its own weights, the sequences are joined, and every token attends
to every other. Normalising q and k per head (RMSNorm with a learned scale) keeps the logits
bounded at large widths.
"""

import os
from contextlib import contextmanager
from typing import Callable, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..device.streams import cpu_streams, pieces
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


# Below this many attention scores (B H Lq Lk) one call is as fast as the pieces and their joins.
PARALLEL_MIN_SCORES = 1 << 22


def _take(a: mx.array | None, axis: int, piece: slice) -> mx.array | None:
    """A piece of `a` along `axis`; all of it where it broadcasts there (size 1) or is absent."""
    if a is None or a.shape[axis] == 1:
        return a
    return a[(slice(None),) * axis + (piece,)]


def sdpa(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """mx.fast.scaled_dot_product_attention, cut into one piece per core on the CPU.

    q (B, H, Lq, d), k and v (B, H_kv, Lk, d) with H a multiple of H_kv (grouped-query attention),
    mask None or 4-D, broadcastable to (B, H, Lq, Lk) -> (B, H, Lq, d).

    Why: on the CPU MLX runs the softmax's exp on one thread, and at FLUX's sizes that is most of
    attention's time (0.74 of 0.92 s for 24 heads x 1536 tokens). Every (head, query) row of the
    softmax is independent, so a large problem is cut into pieces -- along the heads when they
    divide evenly (k and v keep their grouping), else along the queries -- and each piece runs on
    a CPU stream of its own, which MLX runs concurrently. The result is bit-identical to one call:
    1.4x faster at 1536 tokens in float32, 2x in bfloat16.

    Low precision on the CPU runs in float32, rounded once at the end: MLX's CPU kernel rounds the
    softmax probabilities to q's dtype before P @ V, where torch's kernels keep them in float32
    (the softmax's float32 island): in bf16 one call was 3.7x further from the exact result than
    torch's bf16 (tests/test_bf16_islands.py)."""
    if q.dtype != mx.float32 and mx.default_device() == mx.cpu:
        up = (a.astype(mx.float32) for a in (q, k, v))
        return sdpa(*up, scale=scale, mask=mask).astype(q.dtype)
    B, H, Lq, _ = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    cores = os.cpu_count() or 1
    if (mx.default_device() != mx.cpu or cores < 2 or B * H * Lq * Lk < PARALLEL_MIN_SCORES
            or (mask is not None and (not isinstance(mask, mx.array) or mask.ndim != 4))):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if H % cores == 0 and H_kv % cores == 0:  # piece i: a run of q heads and the kv heads they read
        axis = 1
        parts = [(q[:, h], k[:, g], v[:, g], _take(mask, 1, h)) for h, g in zip(pieces(H, cores), pieces(H_kv, cores))]
    else:  # a run of queries, each reading all keys
        axis = 2
        parts = [(q[:, :, i], k, v, _take(mask, 2, i)) for i in pieces(Lq, cores)]
    outs = [mx.fast.scaled_dot_product_attention(qi, ki, vi, scale=scale, mask=mi, stream=stream)
            for (qi, ki, vi, mi), stream in zip(parts, cpu_streams())]
    return mx.concatenate(outs, axis=axis)


def split_heads(qkv: mx.array, num_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """(B, L, 3 H d) -> q, k, v each (B, H, L, d)."""
    B, L, _ = qkv.shape
    qkv = qkv.reshape(B, L, 3, num_heads, -1).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


class TextSpan(NamedTuple):
    """Where a sequence's image queries and text keys sit: [text; image] joint attention (FLUX)
    is TextSpan(slice(n_txt, None), slice(0, n_txt)); cross-attention is all queries to all keys."""

    image: slice
    text: slice


CROSS = TextSpan(slice(None), slice(None))

# The attention-probability read-out (conditioning/attention_maps.py): None on the normal path,
# which keeps the fused kernel; while `reading_out(fn)` is active, every call that names a TextSpan
# also hands fn the image-to-text probabilities (text_attention). Not traced by mx.compile: run uncompiled then.
_readout: Callable[[mx.array], None] | None = None


@contextmanager
def reading_out(fn: Callable[[mx.array], None] | None):
    """Within the block, fn receives text_attention(...) (B, L_img, L_txt) from every attention
    call that names a TextSpan, in the order the model makes them. `reading_out(None)` suspends
    the read-out: for forwards that are not the prompt's (a negative prompt's own pass, SD3's
    skip-layer pass), so that each step's calls are the positive forward's blocks only."""
    global _readout
    previous, _readout = _readout, fn
    try:
        yield
    finally:
        _readout = previous


def reading_out_active() -> bool:
    return _readout is not None


def text_attention(q: mx.array, k: mx.array, span: TextSpan, scale: float,
                   key_mask: mx.array | None = None) -> mx.array:
    """The attention probabilities of the image queries to the text keys, averaged over heads:
    mean_h softmax(q_h k_h^T scale)[span.image, span.text] -> (B, L_img, L_txt) float32.

    q (B, H, Lq, d), k (B, H_kv, Lk, d) after RoPE; key_mask (B, Lk) bool, True where a key may be
    attended. The softmax runs over *all* keys (the image's own tokens too), so a row sums over the
    text keys to the image token's text share of attention (1 for cross-attention). Computed one
    head at a time in float32: the extra memory is one head's scores, B x L_img x Lk x 4 bytes
    (FLUX.1 at 1024x1024: 4096 x 4608 x 4 = 75 MB per sample), plus the (B, L_img, L_txt) result."""
    H, H_kv = q.shape[1], k.shape[1]
    qi = q[:, :, span.image].astype(mx.float32)
    total = None
    for h in range(H):
        logits = (qi[:, h] @ k[:, h // (H // H_kv)].astype(mx.float32).swapaxes(-1, -2)) * scale  # (B, L_img, Lk)
        if key_mask is not None:
            logits = mx.where(key_mask[:, None, :], logits, -mx.inf)
        p = mx.exp(logits[..., span.text] - mx.logsumexp(logits, axis=-1, keepdims=True))
        total = p if total is None else total + p
        mx.eval(total)  # one head's scores alive at a time
    return total / H


def _read_out(q, k, span: TextSpan | None, key_mask=None) -> None:
    if _readout is not None and span is not None:
        _readout(text_attention(q, k, span, q.shape[-1] ** -0.5, key_mask))


def attention(q: mx.array, k: mx.array, v: mx.array, rope: tuple[mx.array, mx.array] | None = None,
              span: TextSpan | None = None) -> mx.array:
    """q, k, v (B, H, L, d), RoPE (cos, sin) table (see layers/rope.py) -> (B, L, H d). `span`:
    where image queries and text keys sit, for the attention-map read-out (else unused)."""
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    _read_out(q, k, span)
    out = sdpa(q, k, v, scale=q.shape[-1] ** -0.5)
    B, H, L, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * d)


def masked_attention(
    q: mx.array, k: mx.array, v: mx.array, rope: tuple[mx.array, mx.array] | None = None,
    key_mask: mx.array | None = None, span: TextSpan | None = None,
) -> mx.array:
    """`attention` where some keys are batch padding: key_mask (B, L) bool, True for keys that may
    be attended (None: all). The table may also be per sample, (B, 1, L, d/2). -> (B, L, H d)."""
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    _read_out(q, k, span, key_mask)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L): broadcast over heads, queries
    out = sdpa(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
    B, H, L, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * d)
