"""The FLUX.2 transformer: what FLUX.2 changes against FLUX.1's MM-DiT (models/mmdit.py).

The composition is FLUX.1's (double-stream blocks, then single-stream blocks over [text; image],
adaLN modulation, QK-RMSNorm, axial RoPE, joint attention, the same final layer). What differs:

- modulation is computed once per forward from the timestep embedding and *shared*: one
  Linear(SiLU(c)) for the image stream of every double block, one for the text stream, one for
  every single block (FT:1176-1179, 1291-1293); the blocks themselves have none;
- the conditioning is the timestep (and, for [dev]-style models, guidance) only: no pooled text
  vector; text is Qwen3's hidden states, text first in the joint sequence as in FLUX.1;
- the MLPs are SwiGLU with ratio 3 (layers/mlp.py); the single block's fused projection is
  [q | k | v | gate | up] and its output projection reads [attention | MLP];
- no Linear has a bias (layers/linear.py);
- RoPE has four axes (t, h, w, l) of 32 channels each, theta 2000: image tokens at (0, row, col, 0),
  text tokens at (0, 0, 0, l) (layers/positions.py); tables in float64 as diffusers builds them;
- q/k norms are torch.nn.RMSNorm, which rounds once in bf16 (layers/norms.py);
- the timestep is multiplied by 1000 in the model's dtype (bf16: 967.4 -> 968) before the
  float32 sinusoid (FT:1284).

Parameter names follow BFL's original checkpoint (`double_stream_modulation_img.lin.weight`,
`double_blocks.0.img_mlp.0.weight`, ...). The final layer keeps BFL's (shift, scale) order;
diffusers' `norm_out` stores (scale, shift) and its table swaps the halves.
"""

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..layers.attention import attention, split_heads
from ..layers.embeddings import MLPEmbedder, timestep_embedding
from ..layers.linear import without_biases
from ..layers.mlp import swiglu, swiglu_mlp
from ..layers.modulation import Modulation, layer_norm, modulate
from ..layers.norms import QKNormRoundedOnce
from ..layers.positions import flux2_image_ids, flux2_text_ids
from ..layers.rope import AxialRoPE
from .mmdit import LastLayer, SelfAttention, double_stream, joint_span


@dataclass(frozen=True)
class Flux2Config:
    in_channels: int = 128  # 32 VAE channels x 2 x 2, packed channel-major (c*4 + 2*dy + dx)
    out_channels: int | None = None  # defaults to in_channels
    num_heads: int = 24
    head_dim: int = 128
    depth_double: int = 5
    depth_single: int = 20
    mlp_ratio: float = 3.0
    context_dim: int = 7680  # Qwen3 hidden states of layers 9, 18, 27 concatenated: 3 x 2560
    guidance_embed: bool = False  # FLUX.2 [dev]'s distilled guidance input; klein has none
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # RoPE channels per id axis (t, h, w, l)
    theta: float = 2000.0
    eps: float = 1e-6  # the adaLN LayerNorms and the q/k RMSNorms

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def __post_init__(self):
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to head_dim {self.head_dim}")
        if self.depth_double + self.depth_single == 0:
            raise ValueError("a FLUX.2 transformer needs at least one block")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "Flux2Config":
        """From a diffusers Flux2Transformer2DModel config.json (absent keys: its defaults, FT:1141-1158)."""
        if cfg.get("patch_size", 1) != 1:
            raise ValueError(f"patch_size {cfg['patch_size']}: FLUX.2 packs 2x2 patches before the model (patch_size 1)")
        return cls(
            in_channels=cfg.get("in_channels", 128),
            out_channels=cfg.get("out_channels"),
            num_heads=cfg.get("num_attention_heads", 48),
            head_dim=cfg.get("attention_head_dim", 128),
            depth_double=cfg.get("num_layers", 8),
            depth_single=cfg.get("num_single_layers", 48),
            mlp_ratio=cfg.get("mlp_ratio", 3.0),
            context_dim=cfg.get("joint_attention_dim", 15360),
            guidance_embed=cfg.get("guidance_embeds", True),
            axes_dim=tuple(cfg.get("axes_dims_rope", (32, 32, 32, 32))),
            theta=float(cfg.get("rope_theta", 2000)),
            eps=cfg.get("eps", 1e-6),
        )


