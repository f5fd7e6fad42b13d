"""The transformer block of latent diffusion (Rombach et al., 2022, sec. 3.3; diffusers'
BasicTransformerBlock): pre-LayerNorm self-attention, cross-attention to the text, feed-forward.

    x = x + SelfAttn(LN1(x))
    x = x + CrossAttn(LN2(x), context)          q from the image tokens, k and v from the text
    x = x + FF(LN3(x))                          FF = Linear(GEGLU) -> Linear

GEGLU (Shazeer, 2020): one Linear makes 2 x 4D values (h, g); the block passes h * GELU(g), with
the exact (erf) GELU. Attention projections have no bias, the output projection has one.
Names follow diffusers (to_q, to_k, to_v, to_out; ff), so a checkpoint maps almost one to one.
"""

import mlx.core as mx
import mlx.nn as nn

from .attention import CROSS, attention


class Attention(nn.Module):
    """Multi-head attention over (B, L, D) tokens; with `context_dim`, cross-attention to a
    (B, S, context_dim) context (the text), else self-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        B, L, D = x.shape

        def heads(t):  # (B, L, D) -> (B, H, L, D/H)
            return t.reshape(B, t.shape[1], self.heads, -1).transpose(0, 2, 1, 3)

        span = None if context is x else CROSS  # cross-attention: every query reads the text
        return self.to_out(attention(heads(self.to_q(x)), heads(self.to_k(context)), heads(self.to_v(context)),
                                     span=span))


class FeedForward(nn.Module):
    """Linear D -> 4D (x2 for GEGLU), activation, Linear 4D -> D. activation: "geglu" (SD),
    "gelu" (exact) or "gelu-approximate" (tanh; DiT)."""

    def __init__(self, dim: int, activation: str = "geglu", mult: int = 4):
        super().__init__()
        if activation not in ("geglu", "gelu", "gelu-approximate"):
            raise ValueError(f"unknown feed-forward activation {activation!r}")
        self.activation, inner = activation, dim * mult
        self.proj_in = nn.Linear(dim, 2 * inner if activation == "geglu" else inner)
        self.proj_out = nn.Linear(inner, dim)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.proj_in(x)
        if self.activation == "geglu":
            h, gate = mx.split(h, 2, axis=-1)
            h = h * nn.gelu(gate)
        else:
            h = nn.gelu(h) if self.activation == "gelu" else nn.gelu_approx(h)
        return self.proj_out(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to `context`, GEGLU feed-forward; LayerNorms eps 1e-5."""

    def __init__(self, dim: int, heads: int, context_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, "geglu")

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:  # (B, L, D), (B, S, context_dim)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))
