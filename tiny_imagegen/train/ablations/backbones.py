"""The denoisers of the tiny-shapes ablations: one interface over the MM-DiT, the DiT and the U-Net.

Every variant is the shipped recipe's text encoder (a 2-layer T5 trained from scratch, pooled by
its masked mean; tiny_shapes.py) and a *backbone* that maps

    x_t (B, h, w, C) latents, t (B,) in [0, 1], T5 states (B, L, D), pooled text (B, D)
        -> the prediction (B, h, w, C): the velocity (flow matching) or the noise (DDPM)

so that one training loss, one sampler per objective and one evaluation serve every row. t is
the noise level on [0, 1] for both objectives (a DDPM step k enters as k / 1000); each backbone
scales it as its timestep embedding expects (the DiT's and the U-Net's take DDPM steps 0..999).

    MMDiTBackbone   models/mmdit.py as shipped (hybrid: 2 double + 2 single blocks, width 128), the
                    position scheme swappable: RoPE (mixed or axial) on centred or corner-origin
                    image ids, or an absolute embedding added to the image tokens with no RoPE at
                    all (SD3's design): learned, or 2-D sin-cos. Text ids lie on the diagonal just
                    beyond the image grid in every RoPE variant (MSRoPE), so a row changes one thing.
    DiTBackbone     models/dit.py: adaLN-Zero on the pooled vector alone, in-context or
                    cross-attention to the T5 states; the DiT paper's initialisation.
    UNetBackbone    models/unet.py (SD 1.5's blocks at tiny width): cross-attention to the T5
                    states; the pooled vector is unused (as in SD 1.5).

At other canvas sizes (the 128x128 extrapolation rows) RoPE simply extends its ids over the
larger grid; the learned table is resized bilinearly (ViT practice) and the sin-cos table is
stretched over the trained grid (DiT's rule, layers/positions.sincos_2d_interpolated).
"""

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ...layers.embeddings import pack_latents, unpack_latents
from ...layers.positions import (
    LearnedPositionEmbedding, centred_image_ids, diagonal_text_ids, image_grid, sincos_2d_interpolated,
    text_start_after,
)
from ...models.dit import DiT, DiTConfig, initialize_weights
from ...models.mmdit import MMDiT, MMDiTConfig
from ...models.t5 import T5Encoder
from ...models.unet import UNet2DConditionModel, UNetConfig
from ...conditioning.t5_clip import masked_mean
from ..tiny_shapes import PATCH, init_for_training

POSITIONS = ("rope-centred", "rope-corner", "ape-learned", "ape-sincos")


# ---- backbone configs: data, so that a results record can store them ------------------------------


@dataclass(frozen=True)
class MMDiTBackboneConfig:
    mmdit: MMDiTConfig
    positions: str = "rope-centred"  # one of POSITIONS
    grid: int = 8  # trained token grid side (16x16 latents, 2x2 patches); the APE tables' size

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown position scheme {self.positions!r}: use one of {POSITIONS}")


@dataclass(frozen=True)
class DiTBackboneConfig:
    dit: DiTConfig


@dataclass(frozen=True)
class UNetBackboneConfig:
    unet: UNetConfig


# ---- MM-DiT with a choice of position encoding ------------------------------------------------------


@lru_cache(maxsize=32)
def rope_ids(positions: str, grid_h: int, grid_w: int, n_txt: int) -> tuple[mx.array, mx.array]:
    """(txt_ids (L, 2), img_ids (H*W, 2)), float32: image (row, col) from the grid centre or
    from its top-left corner, text on the diagonal beyond the grid."""
    if positions == "rope-centred":
        return diagonal_text_ids(n_txt, 2, text_start_after(grid_h, grid_w)), centred_image_ids(grid_h, grid_w)
    rows, cols = image_grid(grid_h, grid_w)
    img = mx.stack([rows, cols], axis=-1).astype(mx.float32)
    return diagonal_text_ids(n_txt, 2, max(grid_h, grid_w)), img


class NoRoPE(nn.Module):
    """Stands in for the MM-DiT's RoPE table when positions are absolute: attention without rotation."""

    def __call__(self, ids) -> None:
        return None


@lru_cache(maxsize=8)
def _sincos_table(dim: int, side: int, grid: int) -> mx.array:
    return sincos_2d_interpolated(dim, side, side, base_size=grid)  # (side², dim), built once per size


