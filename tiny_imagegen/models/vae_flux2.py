"""FLUX.2's VAE (diffusers' AutoencoderKLFlux2): the AutoencoderKL of models/vae.py with 32 latent
channels and both quant convs, plus what is new: the diffusion model's latents are normalised per
channel by BatchNorm running statistics, in the packed 2x2-patch space (FV:67-152, FP:370-385,
464-477, 906-922).

    encode:  z = mode(q(z | x))  (B, H/8, W/8, 32)
             -> 2x2 patches, channel c*4 + 2*dy + dx                    (B, H/16, W/16, 128)
             -> (z - running_mean) / sqrt(running_var + eps)             the diffusion latents
    decode:  the inverse: latents * sqrt(running_var + eps) + running_mean -> unpatchify -> decoder

There is no scaling or shift factor. diffusers' BatchNorm2d module is never run, only its buffers
are read; the square root is taken in the buffers' dtype (bf16 for a bf16 VAE), then cast to the
latents' dtype, as the pipeline does. The packed grid flattened row-major is exactly the
transformer's token sequence (`pack_latents` order).
"""

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from ..layers.embeddings import pack_latents, unpack_latents
from .vae import AutoencoderKL, VAEConfig


@dataclass(frozen=True)
class Flux2VAEConfig(VAEConfig):
    latent_channels: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 1.0  # unused: the BatchNorm statistics normalise instead
    shift_factor: float = 0.0
    batch_norm_eps: float = 1e-4
    patch_size: int = 2

    @property
    def packed_channels(self) -> int:
        return self.patch_size**2 * self.latent_channels

    @classmethod
    def from_dict(cls, d: dict) -> "Flux2VAEConfig":
        """From a diffusers AutoencoderKLFlux2 `vae/config.json`; absent keys take its defaults."""
        if d.get("act_fn", "silu") != "silu" or not d.get("mid_block_add_attention", True):
            raise ValueError("only the AutoencoderKLFlux2 with SiLU and mid-block attention is implemented")
        decoder = d.get("decoder_block_out_channels")
        if decoder is not None and tuple(decoder) != tuple(d.get("block_out_channels", cls.block_out_channels)):
            raise ValueError(f"decoder_block_out_channels {decoder} differ from the encoder's: not implemented")
        patch = d.get("patch_size", (2, 2))
        patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
        if patch[0] != patch[1]:
            raise ValueError(f"patch_size {patch}: only square patches are implemented")
        known = {f.name for f in fields(cls)} - {"patch_size", "scaling_factor", "shift_factor"}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values, patch_size=patch[0])


def patchify(z: mx.array, patch: int = 2) -> mx.array:
    """(B, h, w, C) -> (B, h/p, w/p, C p²), channel c p² + p dy + dx (FLUX.2's `_patchify_latents`)."""
    B, h, w, _ = z.shape
    return pack_latents(z, patch).reshape(B, h // patch, w // patch, -1)


def unpatchify(x: mx.array, patch: int = 2) -> mx.array:
    """The inverse: (B, h, w, C p²) -> (B, h p, w p, C)."""
    B, h, w, D = x.shape
    return unpack_latents(x.reshape(B, h * w, D), h * patch, w * patch, patch)


class LatentStatistics(nn.Module):
    """The running mean and variance of the packed latents (diffusers' `bn` buffers)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))

    def std(self, dtype: mx.Dtype) -> mx.array:
        # sqrt in the buffers' dtype, then cast (FP:911-913)
        return mx.sqrt(self.running_var + self.eps).astype(dtype)

    def normalize(self, x: mx.array) -> mx.array:  # (..., channels)
        return (x - self.running_mean.astype(x.dtype)) / self.std(x.dtype)

    def denormalize(self, x: mx.array) -> mx.array:
        return x * self.std(x.dtype) + self.running_mean.astype(x.dtype)


class AutoencoderKLFlux2(AutoencoderKL):
    def __init__(self, config: Flux2VAEConfig = Flux2VAEConfig()):
        super().__init__(config)
        self.bn = LatentStatistics(config.packed_channels, config.batch_norm_eps)

    # -- z <-> the latents the diffusion model sees (B, H/16, W/16, 128) --

    def to_latents(self, z: mx.array) -> mx.array:
        """z (B, h, w, C) -> normalised packed latents (B, h/2, w/2, 4C)."""
        self._check(z, "latents z", self.config.latent_channels, multiple=self.config.patch_size)
        return self.bn.normalize(patchify(z, self.config.patch_size))

    def from_latents(self, latents: mx.array) -> mx.array:
        """Packed latents (B, h/2, w/2, 4C) -> z (B, h, w, C)."""
        return unpatchify(self.bn.denormalize(latents), self.config.patch_size)

    def decode_latents(self, latents: mx.array, **tiling) -> mx.array:
        """Packed diffusion latents (B, h/2, w/2, 4C) -> images (B, 16 h/2, 16 w/2, 3)."""
        self._check(latents, "latents", self.config.packed_channels)
        return self.decode(self.from_latents(latents), **tiling)

    @property
    def size_multiple(self) -> int:
        """Pixels per packed latent position: 16."""
        return self.config.downscale * self.config.patch_size