PRESETS = {
    # Black Forest Labs, FLUX.2 [klein] 4B (Apache-2.0) and 9B (non-commercial licence). The block
    # counts and widths are as reported for the released models (unverified here: read the
    # repo's transformer/config.json). Widths follow from the text encoders: 3 x 2560 (Qwen3-4B)
    # and 3 x 4096 (Qwen3-8B). With them the models have 3,875,544,576 and 9,078,581,248 parameters.
    "flux2-klein-4b": Flux2Config(num_heads=24, depth_double=5, depth_single=20, context_dim=7680),
    "flux2-klein-9b": Flux2Config(num_heads=32, depth_double=8, depth_single=24, context_dim=12288),
    # FLUX.2 [dev]: diffusers' Flux2Transformer2DModel defaults (guidance-distilled, Mistral text)
    "flux2-dev": Flux2Config(num_heads=48, depth_double=8, depth_single=48, context_dim=15360, guidance_embed=True),
}


def preset(name: str, **overrides) -> Flux2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown FLUX.2 preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class Flux2SelfAttention(SelfAttention):
    """FLUX.1's per-stream attention projections, with torch.nn.RMSNorm's rounding in the q/k norms."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__(dim, num_heads)
        self.norm = QKNormRoundedOnce(dim // num_heads, eps)


class DoubleStreamBlock(nn.Module):
    """FLUX.1's double block without its own modulation: (shift, scale, gate) x 2 per stream come in."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.eps = eps
        self.img_attn, self.txt_attn = Flux2SelfAttention(dim, num_heads, eps), Flux2SelfAttention(dim, num_heads, eps)
        hidden = int(dim * mlp_ratio)
        self.img_mlp, self.txt_mlp = swiglu_mlp(dim, hidden), swiglu_mlp(dim, hidden)

    def __call__(self, img, txt, img_mod, txt_mod, rope):
        """img (B, L_img, D), txt (B, L_txt, D); *_mod: 6 x (B, D); rope: (cos, sin) for [txt; img]."""
        return double_stream(self, img, txt, img_mod, txt_mod, rope, self.eps)


