"""The FLUX VAE: an AutoencoderKL (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", sec. 3 and app. G).

The diffusion model never sees pixels. The encoder maps an image x (B, H, W, 3) in [-1, 1] to a
diagonal Gaussian q(z | x) over latents z (B, H/8, W/8, C); the decoder maps z back to an image.
FLUX uses C = 16 latent channels; Stable Diffusion's VAE has C = 4 and two extra 1x1 "quant"
convolutions around the latent.

    encoder: conv_in -> for each level i: resnets (+ downsample, stride 2, except the last level)
             -> mid (resnet, single-head attention over all H*W positions, resnet)
             -> GroupNorm, SiLU -> conv_out (2C channels: mean and log-variance)
    decoder: conv_in -> mid -> for each level i from the deepest up: resnets (+ nearest 2x upsample
             and a conv, except level 0) -> GroupNorm, SiLU -> conv_out (3 channels)

Levels have channels `block_out_channels[i]` (FLUX: 128, 256, 512, 512); every norm is GroupNorm(32)
with eps 1e-6 and every activation SiLU (Qwen-Image's VAE builds the same blocks with its own norm:
`Body`). The diffusion model works on rescaled latents (z - shift) * scale, so decoding a sampler's
output takes z = latents / scale + shift first, as the FLUX pipeline does.

Layout: channels-last everywhere (MLX convolutions). Parameter names follow the original code
(BFL's `ae.safetensors`, itself the LDM naming), e.g. `decoder.up.0.block.0.conv1.weight`; there
`decoder.up[i]` is the decoder's level i, so the decoder runs `up[3]` first and `up[0]` last.
"""

from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..layers.activations import silu_fast
from ..layers.attention import sdpa
from .vae_tiling import limited_run_ahead, tiled_decode

# ---- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # resnets per encoder level; the decoder has one more per level
    norm_num_groups: int = 32
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downscale(self) -> int:
        """Pixels per latent position along each axis (8 for four levels)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def __post_init__(self):
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From a diffusers `vae/config.json` (AutoencoderKL); absent keys take diffusers' defaults."""
        if d.get("act_fn", "silu") != "silu" or not d.get("mid_block_add_attention", True):
            raise ValueError("only the AutoencoderKL with SiLU and mid-block attention is implemented")
        known = {f.name for f in fields(cls)}
        values = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in known and v is not None}}
        values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)


# AutoencoderKL's constructor defaults (a config.json may omit keys, and writes shift_factor: null)
_DIFFUSERS_DEFAULTS = dict(
    latent_channels=4, block_out_channels=(64,), layers_per_block=1, use_quant_conv=True,
    use_post_quant_conv=True, scaling_factor=0.18215, shift_factor=0.0,
)


VAE_PRESETS = {
    "flux": VAEConfig(),
    "sd": VAEConfig(
        latent_channels=4, use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.18215, shift_factor=0.0
    ),
}


# ---- building blocks ------------------------------------------------------------------------------


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # pytorch_compatible: groups of consecutive channels, as torch.nn.GroupNorm forms them
    return nn.GroupNorm(groups, channels, eps=1e-6, pytorch_compatible=True)


@dataclass(frozen=True)
class Body:
    """What the blocks are built of, where autoencoders differ: here GroupNorm, SiLU and 1x1 convs,
    channels kept by the upsamplers; Qwen-Image's VAE (models/vae_qwen.py) has its own."""

    norm: Callable[[int], nn.Module]  # channels -> norm layer
    act: Callable[[mx.array], mx.array] = silu_fast  # SiLU from multiplies and adds (layers/activations.py)
    pointwise: Callable[[int, int], nn.Module] = partial(nn.Conv2d, kernel_size=1)  # (in, out) -> per pixel
    upsample_halves: bool = False  # every upsampler halves the channels


