"""Qwen-Image's VAE (diffusers' AutoencoderKLQwenImage, the Wan 2.1 video VAE) written as what it is
for one image: a 2-D convolutional autoencoder.

The checkpoint holds causal 3-D convolutions: kernel (3, 3, 3) over (time, row, col), with the
time axis padded by two zero frames in front and none behind, so a frame sees only itself and
its past (QV:46-82). On a single frame the two padded frames are zeros, so only the kernel's
last time slice meets data:

    conv3d_causal(x)[t=0] = sum_k W[:, :, k] * pad(x)[k] = W[:, :, 2] * x[0]   (pad(x) = [0, 0, x])

i.e. a 2-D convolution with W[:, :, -1] (1x1x1 convolutions: W[:, :, 0]). The resampling blocks'
`time_conv`s (which would double or halve the frame count) never run on a first chunk (QV:177-181,
206-211), so they are not loaded. The key table (checkpoints/qwen_image.py) takes the slices;
tests/test_qwen_vae.py proves the reduction against the 3-D layer itself.

What differs from FLUX's AutoencoderKL (models/vae.py), besides the names:

- the norms are RMS norms over channels, F.normalize(x) · √C · γ (an L2 normalisation, no mean
  subtraction, no groups), in float32 for half inputs (QV:85-115);
- residual blocks take the shortcut from the raw input: shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))));
- upsampling halves the channels (Conv2d(C, C/2)), so every next up block starts at half width;
- the encoder's mean/log-variance go through `quant_conv`, the decoder's input through
  `post_quant_conv` (1x1), and a whole decode is clamped to [-1, 1] (QV:859; a tiled one is not);
- the diffusion model sees per-channel normalised latents (z - mean) / std (QP:704-714).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..layers.activations import silu
from ..layers.attention import sdpa
from .vae import DiagonalGaussian, upsample_nearest
from .vae_tiling import limited_run_ahead, tiled_decode

# AutoencoderKLQwenImage's defaults (QV:687-697), the released model's
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class QwenVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """The encoder levels' widths, as AutoencoderKL's config names them (memory.auto_tiling reads [0])."""
        return tuple(self.base_dim * m for m in self.dim_mult)

    @classmethod
    def from_dict(cls, d: dict) -> "QwenVAEConfig":
        """From a diffusers AutoencoderKLQwenImage `vae/config.json`; absent keys take its defaults."""
        if d.get("attn_scales"):
            raise ValueError(f"vae config: attn_scales {d['attn_scales']} (attention inside the levels) is not implemented")
        if d.get("input_channels", 3) != 3:
            raise ValueError(f"vae config: input_channels {d['input_channels']}: only RGB is implemented")
        cfg = cls(**{k: tuple(d[k]) if isinstance(d[k], list) else d[k]
                     for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "latents_mean", "latents_std") if k in d})
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"vae config: latents_mean/latents_std need {cfg.z_dim} values each")
        return cfg


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


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1, self.conv1 = RMSNormChannels(in_dim), nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.norm2, self.conv2 = RMSNormChannels(out_dim), nn.Conv2d(out_dim, out_dim, 3, padding=1)
        if in_dim != out_dim:
            self.conv_shortcut = nn.Linear(in_dim, out_dim)  # a 1x1 convolution

    def __call__(self, x: mx.array) -> mx.array:  # (B, H, W, C)
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return self.conv2(silu(self.norm2(self.conv1(silu(self.norm1(x)))))) + h


class AttentionBlock(nn.Module):
    """Single-head attention over all H·W positions, q/k/v from one 1x1 convolution (QV:294-336)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNormChannels(dim)
        self.to_qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        q, k, v = mx.split(self.to_qkv(self.norm(x)).reshape(B, 1, H * W, 3 * C), 3, axis=-1)
        return x + self.proj(sdpa(q, k, v, scale=C**-0.5).reshape(B, H, W, C))


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]
        self.attentions = [AttentionBlock(dim)]

    def __call__(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)

    def __call__(self, x):  # ZeroPad2d((0, 1, 0, 1)): right and bottom only
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim // 2, 3, padding=1)  # halves the channels

    def __call__(self, x):
        return self.conv(upsample_nearest(x))


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, n: int, upsample: bool):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(n)]
        if upsample:
            self.upsample = Upsample(out_dim)

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsample(x) if "upsample" in self else x


class Encoder(nn.Module):
    def __init__(self, cfg: QwenVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = nn.Conv2d(3, dims[0], 3, padding=1)
        self.down_blocks = []  # resnets and downsamplers in one list, numbered as the checkpoint
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if i < len(cfg.dim_mult) - 1:
                self.down_blocks.append(Downsample(out_dim))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out, self.conv_out = RMSNormChannels(dims[-1]), nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def __call__(self, x):  # (B, H, W, 3) -> (B, H/8, W/8, 2 z)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(silu(self.norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: QwenVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        last = len(cfg.dim_mult) - 1
        self.up_blocks = [UpBlock(in_dim // 2 if i else in_dim, out_dim, cfg.num_res_blocks + 1, i < last)
                          for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))]
        self.norm_out, self.conv_out = RMSNormChannels(dims[-1]), nn.Conv2d(dims[-1], 3, 3, padding=1)

    def __call__(self, z):  # (B, h, w, z) -> (B, 8h, 8w, 3)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(silu(self.norm_out(x)))


class AutoencoderKLQwenImage(nn.Module):
    def __init__(self, config: QwenVAEConfig = QwenVAEConfig()):
        super().__init__()
        self.config = cfg = config
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Linear(2 * cfg.z_dim, 2 * cfg.z_dim)
        self.post_quant_conv = nn.Linear(cfg.z_dim, cfg.z_dim)

    @property
    def dtype(self) -> mx.Dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def size_multiple(self) -> int:
        """Pixels per packed (2x2) latent token along each axis: 16."""
        return 2 * self.config.downscale

    def encode(self, images: mx.array) -> DiagonalGaussian:
        """images (B, H, W, 3) in [-1, 1], H and W multiples of 8 -> q(z | x) over (B, H/8, W/8, z)."""
        _check(images, "images", 3, self.config.downscale)
        with limited_run_ahead():
            moments = self.quant_conv(self.encoder(images.astype(self.dtype)))
            mx.eval(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: mx.array, tiled: bool = False, tile: int = 32, overlap: int = 8) -> mx.array:
        """z (B, h, w, z_dim) -> images (B, 8h, 8w, 3), evaluated. Whole: clamped to [-1, 1], as
        diffusers. tiled: diffusers' `enable_tiling()` defaults (256-pixel tiles every 192), blended
        as vae_tiling.py, and, as there, not clamped (the pixels' [0, 1] clip follows anyway)."""
        _check(z, "latents z", self.config.z_dim)
        with limited_run_ahead():
            if tiled:
                images = tiled_decode(self._decode, z, tile, overlap, self.config.downscale)
            else:
                images = mx.clip(self._decode(z), -1.0, 1.0)
            mx.eval(images)
        return images

    def _decode(self, z: mx.array) -> mx.array:
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

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

    def decode_latents(self, latents: mx.array, **tiling) -> mx.array:
        """Diffusion-space latents (B, h, w, z_dim) -> images (B, 8h, 8w, 3)."""
        return self.decode(self.from_latents(latents), **tiling)


def _check(x: mx.array, name: str, channels: int, multiple: int = 1):
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{name} must have shape (B, H, W, {channels}), got {tuple(x.shape)}")
    if x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(f"{name}: height and width must be multiples of {multiple}, got {tuple(x.shape[1:3])}")
