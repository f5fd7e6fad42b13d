"""Stable Diffusion 3 / 3.5's MM-DiT (Esser et al., 2024): the dual-stream design, double blocks only.

Text (CLIP-L + CLIP-G + T5, 333 tokens of width 4096) and image (2x2 latent patches) are two
streams joined in every block's attention (mmdit.double_stream, over [image; text] as SD3 orders
it). What SD3 has of its own, beside FLUX's blocks:

- an **absolute** 2-D position table (no RoPE): a fixed sin-cos vector per patch position,
  added to the image tokens once, at the input. The checkpoint stores it for a square grid of
  `pos_embed_max_size` patches a side, and a smaller image takes its centre (`crop_positions`);
  an image wider than the table has no positions at all, so there is a largest size.
- the conditioning vector c = t_embedder(sinusoid(σ·1000)) + y_embedder(pooled CLIP-L ⊕ CLIP-G).
- the last block's text stream only feeds the attention (`context_pre_only`): its modulation is
  (shift, scale), it has no output projection and no MLP, and its output is dropped.
- SD3.5: optional QK RMSNorm; SD3.5 Medium's MMDiT-X blocks add a second, image-only self-
  attention between the joint attention and the MLP, modulated by 3 more chunks (9 in all) read
  off the same LayerNorm of the image stream.
- skip-layer guidance runs the model with some blocks left out (`skip_layers`): they pass both
  streams through unchanged (diffusers ST:305-321).

Parameter names are our MM-DiT's (`double_blocks.{i}.img_attn.qkv`), so FLUX's diffusers rules
map the joint attention (checkpoints/sd3.py).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..layers.attention import attention
from ..layers.embeddings import MLPEmbedder, pack_latents, timestep_embedding, unpatchify
from ..layers.modulation import Modulation, modulate
from .mmdit import LastLayer, SelfAttention, double_stream, mlp

VAE_FACTOR = 8  # the SD3 VAE's downscale: pixels per latent


@dataclass(frozen=True)
class SD3Config:
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    num_heads: int = 24
    head_dim: int = 64
    depth: int = 24
    context_dim: int = 4096  # T5-XXL width; CLIP states are zero-padded to it
    pooled_dim: int = 2048  # CLIP-L pooled (768) ⊕ CLIP-G pooled (1280)
    pos_embed_max_size: int = 384  # the stored table's side, in patches
    sample_size: int = 128  # the training latent side: the table's frequencies are scaled to it
    qk_norm: bool = True
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X blocks

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def max_image_size(self) -> int:
        """The largest image side in pixels the position table covers."""
        return self.pos_embed_max_size * self.patch_size * VAE_FACTOR

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "SD3Config":
        """From a diffusers SD3Transformer2DModel config.json."""
        heads, head_dim = cfg.get("num_attention_heads", 18), cfg.get("attention_head_dim", 64)
        caption = cfg.get("caption_projection_dim", 1152)
        if caption != heads * head_dim:
            raise ValueError(f"transformer config: caption_projection_dim {caption} != num_attention_heads x "
                             f"attention_head_dim {heads * head_dim} (no published SD3 differs)")
        if cfg.get("qk_norm") not in (None, "rms_norm"):
            raise ValueError(f"transformer config: qk_norm {cfg['qk_norm']!r} is not supported (None or 'rms_norm')")
        return cls(
            in_channels=cfg.get("in_channels", 16), out_channels=cfg.get("out_channels") or cfg.get("in_channels", 16),
            patch_size=cfg.get("patch_size", 2), num_heads=heads, head_dim=head_dim, depth=cfg.get("num_layers", 18),
            context_dim=cfg.get("joint_attention_dim", 4096), pooled_dim=cfg.get("pooled_projection_dim", 2048),
            pos_embed_max_size=cfg.get("pos_embed_max_size", 96), sample_size=cfg.get("sample_size", 128),
            qk_norm=cfg.get("qk_norm") == "rms_norm",
            dual_attention_layers=tuple(cfg.get("dual_attention_layers", ())),
        )


# stabilityai/stable-diffusion-3.5-large and -medium, transformer/config.json as diffusers' tests and
# docs give them ([unverified] offline against the gated repos): head_dim 64, joint 4096, pooled 2048
SD35_LARGE = SD3Config(num_heads=38, depth=38, pos_embed_max_size=192)  # 8.06 B + the 89.7 M table
SD35_MEDIUM = SD3Config(num_heads=24, depth=24, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))  # 2.24 B + 226 M


def crop_positions(table: mx.array, max_size: int, h: int, w: int) -> mx.array:
    """The absolute position embedding of an h x w patch grid: the centre of the stored
    (max_size² , D) table, rows top = (max - h) // 2 and columns left = (max - w) // 2 on
    (diffusers EMB:336-360). -> (h w, D), row-major like the tokens.

    What the table holds (diffusers builds it with get_2d_sincos_pos_embed(D, max_size,
    base_size=sample_size / patch), which layers/positions.sincos_2d_interpolated reproduces):
    the first D/2 channels are a 1-D sin-cos code of the patch's column, the other D/2 of its row,
    at positions j / (max_size / base_size): the 64 patches a side of a 1024-pixel image span
    64 · 64/192 = 21.3 units about the table's centre in Large, 64 · 64/384 = 10.7 in Medium.
    Unlike RoPE, the code is *added* to the tokens, before the first block: attention then sees
    positions only through what the projections make of them, and an image larger than the
    table has nowhere to go."""
    if h > max_size or w > max_size:
        raise ValueError(f"the latent grid is {h}x{w} patches, but the position table is {max_size}x{max_size}: "
                         f"images up to {max_size * 2 * VAE_FACTOR} pixels a side")
    top, left = (max_size - h) // 2, (max_size - w) // 2
    return table.reshape(max_size, max_size, -1)[top : top + h, left : left + w].reshape(h * w, -1)


class NoQKNorm(nn.Module):
    """SD3.0's attention: no normalisation of q and k."""

    def __call__(self, q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
        return q, k


def _attention(dim: int, heads: int, qk_norm: bool) -> SelfAttention:
    attn = SelfAttention(dim, heads)
    if not qk_norm:
        attn.norm = NoQKNorm()
    return attn


class JointBlock(nn.Module):
    """One SD3 block: FLUX's double block (shared body) plus SD3's pre-only text stream and the
    MMDiT-X second attention."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, dual: bool, context_pre_only: bool):
        super().__init__()
        self.dual, self.context_pre_only = dual, context_pre_only
        self.img_mod = Modulation(dim, 9 if dual else 6)
        self.img_attn, self.txt_attn = _attention(dim, heads, qk_norm), _attention(dim, heads, qk_norm)
        self.img_mlp = mlp(dim, 4.0)
        if context_pre_only:  # (shift, scale) only; no output projection, no MLP (diffusers ATT:607-640)
            self.txt_mod_pre_only = Modulation(dim, 2)
            self.txt_attn.pop("proj")
        else:
            self.txt_mod = Modulation(dim, 6)
            self.txt_mlp = mlp(dim, 4.0)
        if dual:
            self.img_attn2 = _attention(dim, heads, qk_norm)

    def second_attention(self, img: mx.array, img_normed: mx.array, shift, scale, gate) -> mx.array:
        """MMDiT-X (SD35AdaLayerNormZeroX, NRM:96-127; ATT:647-716): image-only self-attention on
        the block's own LN(img), modulated by its 7th-9th chunks, added before the MLP."""
        q, k, v = self.img_attn2.qkv_heads(modulate(img_normed, shift, scale))
        return img + gate[:, None] * self.img_attn2.proj(attention(q, k, v))

    def __call__(self, img: mx.array, txt: mx.array, c: mx.array):
        """img (B, N, D), txt (B, L, D), c (B, D) -> (img, txt or None after a pre-only block)."""
        img_mod = self.img_mod(c)
        txt_mod = self.txt_mod_pre_only(c) if self.context_pre_only else self.txt_mod(c)
        extra = (lambda x, normed: self.second_attention(x, normed, *img_mod[6:])) if self.dual else None
        return double_stream(self, img, txt, img_mod[:6], txt_mod, None, text_first=False, after_attention=extra)


class SD3Transformer(nn.Module):
    unsupported_dtypes = {mx.float16: "its residual stream overflows float16 (max 65504); use bfloat16 or float32"}

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = cfg = config
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Linear(cfg.in_channels * p * p, D)  # the 2x2 stride-2 conv, on packed patches
        # (1, max², D), filled from the checkpoint; lazy zeros until then (226 M values for Medium)
        self.pos_embed = mx.zeros((1, cfg.pos_embed_max_size ** 2, D))
        self.t_embedder = MLPEmbedder(256, D)
        self.y_embedder = MLPEmbedder(cfg.pooled_dim, D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        self.double_blocks = [
            JointBlock(D, cfg.num_heads, cfg.qk_norm, i in cfg.dual_attention_layers, i == cfg.depth - 1)
            for i in range(cfg.depth)
        ]
        self.final_layer = LastLayer(D, p * p * cfg.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        return next(v.dtype for _, v in tree_flatten(self.context_embedder.parameters()) if mx.issubdtype(v.dtype, mx.floating))

    def conditioning(self, timesteps: mx.array, pooled: mx.array) -> mx.array:
        """c = t_embedder(sinusoid(1000 t)) + y_embedder(pooled), (B, D) in the model's dtype. The
        sinusoid is taken of float32 σ·1000 (the scheduler's timestep, which SD3's pipeline passes
        undivided and uncast, SP:1069) and cast to the weights' dtype (EMB:1360)."""
        dtype = self.dtype
        c = self.t_embedder(timestep_embedding(timesteps).astype(dtype))
        return c + self.y_embedder(pooled.astype(dtype))

    def __call__(
        self,
        x: mx.array,  # (B, h, w, C) latents, channels last
        txt: mx.array,  # (B, L, context_dim) CLIP ⊕ T5 states
        timesteps: mx.array,  # (B,) σ in [0, 1]; 1 is pure noise
        pooled: mx.array,  # (B, pooled_dim)
        skip_layers: tuple[int, ...] = (),  # blocks left out (skip-layer guidance)
        cache=None,  # a step_cache.FirstBlockCache: may skip all blocks but the first
    ) -> mx.array:  # (B, h, w, out_channels) predicted velocity noise - x0
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be (B, h, w, {cfg.in_channels}) latents, got {tuple(x.shape)}")
        if txt.ndim != 3 or txt.shape[-1] != cfg.context_dim:
            raise ValueError(f"txt must be (B, L, {cfg.context_dim}), got {tuple(txt.shape)}")
        B, h, w, _ = x.shape
        p = cfg.patch_size
        dtype = self.dtype
        pos = crop_positions(self.pos_embed, cfg.pos_embed_max_size, h // p, w // p)
        img = self.x_embedder(pack_latents(x.astype(dtype), p)) + pos.astype(dtype)
        c = self.conditioning(timesteps, pooled)
        txt = self.context_embedder(txt.astype(dtype))
        order = [block for i, block in enumerate(self.double_blocks) if i not in skip_layers]

        def blocks(img, txt, start=0, stop=None):
            for block in order[start:stop]:
                img, out = block(img, txt, c)
                txt = txt if out is None else out  # the pre-only last block ends the text stream: kept, unused
            return img, txt

        if cache is None:
            img, _ = blocks(img, txt)
        else:  # First-Block Cache (diffusers' hook cannot run on SD3; the same rule, step_cache.py)
            img, _ = cache(img, txt, lambda i, t: blocks(i, t, 0, 1), lambda i, t: blocks(i, t, 1))
        return unpatchify(self.final_layer(img, c), h, w, p)