class AbsolutePositionIn(nn.Module):
    """The MM-DiT's image input projection followed by an absolute position embedding (ViT / SD3)."""

    def __init__(self, proj: nn.Linear, kind: str, grid: int):
        super().__init__()
        self.proj, self.kind, self.grid = proj, kind, grid
        if kind == "ape-learned":
            self.pos_embed = LearnedPositionEmbedding(grid * grid, proj.weight.shape[0])

    def table(self, side: int) -> mx.array:
        """(side², D) embedding of a side x side token grid."""
        D = self.proj.weight.shape[0]
        if self.kind == "ape-sincos":
            return _sincos_table(D, side, self.grid)
        table = self.pos_embed.weight
        if side == self.grid:
            return table
        grid = table.reshape(1, self.grid, self.grid, D)
        return nn.Upsample(scale_factor=side / self.grid, mode="linear")(grid).reshape(side * side, D)

    def __call__(self, x: mx.array) -> mx.array:
        """x (B, L, C) packed latents of a square grid -> (B, L, D)."""
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"absolute positions need a square token grid, got {x.shape[1]} tokens")
        return self.proj(x) + self.table(side).astype(x.dtype)


class MMDiTBackbone(nn.Module):
    def __init__(self, config: MMDiTBackboneConfig):
        super().__init__()
        self.positions = config.positions
        self.transformer = MMDiT(config.mmdit)
        init_for_training(self)  # adaLN-Zero, as the shipped model starts (it reads .transformer)
        if config.positions.startswith("ape"):
            self.transformer.pe_embedder = NoRoPE()
            self.transformer.img_in = AbsolutePositionIn(self.transformer.img_in, config.positions, config.grid)

    def __call__(self, x: mx.array, t: mx.array, txt: mx.array, pooled: mx.array) -> mx.array:
        B, h, w, _ = x.shape
        scheme = "rope-centred" if self.positions.startswith("ape") else self.positions  # ids unused by APE
        txt_ids, img_ids = rope_ids(scheme, h // PATCH, w // PATCH, txt.shape[1])
        v = self.transformer(pack_latents(x, PATCH), img_ids, txt, txt_ids, t, pooled)
        return unpack_latents(v, h, w, PATCH)


# ---- DiT and U-Net -------------------------------------------------------------------------------


class DiTBackbone(nn.Module):
    def __init__(self, config: DiTBackboneConfig, seed: int = 0):
        super().__init__()
        self.dit = initialize_weights(DiT(config.dit), seed)

    def __call__(self, x: mx.array, t: mx.array, txt: mx.array, pooled: mx.array) -> mx.array:
        context = txt if self.dit.config.context_dim is not None else None
        return self.dit(x, 1000 * t, pooled, context)  # the DiT embeds DDPM steps 0..999


class UNetBackbone(nn.Module):
    def __init__(self, config: UNetBackboneConfig):
        super().__init__()
        self.unet = UNet2DConditionModel(config.unet)

    def __call__(self, x: mx.array, t: mx.array, txt: mx.array, pooled: mx.array) -> mx.array:
        return self.unet(x, 1000 * t, txt)


def build_backbone(config, seed: int = 0) -> nn.Module:
    if isinstance(config, MMDiTBackboneConfig):
        return MMDiTBackbone(config)
    if isinstance(config, DiTBackboneConfig):
        return DiTBackbone(config, seed)
    if isinstance(config, UNetBackboneConfig):
        return UNetBackbone(config)
    raise TypeError(f"not a backbone config: {type(config).__name__}")


# ---- the denoiser: T5 + backbone, trained together -------------------------------------------------


class AblationDenoiser(nn.Module):
    def __init__(self, text_encoder: T5Encoder, backbone: nn.Module):
        super().__init__()
        self.text_encoder, self.backbone = text_encoder, backbone

    def encode_text(self, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        """ids, mask (B, L) -> T5 states (B, L, D) and their masked mean (B, D), as the shipped model."""
        h = self.text_encoder(ids)
        return h, masked_mean(h, mask)

    def __call__(self, x: mx.array, t: mx.array, txt: mx.array, pooled: mx.array) -> mx.array:
        return self.backbone(x, t, txt, pooled)


def count_parameters(module: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(module.parameters()))