def upsample_nearest(x: mx.array) -> mx.array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each value repeated over a 2x2 square."""
    B, H, W, C = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return x.reshape(B, 2 * H, 2 * W, C)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, body: Body):
        super().__init__()
        self.act = body.act
        self.norm1 = body.norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = body.norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = body.pointwise(in_channels, out_channels)  # "network in network": a 1x1 conv

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if "nin_shortcut" in self:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions: the only global mixing in the VAE.
    q, k, v and the output projection are per-pixel linear maps (1x1 convs in the BFL file)."""

    def __init__(self, channels: int, body: Body):
        super().__init__()
        self.norm = body.norm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:  # (B, H, W, C)
        B, H, W, C = x.shape
        h = self.norm(x).reshape(B, 1, H * W, C)  # one head of width C
        h = sdpa(self.q(h), self.k(h), self.v(h), scale=C**-0.5)
        return x + self.proj_out(h).reshape(B, H, W, C)


class MidBlock(nn.Module):
    def __init__(self, channels: int, body: Body):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, body)
        self.attn_1 = AttnBlock(channels, body)
        self.block_2 = ResnetBlock(channels, channels, body)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # Zero padding on the bottom and right only (not a symmetric padding=1): H -> ceil(H / 2)
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(upsample_nearest(x))


class Level(nn.Module):
    """One resolution level: `n` resnets, then an optional down- or upsampling."""

    def __init__(self, in_channels: int, out_channels: int, n: int, body: Body, resample: str | None):
        super().__init__()
        self.block = [ResnetBlock(in_channels if j == 0 else out_channels, out_channels, body) for j in range(n)]
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels, out_channels // 2 if body.upsample_halves else out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        for block in self.block:
            x = block(x)
        if "downsample" in self:
            x = self.downsample(x)
        if "upsample" in self:
            x = self.upsample(x)
        return x


# ---- encoder and decoder --------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, body: Body):
        super().__init__()
        ch, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
        self.act = body.act
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = [
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, body, "down" if i < last else None)
            for i in range(last + 1)
        ]
        self.mid = MidBlock(ch[-1], body)
        self.norm_out = body.norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:  # (B, H, W, 3) -> (B, H/8, W/8, 2C)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(self.act(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, body: Body):
        super().__init__()
        ch, last = cfg.block_out_channels, len(cfg.block_out_channels) - 1
        halve = 2 if body.upsample_halves else 1
        self.act = body.act
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], body)
        # level i reads the mid block's output (i = last) or level i + 1's upsampled one
        ins = [ch[i + 1] // halve if i < last else ch[last] for i in range(last + 1)]
        self.up = [
            Level(ins[i], ch[i], cfg.layers_per_block + 1, body, "up" if i > 0 else None) for i in range(last + 1)
        ]
        self.norm_out = body.norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:  # (B, h, w, C) -> (B, 8h, 8w, 3)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # deepest level first
            h = level(h)
        return self.conv_out(self.act(self.norm_out(h)))


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), from the encoder's 2C output channels."""

    def __init__(self, moments: mx.array):  # (B, h, w, 2C)
        self.mean, logvar = mx.split(moments, 2, axis=-1)
        self.logvar = mx.clip(logvar, -30.0, 20.0)  # as LDM / diffusers, keeps exp() finite
        self.std = mx.exp(0.5 * self.logvar)

    def mode(self) -> mx.array:
        return self.mean

    def sample(self, key: mx.array | None = None) -> mx.array:
        return self.mean + self.std * mx.random.normal(self.mean.shape, dtype=self.mean.dtype, key=key)


# ---- the autoencoder ------------------------------------------------------------------------------

