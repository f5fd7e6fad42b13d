"""Z-Image's single-stream DiT ("S3-DiT", Tongyi-MAI, Z-Image-Turbo: 6 B parameters).

Text and image share one sequence and one set of weights, after each has been refined alone:

    image tokens   --x_embedder--> noise_refiner   (2 modulated blocks, image only)   --+
    caption feats  --cap_embedder-> context_refiner (2 plain blocks, text only, no t)  -+-> [image; caption]
                                                                                         |
    [image; caption] --30 modulated blocks--> final layer --> the first N_img tokens --> patches

Every block is pre- and post-normed ("sandwich" RMSNorms) and modulated by scale and tanh-gate
only, no shift, from a plain Linear of the 256-wide timestep embedding (no SiLU before it):

    x = x + tanh(g1) · RMSNorm( Attn( RMSNorm(x) · (1 + s1) ) )
    x = x + tanh(g2) · RMSNorm( SwiGLU( RMSNorm(x) · (1 + s2) ) )            (diffusers ZT:261-273)

Each sample's caption and image are padded to a multiple of 32 tokens with *learned* pad tokens
that attend and are attended like real ones. Across a batch, shorter captions are padded further
and only those batch-padding keys are masked, and only when lengths differ. RoPE has three axes
(32/48/48 channels, theta 256): caption token j at (1 + j, 0, 0), counting through its pads; image
token (Lp + 1, row, col), Lp the padded caption length; image pads at (0, 0, 0).

The model predicts x0 - ε at time t = 1 - σ (0 is pure noise); the pipeline flips the sign.
Parameter names follow diffusers' ZImageTransformer2DModel where MLX allows (checkpoints/zimage.py).
"""

from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..layers.attention import RMSNorm, TextSpan, masked_attention, split_heads
from ..layers.embeddings import pack_latents, timestep_embedding, unpack_latents
from ..layers.mlp import SwiGLUMLP
from ..layers.modulation import layer_norm
from ..layers.positions import zimage_caption_ids, zimage_image_ids
from ..layers.rope import axial_rope_fp32_angles

SEQ_MULTIPLE = 32  # captions and images are each padded to a multiple of this (ZT:35)
ADALN_DIM = 256  # width of the timestep embedding that modulates every block: min(dim, 256)


