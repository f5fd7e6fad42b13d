"""The MM-DiT of FLUX.1 (and its SD3-style and single-stream relatives).

Text tokens (T5) and image tokens (packed latents) are two streams. A *double-stream* block keeps
separate weights per stream — its own adaLN modulation, q/k/v projections and MLP — and mixes
them only in one joint attention over [text; image]. A *single-stream* block treats the joined
sequence as one, with one fused projection feeding attention and the MLP in parallel.

    hybrid (FLUX.1):      19 double blocks, then 38 single blocks
    dual-stream (SD3):    double blocks only
    single-stream:        single blocks only (text and image joined from the start)

The conditioning vector c = time_in(t) [+ guidance_in(g)] + vector_in(pooled text) modulates
every block (adaLN-Zero, see layers/modulation.py). Parameter names follow the original FLUX code
(`double_blocks.0.img_attn.qkv.weight`), so its checkpoints map almost one to one.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..layers.activations import GELUTanh, gelu_tanh
from ..layers.attention import QKNorm, TextSpan, attention, masked_attention, split_heads
from ..layers.embeddings import MLPEmbedder, timestep_embedding
from ..layers.modulation import Modulation, layer_norm, modulate
from ..layers.positions import (
    centred_image_ids, diagonal_text_ids, flux_image_ids, flux_text_ids, text_start_after,
)
from ..layers.rope import AxialRoPE, MixedRoPE


@dataclass(frozen=True)
class MMDiTConfig:
    in_channels: int = 64  # packed latent: 16 channels x 2 x 2
    out_channels: int | None = None  # defaults to in_channels
    num_heads: int = 24
    head_dim: int = 128
    depth_double: int = 19
    depth_single: int = 38
    mlp_ratio: float = 4.0
    context_dim: int = 4096  # T5-XXL width
    vec_dim: int = 768  # CLIP-L pooled width
    guidance_embed: bool = False  # FLUX.1-dev's distilled guidance input
    rope: str = "axial"  # "axial" (FLUX) or "mixed" (learnable 2-D frequencies)
    axes_dim: tuple[int, ...] = (16, 56, 56)  # axial RoPE: channels per id axis, sums to head_dim
    theta: float = 10_000.0

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def composition(self) -> str:
        if self.depth_double and self.depth_single:
            return "hybrid"
        return "dual-stream" if self.depth_double else "single-stream"

    def __post_init__(self):
        if self.rope not in ("axial", "mixed"):
            raise ValueError(f"unknown RoPE variant {self.rope!r}: use 'axial' or 'mixed'")
        if self.rope == "axial" and sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to head_dim {self.head_dim}")
        if self.depth_double + self.depth_single == 0:
            raise ValueError("an MM-DiT needs at least one block")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "MMDiTConfig":
        """From a diffusers FluxTransformer2DModel config.json."""
        return cls(
            in_channels=cfg.get("in_channels", 64),
            out_channels=cfg.get("out_channels"),
            num_heads=cfg.get("num_attention_heads", 24),
            head_dim=cfg.get("attention_head_dim", 128),
            depth_double=cfg.get("num_layers", 19),
            depth_single=cfg.get("num_single_layers", 38),
            context_dim=cfg.get("joint_attention_dim", 4096),
            vec_dim=cfg.get("pooled_projection_dim", 768),
            guidance_embed=cfg.get("guidance_embeds", False),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
        )


def mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), GELUTanh(), nn.Linear(hidden, dim))


class SelfAttention(nn.Module):
    """One stream's share of joint attention: fused q/k/v projection, QK-norm, output projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


def joint_span(n_txt: int, n_img: int | None = None, text_first: bool = True) -> TextSpan:
    """Where attention maps read image queries and text keys in a joint sequence: [text; image]
    (FLUX), or [image; text] (SD3, `text_first=False`, which needs n_img)."""
    if text_first:
        return TextSpan(slice(n_txt, None), slice(0, n_txt))
    return TextSpan(slice(0, n_img), slice(n_img, None))


