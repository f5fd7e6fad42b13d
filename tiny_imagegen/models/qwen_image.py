"""The Qwen-Image transformer: a dual-stream MM-DiT with MSRoPE (Qwen Team, 2025).

Every block is a double-stream block: text and image keep their own adaLN modulation, q/k/v
projections, QK-RMSNorms and MLPs, and meet only in one joint attention over [text; image]; there
are no single-stream blocks (FLUX.1 is hybrid, Z-Image single-stream). The block body is FLUX.1's
(models/mmdit.py `double_stream`, the same maths down to the (shift, scale, gate) order and the
GELU-tanh MLP of ratio 4). What is Qwen-Image's own:

- text comes in through an RMSNorm (`txt_norm`) before its projection: Qwen2.5-VL's last hidden
  state, padded per batch, with a key mask so that no token attends to padding (QT:144-171);
- the conditioning is the timestep alone (no pooled text, no guidance): the sinusoid of
  (t · ω) · 1000 in float32, cast to the model dtype, then Linear-SiLU-Linear (QT:178-196);
- MSRoPE, the positions of layers/positions.py `msrope_*_ids`: *centred coordinates* for image
  tokens (frame, row, col) and *diagonal text positions* just beyond the image, on three axes of
  16/56/56 channels, theta 10000, tables in float32 as the reference builds them (layers/rope.py
  `axial_rope_fp32`);
- every Linear has a bias, the final layer is the continuous adaLN (diffusers stores its
  modulation as (scale, shift); the key table swaps it into our (shift, scale)).

Parameter names are our MM-DiT's (`double_blocks.{i}.img_attn.qkv`), so checkpoints/qwen_image.py
maps diffusers' `transformer_blocks.{i}.attn.to_q/k/v` onto them as it does for FLUX.1.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..layers.attention import RMSNorm
from ..layers.embeddings import MLPEmbedder, timestep_embedding
from ..layers.positions import msrope_image_ids, msrope_text_ids
from ..layers.rope import axial_rope_fp32
from .mmdit import DoubleStreamBlock, LastLayer, double_stream


@dataclass(frozen=True)
class QwenImageConfig:
    patch_size: int = 2
    in_channels: int = 64  # packed latent: 16 channels x 2 x 2, channel-major (c*4 + 2*dy + dx)
    out_channels: int = 16  # per latent pixel: the output token is patch² x out_channels
    num_heads: int = 24
    head_dim: int = 128
    depth: int = 60
    context_dim: int = 3584  # Qwen2.5-VL-7B's hidden size
    axes_dim: tuple[int, ...] = (16, 56, 56)  # MSRoPE channels for (frame, row, col)
    theta: float = 10_000.0
    mlp_ratio: float = 4.0

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def __post_init__(self):
        if len(self.axes_dim) != 3 or sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must be 3 axes summing to head_dim {self.head_dim}")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "QwenImageConfig":
        """From a diffusers QwenImageTransformer2DModel config.json (absent keys: its defaults, QT:816-831)."""
        if cfg.get("guidance_embeds"):
            # diffusers 0.42.1 cannot run such a model either (QT:944 passes 4 arguments to a 3-argument
            # embedder); no published Qwen-Image checkpoint has one
            raise ValueError("transformer config: guidance_embeds=true is not a Qwen-Image model we can run")
        for key in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
            if cfg.get(key):
                raise ValueError(f"transformer config: {key}=true (Qwen-Image-Edit/Layered) is not supported")
        return cls(
            patch_size=cfg.get("patch_size", 2),
            in_channels=cfg.get("in_channels", 64),
            out_channels=cfg.get("out_channels") or cfg.get("in_channels", 64),
            num_heads=cfg.get("num_attention_heads", 24),
            head_dim=cfg.get("attention_head_dim", 128),
            depth=cfg.get("num_layers", 60),
            context_dim=cfg.get("joint_attention_dim", 3584),
            axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
        )


class QwenImageTransformer(nn.Module):
    # as FLUX.1's: the residual stream outgrows float16 (diffusers clips it to +-65504 per block)
    unsupported_dtypes = {mx.float16: "its residual stream overflows float16 (max 65504); use bfloat16 or float32"}

    def __init__(self, config: QwenImageConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, D)
        self.txt_norm = RMSNorm(cfg.context_dim, eps=1e-6)
        self.txt_in = nn.Linear(cfg.context_dim, D)
        self.time_in = MLPEmbedder(256, D)
        self.double_blocks = [DoubleStreamBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)]
        self.final_layer = LastLayer(D, cfg.patch_size**2 * cfg.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype: that of the (never quantized) text norm's scale."""
        return self.txt_norm.scale.dtype

    def rope_table(self, grid_h: int, grid_w: int, n_txt: int) -> tuple[mx.array, mx.array]:
        """MSRoPE (cos, sin) for [text; image] on a grid_h x grid_w token grid with n_txt (padded)
        text tokens, float32. Depends on the sizes only: build it once per generation."""
        ids = mx.concatenate([msrope_text_ids(n_txt, grid_h, grid_w), msrope_image_ids(grid_h, grid_w)])
        return axial_rope_fp32(ids, self.config.axes_dim, self.config.theta)

    def conditioning(self, timesteps: mx.array) -> mx.array:
        """c = time_in(sinusoid(t)): (B, D). t is rounded to the model dtype first (QT:922) and the
        sinusoid, (t·ω)·1000 in float32, cast to it (QT:190)."""
        dtype = self.dtype
        emb = timestep_embedding(timesteps.astype(dtype), time_factor=1.0, arg_scale=1000.0)
        return self.time_in(emb.astype(dtype))

    def __call__(
        self,
        img: mx.array,  # (B, grid_h * grid_w, in_channels) packed latents
        txt: mx.array,  # (B, L_txt, context_dim) Qwen2.5-VL hidden states, zero-padded
        timesteps: mx.array,  # (B,) in [0, 1]; 1 is pure noise (the pipeline's t / 1000)
        grid: tuple[int, int],  # (grid_h, grid_w): the packed token grid
        txt_mask: mx.array | None = None,  # (B, L_txt) bool/0-1, False on padding; None: no padding
        rope: tuple[mx.array, mx.array] | None = None,  # rope_table(*grid, L_txt), else built here
        intermediates: list | None = None,  # if given, receives (img, txt) after every block
        cache=None,  # a step_cache.FirstBlockCache: may skip all blocks but the first
    ) -> mx.array:  # (B, grid_h * grid_w, patch² * out_channels) predicted velocity noise - x0
        cfg, dtype = self.config, self.dtype
        B = img.shape[0]
        if img.ndim != 3 or img.shape[-1] != cfg.in_channels or img.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"img must be (B, {grid[0]}x{grid[1]}, {cfg.in_channels}) packed latents, got {tuple(img.shape)}")
        if txt.ndim != 3 or txt.shape[0] != B or txt.shape[-1] != cfg.context_dim:
            raise ValueError(f"txt must be ({B}, L, {cfg.context_dim}), got {tuple(txt.shape)}")
        if txt_mask is not None and tuple(txt_mask.shape) != tuple(txt.shape[:2]):
            raise ValueError(f"txt_mask must be {tuple(txt.shape[:2])}, got {tuple(txt_mask.shape)}")
        timesteps = mx.array(timesteps).reshape(-1)
        if timesteps.shape[0] != B:
            raise ValueError(f"timesteps must be ({B},), got {tuple(timesteps.shape)}")

        c = self.conditioning(timesteps)
        if rope is None:
            rope = self.rope_table(grid[0], grid[1], txt.shape[1])
        key_mask = None  # [text mask | all image keys]
        if txt_mask is not None:
            key_mask = mx.concatenate([txt_mask.astype(mx.bool_), mx.ones((B, img.shape[1]), mx.bool_)], axis=1)
        img = self.img_in(img.astype(dtype))
        txt = self.txt_in(self.txt_norm(txt.astype(dtype)))

        def blocks(img, txt, start=0, stop=None):
            for block in self.double_blocks[start:stop]:
                img, txt = double_stream(block, img, txt, block.img_mod(c), block.txt_mod(c), rope, key_mask=key_mask)
                if intermediates is not None:
                    intermediates.append((img, txt))
            return img, txt

        if cache is None:
            img, txt = blocks(img, txt)
        else:  # First-Block Cache: block 0 is the head, as diffusers' hook takes transformer_blocks[0]
            img, txt = cache(img, txt, lambda i, t: blocks(i, t, 0, 1), lambda i, t: blocks(i, t, 1))
        return self.final_layer(img, c)