@dataclass(frozen=True)
class ZImageConfig:
    in_channels: int = 16  # VAE latent channels (the FLUX.1 VAE)
    dim: int = 3840
    n_layers: int = 30  # main single-stream blocks
    n_refiner_layers: int = 2  # per refiner (noise and context)
    n_heads: int = 30  # head_dim = dim / n_heads = 128 = sum(axes_dims)
    norm_eps: float = 1e-5
    cap_feat_dim: int = 2560  # Qwen3-4B hidden size
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)  # RoPE channels of (sequence, row, col)
    axes_lens: tuple[int, ...] = (1024, 512, 512)  # the reference's table sizes: positions must stay below
    patch_size: int = 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_DIM)

    @property
    def ffn_hidden(self) -> int:
        return int(self.dim / 3 * 8)  # the float expression of ZT:215 (170 for dim 64, not 171)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    def __post_init__(self):
        if self.dim % self.n_heads or self.head_dim != sum(self.axes_dims):
            raise ValueError(f"head_dim = dim / n_heads = {self.dim}/{self.n_heads} must equal "
                             f"sum(axes_dims) {self.axes_dims}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(f"Z-Image's RoPE has three axes, got axes_dims {self.axes_dims}, axes_lens {self.axes_lens}")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ZImageConfig":
        """From a diffusers ZImageTransformer2DModel config.json (its defaults where a key is absent).
        `n_kv_heads` is ignored, as diffusers ignores it: attention is always multi-head (ZT:203)."""
        patches, f_patches = tuple(cfg.get("all_patch_size", (2,))), tuple(cfg.get("all_f_patch_size", (1,)))
        if len(patches) != 1 or f_patches != (1,):
            raise ValueError(f"one spatial patch size and frame patch 1 are supported, got {patches} / {f_patches}")
        if cfg.get("siglip_feat_dim") is not None or not cfg.get("qk_norm", True):
            raise ValueError("Z-Image Omni (siglip_feat_dim) and qk_norm=False are not supported")
        return cls(
            in_channels=cfg.get("in_channels", 16), dim=cfg.get("dim", 3840), n_layers=cfg.get("n_layers", 30),
            n_refiner_layers=cfg.get("n_refiner_layers", 2), n_heads=cfg.get("n_heads", 30),
            norm_eps=cfg.get("norm_eps", 1e-5), cap_feat_dim=cfg.get("cap_feat_dim", 2560),
            rope_theta=cfg.get("rope_theta", 256.0), t_scale=cfg.get("t_scale", 1000.0),
            axes_dims=tuple(cfg.get("axes_dims", (32, 48, 48))), axes_lens=tuple(cfg.get("axes_lens", (1024, 512, 512))),
            patch_size=patches[0],
        )


PRESETS = {
    # Tongyi-MAI/Z-Image-Turbo, 6.15 B parameters: the defaults of diffusers 0.42.1's
    # ZImageTransformer2DModel.__init__ (transformer_z_image.py:367-386), written for this model.
    # The hub's transformer/config.json could not be read offline here: [unverified] against it.
    "z-image-turbo": ZImageConfig(),
}


def preset(name: str, **overrides) -> ZImageConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Z-Image preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---- patches: FLUX's packing with the feature order (ph, pw, c) ------------------------------------


def patchify(latents: mx.array, patch: int = 2) -> mx.array:
    """(B, H, W, C) -> (B, H/p * W/p, p p C), tokens row-major, features (ph, pw, c) with c fastest
    (ZT:544-551; FLUX packs (c, ph, pw), see layers/embeddings.py)."""
    tokens = pack_latents(latents, patch)  # features (c, ph, pw)
    B, L, D = tokens.shape
    return tokens.reshape(B, L, D // (patch * patch), patch * patch).swapaxes(2, 3).reshape(B, L, D)


def unpatchify(tokens: mx.array, height: int, width: int, patch: int = 2) -> mx.array:
    """Inverse of `patchify`: (B, H/p * W/p, p p C) -> (B, H, W, C)."""
    B, L, D = tokens.shape
    flux_order = tokens.reshape(B, L, patch * patch, D // (patch * patch)).swapaxes(2, 3).reshape(B, L, D)
    return unpack_latents(flux_order, height, width, patch)


def padded(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


# ---- the sequence layout: lengths, RoPE tables, masks (host side, per call) ------------------------


class Layout(NamedTuple):
    """Where every token of a batch sits. Lengths in tokens; tables (cos, sin) of RoPE."""

    n_img: int  # image tokens per sample (all samples share the latent size)
    img_len: int  # padded to a multiple of 32
    cap_lens: tuple[int, ...]  # each sample's padded caption length
    img_rope: tuple[mx.array, mx.array]  # (B, 1, img_len, d/2): per sample (its first axis is Lp + 1)
    cap_rope: tuple[mx.array, mx.array]  # (cap_len_max, d/2), shared
    cap_mask: mx.array | None  # (B, cap_len_max) bool, True where a key is no batch padding
    rope: tuple[mx.array, mx.array]  # (B, 1, img_len + cap_len_max, d/2): [image; caption]
    mask: mx.array | None  # (B, img_len + cap_len_max)


def sequence_layout(config: ZImageConfig, grid_h: int, grid_w: int, caption_lengths: Sequence[int]) -> Layout:
    """The layout of a batch of grid_h x grid_w token images with these caption lengths."""
    n_img = grid_h * grid_w
    img_len, cap_lens = padded(n_img), tuple(padded(n) for n in caption_lengths)
    cap_max = max(cap_lens)
    rows_needed = (cap_max + 2, grid_h, grid_w)  # largest position + 1 per axis (image at Lp + 1)
    if any(r > n for r, n in zip(rows_needed, config.axes_lens)):
        raise ValueError(f"caption of {cap_max} padded tokens and a {grid_h}x{grid_w} token grid exceed the "
                         f"RoPE table sizes axes_lens={config.axes_lens} of this model")

    def table(ids):
        return axial_rope_fp32_angles(ids, config.axes_dims, config.rope_theta)

    img_ids = mx.stack([zimage_image_ids(grid_h, grid_w, lp + 1, img_len) for lp in cap_lens])
    img_cos, img_sin = table(img_ids.reshape(-1, 3))
    B, half = len(cap_lens), img_cos.shape[-1]
    img_rope = (img_cos.reshape(B, 1, img_len, half), img_sin.reshape(B, 1, img_len, half))
    cap_rope = table(zimage_caption_ids(cap_max))  # batch-padding rows keep counting: masked, dropped
    rope = tuple(mx.concatenate([a, mx.broadcast_to(b, (B, 1, cap_max, half))], axis=2)
                 for a, b in zip(img_rope, cap_rope))
    if len(set(cap_lens)) == 1:  # equal lengths: no mask at all, as the reference (ZT:793, 879)
        return Layout(n_img, img_len, cap_lens, img_rope, cap_rope, None, rope, None)
    cap_mask = mx.arange(cap_max)[None] < mx.array(cap_lens)[:, None]
    mask = mx.concatenate([mx.ones((B, img_len), mx.bool_), cap_mask], axis=1)
    return Layout(n_img, img_len, cap_lens, img_rope, cap_rope, cap_mask, rope, mask)


# ---- modules ---------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """sinusoid(t · t_scale) (B, 256) -> Linear -> SiLU -> Linear -> (B, min(dim, 256))."""

    def __init__(self, out_dim: int, mid_dim: int = 1024, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, mid_dim)
        self.linear_2 = nn.Linear(mid_dim, out_dim)

    def __call__(self, t: mx.array, t_scale: float, dtype: mx.Dtype) -> mx.array:
        # the sinusoid in float32 whatever the model dtype, [cos | sin], then cast (ZT:54-72)
        t_freq = timestep_embedding(t, self.freq_dim, time_factor=t_scale).astype(dtype)
        return self.linear_2(nn.silu(self.linear_1(t_freq)))


class CaptionEmbedder(nn.Module):
    """RMSNorm then Linear: text-encoder features (B, L, cap_feat_dim) -> (B, L, dim)."""

    def __init__(self, cap_feat_dim: int, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(cap_feat_dim, eps)
        self.linear = nn.Linear(cap_feat_dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(self.norm(x))


class Attention(nn.Module):
    """Multi-head self-attention, fused q/k/v, per-head RMSNorm on q and k before RoPE, no biases."""

    def __init__(self, dim: int, n_heads: int, eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm_q, self.norm_k = RMSNorm(dim // n_heads, eps), RMSNorm(dim // n_heads, eps)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, rope, key_mask: mx.array | None, span: TextSpan | None = None) -> mx.array:
        q, k, v = split_heads(self.qkv(x), self.n_heads)  # (B, H, L, d)
        return self.to_out(masked_attention(self.norm_q(q), self.norm_k(k), v, rope, key_mask, span))


class ZImageBlock(nn.Module):
    """One S3-DiT block; `modulated=False` is the context refiner's (no timestep input)."""

    def __init__(self, config: ZImageConfig, modulated: bool):
        super().__init__()
        D, eps = config.dim, config.norm_eps
        self.attention = Attention(D, config.n_heads, eps)
        self.feed_forward = SwiGLUMLP(D, config.ffn_hidden)
        self.attention_norm1, self.attention_norm2 = RMSNorm(D, eps), RMSNorm(D, eps)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(D, eps), RMSNorm(D, eps)
        self.modulated = modulated
        if modulated:  # a plain Linear of the timestep embedding: no SiLU before it (ZT:226)
            self.adaLN_modulation = nn.Linear(config.adaln_dim, 4 * D)

    def __call__(self, x: mx.array, rope, key_mask: mx.array | None, c: mx.array | None = None,
                 span: TextSpan | None = None) -> mx.array:
        """x (B, L, D), c (B, adaln_dim) or None for an unmodulated block -> (B, L, D); span: where
        image queries and caption keys sit (for attention maps)."""
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, key_mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(self.adaLN_modulation(c)[:, None], 4, axis=-1)
        # `1 + scale` first, in the model dtype, as the reference rounds it (ZT:263-264)
        scale_msa, scale_mlp, gate_msa, gate_mlp = 1 + scale_msa, 1 + scale_mlp, mx.tanh(gate_msa), mx.tanh(gate_mlp)
        x = x + gate_msa * self.attention_norm2(self.attention(self.attention_norm1(x) * scale_msa, rope, key_mask, span))
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) times (1 + scale), scale = Linear(SiLU(c)); no shift. Then -> patches."""

    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.adaLN_modulation = nn.Linear(config.adaln_dim, config.dim)
        self.linear = nn.Linear(config.dim, config.patch_dim)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        scale = 1 + self.adaLN_modulation(nn.silu(c))
        return self.linear(layer_norm(x, 1e-6) * scale[:, None])


class ZImageTransformer(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.config = cfg = config
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.cap_embedder = CaptionEmbedder(cfg.cap_feat_dim, cfg.dim, cfg.norm_eps)
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.x_pad_token = mx.zeros((1, cfg.dim))
        self.cap_pad_token = mx.zeros((1, cfg.dim))
        self.noise_refiner = [ZImageBlock(cfg, modulated=True) for _ in range(cfg.n_refiner_layers)]
        self.context_refiner = [ZImageBlock(cfg, modulated=False) for _ in range(cfg.n_refiner_layers)]
        self.layers = [ZImageBlock(cfg, modulated=True) for _ in range(cfg.n_layers)]
        self.final_layer = FinalLayer(cfg)

    @property
    def dtype(self) -> mx.Dtype:
        """The model dtype: that of the pad tokens (never quantized)."""
        return self.x_pad_token.dtype

    def __call__(
        self,
        latents: mx.array,  # (B, H, W, in_channels) VAE latents, channels last
        t: mx.array,  # (B,) model time in [0, 1]: 1 - sigma, 0 is pure noise
        cap_feats: mx.array,  # (B, L, cap_feat_dim) text-encoder features, right-padded
        cap_lengths: Sequence[int] | None = None,  # valid rows of each caption (default: all L)
        capture: dict | None = None,  # if given, filled with the intermediate outputs (for tests)
        cache=None,  # a step_cache context: may skip all main layers but the first
    ) -> mx.array:  # (B, H, W, in_channels): the prediction x0 - noise, in the model dtype
        cfg, dtype = self.config, self.dtype
        B, H, W = self._check(latents, t, cap_feats)
        cap_lengths = [cap_feats.shape[1]] * B if cap_lengths is None else [int(n) for n in cap_lengths]
        if len(cap_lengths) != B or not all(1 <= n <= cap_feats.shape[1] for n in cap_lengths):
            raise ValueError(f"cap_lengths must give 1..{cap_feats.shape[1]} valid rows for each of {B} captions, "
                             f"got {cap_lengths}")
        p = cfg.patch_size
        layout = sequence_layout(cfg, H // p, W // p, cap_lengths)
        keep = capture.__setitem__ if capture is not None else lambda name, value: None

        c = self.t_embedder(t, cfg.t_scale, dtype)  # (B, adaln_dim)

        # image: embed, fill up to a multiple of 32 with the learned pad token, refine alone
        x = self.x_embedder(patchify(latents.astype(dtype), p))  # (B, n_img, D)
        x_pad = mx.broadcast_to(self.x_pad_token, (B, layout.img_len - layout.n_img, cfg.dim))
        x = mx.concatenate([x, x_pad], axis=1)
        for block in self.noise_refiner:
            x = block(x, layout.img_rope, None, c)  # every sample has the same image length: no mask
        keep("noise_refiner", x)

        # caption: embed, rows beyond each caption's length become the learned pad token
        cap_max = max(layout.cap_lens)
        feats = cap_feats.astype(dtype)[:, :cap_max]
        if feats.shape[1] < cap_max:
            feats = mx.pad(feats, [(0, 0), (0, cap_max - feats.shape[1]), (0, 0)])
        cap = self.cap_embedder(feats)
        real = mx.arange(cap_max)[None, :, None] < mx.array(cap_lengths)[:, None, None]
        cap = mx.where(real, cap, self.cap_pad_token)
        for block in self.context_refiner:
            cap = block(cap, layout.cap_rope, layout.cap_mask)
        keep("context_refiner", cap)

        # one sequence [image; caption]: the image part has one length, so batch padding is at the end
        h = mx.concatenate([x, cap], axis=1)
        span = TextSpan(slice(0, layout.n_img), slice(layout.img_len, None))  # real image tokens -> caption

        def layers(h, start, stop=None):
            for i, block in list(enumerate(self.layers))[start:stop]:
                h = block(h, layout.rope, layout.mask, c, span)
                keep(f"layers.{i}", h)
            return h

        if cache is None:
            h = layers(h, 0)
        else:  # the joint sequence is the one stream the rule watches (diffusers' `hidden_states` of a layer)
            none = h[:, :0]
            h, _ = cache(h, none, lambda h, _: (layers(h, 0, 1), none), lambda h, _: (layers(h, 1), none))
        out = self.final_layer(h[:, : layout.n_img], c)  # the final layer is per token: image tokens only
        return unpatchify(out, H, W, p)

    def _check(self, latents, t, cap_feats) -> tuple[int, int, int]:
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be (B, H, W, {cfg.in_channels}), got {tuple(latents.shape)}")
        B, H, W, _ = latents.shape
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {cfg.patch_size}")
        if cap_feats.ndim != 3 or cap_feats.shape[0] != B or cap_feats.shape[-1] != cfg.cap_feat_dim:
            raise ValueError(f"cap_feats must be ({B}, L, {cfg.cap_feat_dim}), got {tuple(cap_feats.shape)}")
        if t.shape != (B,):
            raise ValueError(f"t must be ({B},), got {tuple(t.shape)}")
        return B, H, W