class SingleStreamBlock(nn.Module):
    """Parallel attention and SwiGLU MLP on one sequence: linear1 gives [q | k | v | gate | up],
    linear2 maps [attention out | SiLU(gate) * up] back to the width; one gate for both."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.num_heads, self.eps, self.mlp_hidden = num_heads, eps, int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNormRoundedOnce(dim // num_heads, eps)

    def __call__(self, x: mx.array, mod, rope, n_txt: int | None = None) -> mx.array:
        """x (B, L, D) = [text; image]; mod: (shift, scale, gate) each (B, D); n_txt: the text
        tokens (for attention maps) -> (B, L, D)."""
        shift, scale, gate = mod
        h = self.linear1(modulate(layer_norm(x, self.eps), shift, scale))
        qkv, mlp_in = h[..., : 3 * x.shape[-1]], h[..., 3 * x.shape[-1] :]
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        span = None if n_txt is None else joint_span(n_txt)
        out = mx.concatenate([attention(q, k, v, rope, span), swiglu(mlp_in)], axis=-1)
        return x + gate[:, None] * self.linear2(out)


class Flux2Transformer(nn.Module):
    def __init__(self, config: Flux2Config):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, D)
        self.txt_in = nn.Linear(cfg.context_dim, D)
        self.time_in = MLPEmbedder(256, D)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(256, D)
        # shared modulation: (shift, scale, gate) for attention and MLP of each stream; 3 for single blocks
        self.double_stream_modulation_img = Modulation(D, 6)
        self.double_stream_modulation_txt = Modulation(D, 6)
        self.single_stream_modulation = Modulation(D, 3)
        self.pe_embedder = AxialRoPE(cfg.axes_dim, cfg.theta)
        block = (D, cfg.num_heads, cfg.mlp_ratio, cfg.eps)
        self.double_blocks = [DoubleStreamBlock(*block) for _ in range(cfg.depth_double)]
        self.single_blocks = [SingleStreamBlock(*block) for _ in range(cfg.depth_single)]
        self.final_layer = LastLayer(D, cfg.out_channels or cfg.in_channels)
        without_biases(self)  # every Linear of FLUX.2 is bias-free

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype: that of the (never quantized) input projection."""
        return self.img_in.weight.dtype

    @staticmethod
    def position_ids(grid_h: int, grid_w: int, n_txt: int) -> tuple[mx.array, mx.array]:
        """(txt_ids, img_ids): (0, 0, 0, l) and (0, row, col, 0)."""
        return flux2_text_ids(n_txt), flux2_image_ids(grid_h, grid_w)

    def conditioning(self, timesteps: mx.array, guidance: mx.array | None) -> mx.array:
        """c = time_in(t) [+ guidance_in(g)]: (B, D). t·1000 is rounded to the model dtype first
        (FT:1284); the sinusoid is float32 and then cast to the model dtype (FT:1025)."""
        dtype = self.dtype
        embed = lambda s: timestep_embedding(s.astype(dtype) * 1000, time_factor=1.0).astype(dtype)  # noqa: E731
        c = self.time_in(embed(timesteps))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this model was distilled with guidance (FLUX.2 [dev] style): pass guidance=")
            c = c + self.guidance_in(embed(guidance))
        return c

    def __call__(
        self,
        img: mx.array,  # (B, L_img, in_channels) packed latents
        img_ids,  # (L_img, 4)
        txt: mx.array,  # (B, L_txt, context_dim) Qwen3 hidden states
        txt_ids,  # (L_txt, 4)
        timesteps: mx.array,  # (B,) in [0, 1]; 1 is pure noise
        guidance: mx.array | None = None,  # (B,) [dev]-style models only
        intermediates: list | None = None,  # if given, receives (img, txt) per double and x per single block
        cache=None,  # a step_cache.FirstBlockCache: may skip all blocks but the first
    ) -> mx.array:  # (B, L_img, out_channels) predicted velocity noise - x0
        cfg, dtype = self.config, self.dtype
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img must be (B, L, {cfg.in_channels}) packed latents, got {tuple(img.shape)}")
        if txt.ndim != 3 or txt.shape[-1] != cfg.context_dim or txt.shape[0] != img.shape[0]:
            raise ValueError(f"txt must be ({img.shape[0]}, L, {cfg.context_dim}), got {tuple(txt.shape)}")
        n_axes = len(cfg.axes_dim)
        for name, ids, n in (("img_ids", img_ids, img.shape[1]), ("txt_ids", txt_ids, txt.shape[1])):
            if tuple(np.shape(ids)) != (n, n_axes):
                raise ValueError(f"{name} must be ({n}, {n_axes}), shared by the batch; got {tuple(np.shape(ids))}")
        timesteps = mx.array(timesteps).reshape(-1)
        if timesteps.shape[0] != img.shape[0]:
            raise ValueError(f"timesteps must be ({img.shape[0]},), got {tuple(timesteps.shape)}")

        c = self.conditioning(timesteps, guidance)
        img_mod = self.double_stream_modulation_img(c)
        txt_mod = self.double_stream_modulation_txt(c)
        single_mod = self.single_stream_modulation(c)
        rope = self.pe_embedder(np.concatenate([np.asarray(txt_ids), np.asarray(img_ids)], axis=0))  # [text; image]

        # the model computes in its dtype (the pipeline casts its latents so, FP:845)
        img, txt = self.img_in(img.astype(dtype)), self.txt_in(txt.astype(dtype))
        mods = (img_mod, txt_mod, single_mod)
        if cache is None:
            img, txt = self.blocks(img, txt, mods, rope, intermediates=intermediates)
        else:
            img, txt = cache(img, txt, lambda i, t: self.blocks(i, t, mods, rope, 0, 1),
                             lambda i, t: self.blocks(i, t, mods, rope, 1))
        return self.final_layer(img, c)

    def blocks(self, img, txt, mods, rope, start: int = 0, stop: int | None = None, intermediates=None):
        """Blocks start..stop-1 of [double blocks, single blocks] -> (img, txt); the single blocks see
        [txt; img] joined once before and split once after them (a step cache cuts anywhere)."""
        img_mod, txt_mod, single_mod = mods
        order = [*self.double_blocks, *self.single_blocks][start:stop]
        n_double = max(0, len(self.double_blocks) - start)
        for block in order[:n_double]:
            img, txt = block(img, txt, img_mod, txt_mod, rope)
            if intermediates is not None:
                intermediates.append((img, txt))
        if len(order) > n_double:
            x = mx.concatenate([txt, img], axis=1)
            for block in order[n_double:]:
                x = block(x, single_mod, rope, txt.shape[1])
                if intermediates is not None:
                    intermediates.append(x)
            txt, img = x[:, : txt.shape[1]], x[:, txt.shape[1] :]
        return img, txt
