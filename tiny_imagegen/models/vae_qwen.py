"""Qwen-Image's VAE (diffusers' AutoencoderKLQwenImage, the Wan 2.1 video VAE) written as what it is
for one image: a 2-D convolutional autoencoder, built of the levels of FLUX's AutoencoderKL
(models/vae.py) with its own norm.

The checkpoint holds causal 3-D convolutions: kernel (3, 3, 3) over (time, row, col), with the
time axis padded by two zero frames in front and none behind, so a frame sees only itself and
its past (QV:46-82). On a single frame the two padded frames are zeros, so only the kernel's
last time slice meets data:

    conv3d_causal(x)[t=0] = sum_k W[:, :, k] * pad(x)[k] = W[:, :, 2] * x[0]   (pad(x) = [0, 0, x])

i.e. a 2-D convolution with W[:, :, -1] (1x1x1 convolutions: W[:, :, 0]). The resampling blocks'
`time_conv`s (which would double or halve the frame count) never run on a first chunk (QV:177-181,
206-211), so they are not loaded. The key table (checkpoints/qwen_image.py) takes the slices and
renames diffusers' modules into AutoencoderKL's; tests/test_qwen_vae.py proves the reduction
against the 3-D layer itself.

The same blocks as AutoencoderKL's (resnets with a 1x1 shortcut, the mid block's single-head
attention, the bottom-right-padded stride-2 downsampler, quant convs on both sides). What differs
(`Body` and the methods below):

- the norms are RMS norms over channels, F.normalize(x) · √C · γ (an L2 normalisation, no mean
  subtraction, no groups), in float32 for half inputs (QV:85-115), and SiLU is rounded once, as
  torch's;
- the 1x1 convolutions (shortcuts, quant convs) are Linears: in bf16 their bias is added before
  the one rounding, as in torch's convolution (an MLX Conv2d rounds, then adds);
- upsampling halves the channels (Conv2d(C, C/2)), so every next up level starts at half width;
- a whole decode is clamped to [-1, 1] (QV:859; a tiled one is not);
- the diffusion model sees per-channel normalised latents (z - mean) / std (QP:704-714).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..layers.activations import silu
from .vae import AutoencoderKL, Body, VAEConfig

# AutoencoderKLQwenImage's defaults (QV:687-697), the released model's
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class QwenVAEConfig(VAEConfig):
    latent_channels: int = 16  # diffusers' z_dim
    block_out_channels: tuple[int, ...] = (96, 192, 384, 384)  # base_dim x dim_mult
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 1.0  # unused: the per-channel statistics normalise instead
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):  # (no groups to check: the norms are RMS norms)
        if len(self.latents_mean) != self.latent_channels or len(self.latents_std) != self.latent_channels:
            raise ValueError(f"vae config: latents_mean/latents_std need {self.latent_channels} values each")

    @classmethod
    def from_dict(cls, d: dict) -> "QwenVAEConfig":
        """From a diffusers AutoencoderKLQwenImage `vae/config.json`; absent keys take its defaults."""
        if d.get("attn_scales"):
            raise ValueError(f"vae config: attn_scales {d['attn_scales']} (attention inside the levels) is not implemented")
        if d.get("input_channels", 3) != 3:
            raise ValueError(f"vae config: input_channels {d['input_channels']}: only RGB is implemented")
        mult = tuple(d.get("dim_mult", (1, 2, 4, 4)))
        if len(mult) > 4 or mult[0] != 1:  # (diffusers' decoder itself halves the input of levels 1-3 only)
            raise ValueError(f"vae config: dim_mult {list(mult)}: up to 4 levels, the first base_dim wide, "
                             "are implemented")
        return cls(latent_channels=d.get("z_dim", 16), layers_per_block=d.get("num_res_blocks", 2),
                   block_out_channels=tuple(d.get("base_dim", 96) * m for m in mult),
                   latents_mean=tuple(d.get("latents_mean", LATENTS_MEAN)),
                   latents_std=tuple(d.get("latents_std", LATENTS_STD)))


class RMSNormChannels(nn.Module):
    """x / max(||x||₂, 1e-12) · √C · γ over the channel axis (F.normalize), float32 for half inputs."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        normed = (x32 / mx.maximum(mx.sqrt(mx.sum(x32 * x32, axis=-1, keepdims=True)), 1e-12)).astype(x.dtype)
        # the Python-float √C multiplies in float32 and rounds (torch's opmath), then γ in x's dtype
        return (normed.astype(mx.float32) * x.shape[-1] ** 0.5).astype(x.dtype) * self.gamma


class AutoencoderKLQwenImage(AutoencoderKL):
    def __init__(self, config: QwenVAEConfig = QwenVAEConfig()):
        super().__init__(config, Body(RMSNormChannels, silu, nn.Linear, upsample_halves=True))

    @property
    def size_multiple(self) -> int:
        """Pixels per packed (2x2) latent token along each axis: 16."""
        return 2 * self.config.downscale

    def decode(self, z: mx.array, tiled: bool = False, tile: int = 32, overlap: int = 8) -> mx.array:
        """z (B, h, w, C) -> images (B, 8h, 8w, 3). Whole: clamped to [-1, 1], as diffusers. tiled:
        diffusers' `enable_tiling()` defaults (256-pixel tiles every 192), blended as vae_tiling.py,
        and, as there, not clamped (the pixels' [0, 1] clip follows anyway)."""
        images = super().decode(z, bool(tiled), tile, overlap)
        return images if tiled else mx.clip(images, -1.0, 1.0)

    # -- z <-> the latents the diffusion model sees: per-channel (z - mean) / std --

    def _statistics(self, dtype):
        # as the pipelines: float32 tensors cast to the latents' dtype, 1/std taken in that dtype
        mean = mx.array(self.config.latents_mean, mx.float32).astype(dtype)
        inv_std = 1.0 / mx.array(self.config.latents_std, mx.float32).astype(dtype)
        return mean, inv_std

    def to_latents(self, z: mx.array) -> mx.array:
        mean, inv_std = self._statistics(z.dtype)
        return (z - mean) * inv_std  # QI:251

    def from_latents(self, latents: mx.array) -> mx.array:
        mean, inv_std = self._statistics(latents.dtype)
        return latents / inv_std + mean  # QP:712