def double_stream(block, img: mx.array, txt: mx.array, img_mod, txt_mod, rope, eps: float = 1e-6,
                  text_first: bool = True, after_attention=None, key_mask: mx.array | None = None):
    """The double block's body, shared by FLUX.1, FLUX.2, SD3 and Qwen-Image (whose blocks differ in
    their MLP, where the modulation comes from, what SD3.5 adds and whether padded text is masked). Each stream has its own weights,
    `block.{img,txt}_{attn,mlp}`; the attention is joint over [txt; img] (`text_first=False`:
    [img; txt], SD3's order: without RoPE the same function, summed in another order).

    img (B, L_img, D), txt (B, L_txt, D); *_mod: (shift1, scale1, gate1, shift2, scale2, gate2), each
    (B, D): the attention branch's, then the MLP's; rope: (cos, sin) for the joint sequence, or None.
    A `txt_mod` of only (shift1, scale1) is a text stream that feeds the attention and ends there
    (SD3's last block, `context_pre_only`): txt comes back None. `after_attention(img, LN(img))`
    adds a branch between the attention and the MLP (SD3.5's MMDiT-X second attention). key_mask
    (B, L_txt + L_img) bool or None: False for padded text keys (Qwen-Image)."""
    img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mod
    txt_shift1, txt_scale1 = txt_mod[:2]

    img_normed = layer_norm(img, eps)
    img_q, img_k, img_v = block.img_attn.qkv_heads(modulate(img_normed, img_shift1, img_scale1))
    txt_q, txt_k, txt_v = block.txt_attn.qkv_heads(modulate(layer_norm(txt, eps), txt_shift1, txt_scale1))
    pairs = ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)) if text_first else ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v))
    q, k, v = (mx.concatenate(pair, axis=2) for pair in pairs)
    n_txt, n_img = txt.shape[1], img.shape[1]
    span = joint_span(n_txt, n_img, text_first)
    joint = attention(q, k, v, rope, span) if key_mask is None else masked_attention(q, k, v, rope, key_mask, span)
    txt_out, img_out = (joint[:, :n_txt], joint[:, n_txt:]) if text_first else (joint[:, n_img:], joint[:, :n_img])

    img = img + img_gate1[:, None] * block.img_attn.proj(img_out)
    if after_attention is not None:
        img = after_attention(img, img_normed)
    img = img + img_gate2[:, None] * block.img_mlp(modulate(layer_norm(img, eps), img_shift2, img_scale2))
    if len(txt_mod) == 2:
        return img, None
    txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mod[2:]
    txt = txt + txt_gate1[:, None] * block.txt_attn.proj(txt_out)
    txt = txt + txt_gate2[:, None] * block.txt_mlp(modulate(layer_norm(txt, eps), txt_shift2, txt_scale2))
    return img, txt


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.img_mod, self.txt_mod = Modulation(dim, 6), Modulation(dim, 6)
        self.img_attn, self.txt_attn = SelfAttention(dim, num_heads), SelfAttention(dim, num_heads)
        self.img_mlp, self.txt_mlp = mlp(dim, mlp_ratio), mlp(dim, mlp_ratio)

    def __call__(self, img: mx.array, txt: mx.array, c: mx.array, rope: mx.array):
        """img (B, L_img, D), txt (B, L_txt, D), c (B, D), rope: (cos, sin) for [txt; img]."""
        return double_stream(self, img, txt, self.img_mod(c), self.txt_mod(c), rope)


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP on one sequence (Dehghani et al., 2023): linear1 yields q, k, v
    and the MLP input at once; linear2 maps [attention out; MLP hidden] back to the width."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads, self.head_dim, self.mlp_hidden = num_heads, dim // num_heads, int(dim * mlp_ratio)
        self.modulation = Modulation(dim, 3)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)

    def __call__(self, x: mx.array, c: mx.array, rope: mx.array, n_txt: int | None = None) -> mx.array:
        """x (B, L, D) = [text; image] -> (B, L, D); n_txt: the text tokens (for attention maps)."""
        shift, scale, gate = self.modulation(c)
        h = self.linear1(modulate(layer_norm(x), shift, scale))
        n_qkv = 3 * self.num_heads * self.head_dim  # (this rank's heads, when sharded: distributed.py)
        qkv, mlp_in = h[..., :n_qkv], h[..., n_qkv:]
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        span = None if n_txt is None else joint_span(n_txt)
        out = mx.concatenate([attention(q, k, v, rope, span), gelu_tanh(mlp_in)], axis=-1)
        return x + gate[:, None] * self.linear2(out)