# Above this many latent positions (768x768 pixels) `decode` tiles by default, so FLUX's own
# 1024x1024 decodes in tiles: 4.6 instead of 13.2 GiB in fp32 (benchmarks/vae_memory.py).
AUTO_TILE_LATENT_AREA = 96 * 96


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig = VAE_PRESETS["flux"], body: Body | None = None):
        super().__init__()
        self.config = config
        c = config.latent_channels
        body = body or Body(lambda channels: group_norm(channels, config.norm_num_groups))
        self.encoder = Encoder(config, body)
        self.decoder = Decoder(config, body)
        if config.use_quant_conv:
            self.quant_conv = body.pointwise(2 * c, 2 * c)
        if config.use_post_quant_conv:
            self.post_quant_conv = body.pointwise(c, c)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype, the weights'; inputs are cast to it and outputs come in it."""
        return self.encoder.conv_in.weight.dtype

    # -- images <-> z (the VAE's own latent space) --

    def encode(self, images: mx.array) -> DiagonalGaussian:
        """images (B, H, W, 3) in [-1, 1], H and W multiples of 8 -> q(z | x) over (B, H/8, W/8, C)."""
        self._check(images, "images", self.config.in_channels, multiple=self.config.downscale)
        moments = self.encoder(images.astype(self.dtype))
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        with limited_run_ahead():  # the encoder peaks at full resolution, as the decoder does
            mx.eval(moments)
        return DiagonalGaussian(moments)

    def decode(
        self, z: mx.array, tiled: bool | None = None, tile: int = 64, overlap: int = 16
    ) -> mx.array:
        """z (B, h, w, C) -> images (B, 8h, 8w, 3), roughly in [-1, 1]; evaluated, with MLX's
        run-ahead limited (see vae_tiling.py).

        tiled: None decodes in overlapping tiles of `tile` latent positions (blended over `overlap`)
        when h * w exceeds AUTO_TILE_LATENT_AREA; True / False force it. Tiles do not share
        GroupNorm statistics or attention, so a tiled decode differs slightly from a whole one."""
        self._check(z, "latents z", self.config.latent_channels)
        if tiled is None:
            tiled = z.shape[1] * z.shape[2] > AUTO_TILE_LATENT_AREA
        with limited_run_ahead():
            images = tiled_decode(self._decode, z, tile, overlap, self.config.downscale) if tiled else self._decode(z)
            mx.eval(images)
        return images

    def _decode(self, z: mx.array) -> mx.array:
        z = z.astype(self.dtype)  # a sampler's float32 latents into a bf16 decoder
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    # -- z <-> the latents the diffusion model sees --

    def to_latents(self, z: mx.array) -> mx.array:
        """z -> (z - shift) * scale: unit-variance latents for the diffusion model."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latents(self, latents: mx.array) -> mx.array:
        """The inverse, as the FLUX pipeline computes it: latents / scale + shift."""
        return latents / self.config.scaling_factor + self.config.shift_factor

    def encode_latents(self, images: mx.array, key: mx.array | None = None, sample: bool = True) -> mx.array:
        """images -> diffusion-space latents (image-to-image): a sample of q(z | x), or its mean."""
        q = self.encode(images)
        return self.to_latents(q.sample(key) if sample else q.mode())

    def decode_latents(self, latents: mx.array, **tiling) -> mx.array:
        """Diffusion-space latents (B, h, w, C) -> images (B, 8h, 8w, 3)."""
        self._check(latents, "latents", self.config.latent_channels)
        return self.decode(self.from_latents(latents), **tiling)

    @staticmethod
    def _check(x: mx.array, name: str, channels: int, multiple: int = 1):
        if x.ndim != 4 or x.shape[-1] != channels or x.shape[1] < 1 or x.shape[2] < 1:
            hint = " (channels-first? this VAE is channels-last)" if x.ndim == 4 and x.shape[1] == channels else ""
            raise ValueError(f"{name} must have shape (B, H, W, {channels}), got {tuple(x.shape)}{hint}")
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise ValueError(f"{name}: height and width must be multiples of {multiple}, got {tuple(x.shape[1:3])}")


def vae_from_preset(name: str, **overrides) -> AutoencoderKL:
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}: choose from {sorted(VAE_PRESETS)}")
    return AutoencoderKL(replace(VAE_PRESETS[name], **overrides))