class LastLayer(nn.Module):
    """adaLN (shift, scale — no gate) then a projection back to latent patches."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.modulation = Modulation(dim, 2)
        self.linear = nn.Linear(dim, out_channels)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        shift, scale = self.modulation(c)
        return self.linear(modulate(layer_norm(x), shift, scale))


class MMDiT(nn.Module):
    # The residual stream of FLUX's blocks grows beyond float16's 65504 (diffusers clips it to
    # that range after every block, which turns an overflow into a wrong value, not a right one).
    unsupported_dtypes = {mx.float16: "its residual stream overflows float16 (max 65504); use bfloat16 or float32"}

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, D)
        self.txt_in = nn.Linear(cfg.context_dim, D)
        self.time_in = MLPEmbedder(256, D)
        self.vector_in = MLPEmbedder(cfg.vec_dim, D)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(256, D)
        if cfg.rope == "axial":
            self.pe_embedder = AxialRoPE(cfg.axes_dim, cfg.theta)
        else:
            self.pe_embedder = MixedRoPE(cfg.head_dim, cfg.num_heads)
        self.double_blocks = [DoubleStreamBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_double)]
        self.single_blocks = [SingleStreamBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_single)]
        self.final_layer = LastLayer(D, cfg.out_channels or cfg.in_channels)

    def position_ids(self, grid_h: int, grid_w: int, n_txt: int) -> tuple[mx.array, mx.array]:
        """(txt_ids, img_ids) for a grid_h x grid_w token grid and n_txt text tokens: FLUX's
        (0, row, col) and zeros for axial RoPE; centred (row, col) and diagonal text placed
        beyond the grid for mixed RoPE."""
        if self.config.rope == "axial":
            return flux_text_ids(n_txt), flux_image_ids(grid_h, grid_w)
        start = text_start_after(grid_h, grid_w)
        return diagonal_text_ids(n_txt, 2, start), centred_image_ids(grid_h, grid_w)

    def rope_table(self, img_ids, txt_ids) -> tuple[mx.array, mx.array]:
        """The RoPE (cos, sin) table of the joint sequence [text; image], in float32. It depends
        on the positions only (and, for mixed RoPE, the learned frequencies): build it once per
        generation and pass it to every step as `rope=`, instead of once per step."""
        return self.pe_embedder(_concat_ids(txt_ids, img_ids))

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype: that of the weights (of a quantized layer's scales; a LoRA-wrapped
        layer's base), read off txt_in's first floating-point parameter."""
        return next(v.dtype for _, v in tree_flatten(self.txt_in.parameters()) if mx.issubdtype(v.dtype, mx.floating))

    def conditioning(self, timesteps: mx.array, y: mx.array, guidance: mx.array | None) -> mx.array:
        """c = time_in(t) [+ guidance_in(g)] + vector_in(y): (B, D), in the model's dtype.

        The sinusoids are computed in float32 (their arguments reach 1000 rad) and cast to the
        weights' dtype before time_in / guidance_in, as BFL (`.to(t)`) and diffusers
        (`.to(pooled_projection.dtype)`) do; without the cast a bf16 model's c, and through the
        modulation the whole residual stream, would be float32."""
        dtype = self.dtype
        c = self.time_in(timestep_embedding(timesteps).astype(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this model was distilled with guidance (FLUX.1-dev style): pass guidance=")
            c = c + self.guidance_in(timestep_embedding(guidance).astype(dtype))
        return c + self.vector_in(y.astype(dtype))

    def __call__(
        self,
        img: mx.array,  # (B, L_img, in_channels) packed latents
        img_ids,  # (L_img, n_axes)
        txt: mx.array,  # (B, L_txt, context_dim) T5 hidden states
        txt_ids,  # (L_txt, n_axes)
        timesteps: mx.array,  # (B,) in [0, 1]; 1 is pure noise
        y: mx.array,  # (B, vec_dim) pooled CLIP
        guidance: mx.array | None = None,  # (B,) distilled guidance scale
        rope: tuple[mx.array, mx.array] | None = None,  # rope_table(img_ids, txt_ids), else built here
        cache=None,  # a step_cache.FirstBlockCache: may skip all blocks but the first
    ) -> mx.array:  # (B, L_img, out_channels) predicted velocity
        cfg = self.config
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img must be (B, L, {cfg.in_channels}) packed latents, got {tuple(img.shape)}")
        if txt.ndim != 3 or txt.shape[-1] != cfg.context_dim:
            raise ValueError(f"txt must be (B, L, {cfg.context_dim}), got {tuple(txt.shape)}")
        c = self.conditioning(timesteps, y, guidance)
        if rope is None:
            # one set of positions for the whole batch, as FLUX.2 (models/flux2.py) refuses batched
            # (B, L, n) ids too: diffusers accepts them with a deprecation warning and uses ids[0]
            n_axes = len(cfg.axes_dim) if cfg.rope == "axial" else 2  # mixed RoPE: (row, col)
            for name, ids, n in (("img_ids", img_ids, img.shape[1]), ("txt_ids", txt_ids, txt.shape[1])):
                shape = tuple(mx.array(ids).shape)  # mx or host (numpy) ids alike
                if shape != (n, n_axes):
                    raise ValueError(f"{name} must be ({n}, {n_axes}), shared by the batch; got {shape}")
            rope = self.rope_table(img_ids, txt_ids)
        # inputs in the weights' dtype (a torch model would refuse others; MLX would promote)
        img, txt = self.img_in(img.astype(self.dtype)), self.txt_in(txt.astype(self.dtype))
        if cache is None:
            img, txt = self.blocks(img, txt, c, rope)
        else:
            img, txt = cache(img, txt, lambda i, t: self.blocks(i, t, c, rope, 0, 1),
                             lambda i, t: self.blocks(i, t, c, rope, 1))
        return self.final_layer(img, c)

    def blocks(self, img: mx.array, txt: mx.array, c: mx.array, rope, start: int = 0, stop: int | None = None):
        """Blocks start..stop-1 of [double blocks, single blocks] on the two streams -> (img, txt).
        The single blocks see one sequence [txt; img], joined before the first and split after the
        last of them, so a step cache can cut the stack anywhere."""
        order = [*self.double_blocks, *self.single_blocks][start:stop]
        n_double = max(0, len(self.double_blocks) - start)
        for block in order[:n_double]:
            img, txt = block(img, txt, c, rope)
        if len(order) > n_double:
            x = mx.concatenate([txt, img], axis=1)
            for block in order[n_double:]:
                x = block(x, c, rope, txt.shape[1])
            txt, img = x[:, : txt.shape[1]], x[:, txt.shape[1] :]
        return img, txt


def _concat_ids(txt_ids, img_ids):
    """Joint position ids [text; image]. The builders' mx ids are joined in MLX; host (numpy) ids
    stay on the host, in their own precision (the axial tables are float64 there, layers/rope.py)."""
    if isinstance(txt_ids, mx.array) or isinstance(img_ids, mx.array):
        return mx.concatenate([mx.array(txt_ids), mx.array(img_ids)], axis=0)
    import numpy as np

    return np.concatenate([txt_ids, img_ids], axis=0)
