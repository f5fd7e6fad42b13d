"""The conditional diffusion U-Net of Stable Diffusion 1.5 (Rombach et al., 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3.3 and app. E; diffusers' UNet2DConditionModel).

It predicts the noise eps(x_t, t, text) on (B, h, w, 4) latents, channels-last throughout:

    t -> sinusoid (320, cos half first, as flip_sin_to_cos=True, freq_shift=0) -> MLP -> emb (1280)
    conv_in -> down levels -> mid -> up levels -> GroupNorm, SiLU -> conv_out

    down level i:  layers_per_block x [ResNet(emb) (+ Transformer2D(text))], then a stride-2 conv
                   (not on the last level); every output is kept as a skip
    mid:           ResNet, Transformer2D, ResNet
    up level i:    (layers_per_block + 1) x [concat(h, skip) -> ResNet (+ Transformer2D)], then
                   nearest 2x upsampling and a conv (not on the last level)

A ResNet block adds the timestep embedding between its two convolutions (one Linear of SiLU(emb)
per block: that is how t reaches every resolution). A Transformer2D block sees the feature map as
h*w tokens: GroupNorm, a per-pixel projection in, BasicTransformerBlocks (self-attention,
cross-attention to the CLIP text states, GEGLU; layers/transformer_block.py), a projection out,
plus the residual. SD 1.5 puts attention on the three finer levels and the middle, none on the
coarsest level (down_block_types / up_block_types); 8 heads everywhere (diffusers calls this
number `attention_head_dim`), so heads are 40, 80, 160 wide.

Shared pieces: the sinusoid is layers/embeddings.timestep_embedding with time_factor 1 (t is
already a training step, 0..999), nearest upsampling the VAE's. The VAE's ResNet block and
downsampler are not reused: this one adds the timestep, its norms use eps 1e-5 (not 1e-6), and
its stride-2 conv pads symmetrically (the VAE's pads bottom and right only).

Parameter names are diffusers' (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k`),
except `to_out` (diffusers `to_out.0`) and `ff.proj_in` / `ff.proj_out` (`ff.net.0.proj` /
`ff.net.2`). The per-pixel projections proj_in / proj_out are Linears here: SD 1.5 stores them
as 1x1 convolutions (use_linear_projection=False), SD 2 as Linears; the maths is the same.
"""

from dataclasses import dataclass, fields, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..layers.embeddings import timestep_embedding
from ..layers.transformer_block import BasicTransformerBlock
from .vae import upsample_nearest

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # per level; diffusers' attention_head_dim
    transformer_layers_per_block: int = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False  # how a checkpoint stores proj_in/out; the maths is the same
    sample_size: int = 64  # latent size it was trained at (512 px)

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == len(self.attention_heads) == n):
            raise ValueError("block_out_channels, down/up_block_types and attention_heads need one entry per level")
        if any(t not in DOWN_TYPES for t in self.down_block_types) or any(t not in UP_TYPES for t in self.up_block_types):
            raise ValueError(f"block types must be {DOWN_TYPES} (down) and {UP_TYPES} (up)")
        mirrored = tuple(t.replace("Down", "Up") for t in reversed(self.down_block_types))
        if self.up_block_types != mirrored:
            raise ValueError(f"up_block_types must mirror down_block_types: expected {mirrored}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")

    def has_attention(self, level: int) -> bool:
        return self.down_block_types[level].startswith("CrossAttn")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """From a diffusers `unet/config.json` (UNet2DConditionModel); absent keys take its defaults."""
        cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
        unsupported = {k: cfg[k] for k, ok in _FIXED.items() if cfg.get(k, ok) != ok}
        if unsupported:
            raise ValueError(f"UNet2DConditionModel options not implemented: {unsupported}")
        n = len(cfg["block_out_channels"])
        heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
        per_level = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n  # noqa: E731
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in known}
        if isinstance(values["transformer_layers_per_block"], tuple):
            raise ValueError("a different transformer depth per level is not implemented")
        return cls(**{**values, "attention_heads": per_level(heads)})


_DIFFUSERS_DEFAULTS = dict(
    in_channels=4, out_channels=4, layers_per_block=2, attention_head_dim=8, cross_attention_dim=1280,
    norm_num_groups=32, norm_eps=1e-5, use_linear_projection=False, transformer_layers_per_block=1,
    sample_size=None, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=UNetConfig.down_block_types, up_block_types=UNetConfig.up_block_types,
)
# options whose other values would change the computation (these are SD 1.5's and SD 2's)
_FIXED = dict(
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", center_input_sample=False, downsample_padding=1,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", time_embedding_type="positional",
    resnet_time_scale_shift="default", class_embed_type=None, addition_embed_type=None, upcast_attention=False,
    only_cross_attention=False, dual_cross_attention=False, encoder_hid_dim=None, time_cond_proj_dim=None,
    conv_in_kernel=3, conv_out_kernel=3, resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    attention_type="default", num_class_embeds=None, projection_class_embeddings_input_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, cross_attention_norm=None, encoder_hid_dim_type=None,
    class_embeddings_concat=False, mid_block_only_cross_attention=None, reverse_transformer_layers_per_block=None,
)

# stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (the UNetConfig defaults)
UNET_PRESETS = {"sd15": UNetConfig()}


def unet_from_preset(name: str, **overrides) -> "UNet2DConditionModel":
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}: choose from {sorted(UNET_PRESETS)}")
    return UNet2DConditionModel(replace(UNET_PRESETS[name], **overrides))


# ---- building blocks ------------------------------------------------------------------------------


def group_norm(channels: int, groups: int, eps: float) -> nn.GroupNorm:
    # pytorch_compatible: groups of consecutive channels, as torch.nn.GroupNorm forms them
    return nn.GroupNorm(groups, channels, eps=eps, pytorch_compatible=True)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, emb_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv; + Linear(SiLU(emb)) per channel; GroupNorm, SiLU, conv; + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch, groups, eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def __call__(self, x: mx.array, emb: mx.array) -> mx.array:  # (B, H, W, C), (B, E)
        h = self.conv1(nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(nn.silu(emb))[:, None, None, :]
        h = self.conv2(nn.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h


class Transformer2D(nn.Module):
    """A feature map as H*W tokens through transformer blocks with cross-attention, plus the residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups, 1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:  # (B, H, W, C), (B, S, Dc)
        B, H, W, C = x.shape
        h = self.proj_in(self.norm(x).reshape(B, H * W, C))
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).reshape(B, H, W, C)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)  # H -> ceil(H / 2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x)


def resize_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """Nearest-neighbour resize of (B, H, W, C) to `size`, as torch's F.interpolate(mode="nearest"):
    output i reads input floor(i * in / out), the ratio in float32."""
    if size == (2 * x.shape[1], 2 * x.shape[2]):
        return upsample_nearest(x)
    for axis, (n_in, n_out) in enumerate(zip(x.shape[1:3], size), start=1):
        idx = np.minimum(np.floor(np.arange(n_out) * np.float32(n_in / n_out)).astype(np.int32), n_in - 1)
        x = mx.take(x, mx.array(idx), axis=axis)
    return x


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        return self.conv(resize_nearest(x, size))


class Level(nn.Module):
    """One down or up level: resnets, each followed by a Transformer2D on attention levels, then
    an optional down- or upsampler. An up level's resnet j also takes a skip: its input has the
    channels of h plus those of the skip (skip_channels[j])."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int, out_ch: int, n: int, resample: str | None,
                 skip_channels: tuple[int, ...] = ()):
        super().__init__()
        emb, g, eps = 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.norm_eps
        skips = skip_channels or (0,) * n
        self.resnets = [ResnetBlock((in_ch if j == 0 else out_ch) + skips[j], out_ch, emb, g, eps) for j in range(n)]
        if cfg.has_attention(level):
            heads, ctx, depth = cfg.attention_heads[level], cfg.cross_attention_dim, cfg.transformer_layers_per_block
            self.attentions = [Transformer2D(out_ch, heads, ctx, depth, g) for _ in range(n)]
        if resample == "down":
            self.downsamplers = [Downsample(out_ch)]
        elif resample == "up":
            self.upsamplers = [Upsample(out_ch)]

    def __call__(self, h, emb, context, skips: list | None = None, size=None) -> tuple[mx.array, list[mx.array]]:
        outputs = []
        for j, resnet in enumerate(self.resnets):
            if skips is not None:  # the up path concatenates the latest skip along channels
                h = mx.concatenate([h, skips.pop()], axis=-1)
            h = resnet(h, emb)
            if "attentions" in self:
                h = self.attentions[j](h, context)
            outputs.append(h)
        if "downsamplers" in self:
            h = self.downsamplers[0](h)
            outputs.append(h)
        if "upsamplers" in self:
            h = self.upsamplers[0](h, size)
        return h, outputs


class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch, emb, g, eps = cfg.block_out_channels[-1], 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [ResnetBlock(ch, ch, emb, g, eps) for _ in range(2)]
        self.attentions = [Transformer2D(ch, cfg.attention_heads[-1], cfg.cross_attention_dim,
                                         cfg.transformer_layers_per_block, g)]

    def __call__(self, h, emb, context):
        return self.resnets[1](self.attentions[0](self.resnets[0](h, emb), context), emb)


# ---- the U-Net ------------------------------------------------------------------------------------


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig = UNET_PRESETS["sd15"]):
        super().__init__()
        self.config = cfg = config
        ch, n, last = cfg.block_out_channels, cfg.layers_per_block, len(cfg.block_out_channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        self.down_blocks = [
            Level(cfg, i, ch[max(i - 1, 0)], ch[i], n, "down" if i < last else None) for i in range(last + 1)
        ]
        self.mid_block = MidBlock(cfg)
        # Skips, in the order the down path makes them: conv_in's output, then each level's resnet
        # outputs and its downsampler's. The up path takes them back last-in first-out.
        skip_ch = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(n + (i < last))]
        self.up_blocks = []
        for i in reversed(range(last + 1)):  # deepest level first
            skips = tuple(skip_ch.pop() for _ in range(n + 1))
            self.up_blocks.append(Level(cfg, i, ch[min(i + 1, last)], ch[i], n + 1, "up" if i > 0 else None, skips))
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def __call__(self, x: mx.array, t, context: mx.array) -> mx.array:
        """x (B, h, w, in_channels) latents, t training timestep(s) in [0, 1000) (scalar or (B,)),
        context (B, S, cross_attention_dim) text states -> (B, h, w, out_channels)."""
        self._check(x, context)
        B, dtype = x.shape[0], self.conv_in.weight.dtype
        t = mx.broadcast_to(mx.array(t, dtype=mx.float32).reshape(-1), (B,))
        # The sinusoid is computed in float32 and then cast to the model dtype, as diffusers does.
        emb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0], time_factor=1.0).astype(dtype))
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            h, outputs = level(h, emb, context)
            skips += outputs
        h = self.mid_block(h, emb, context)
        for level in self.up_blocks:
            n = len(level.resnets)
            mine, skips = skips[-n:], skips[:-n]
            # upsample to the size of the next skip: 2x, or 2x cropped where the down path rounded up
            size = tuple(skips[-1].shape[1:3]) if skips else None
            h, _ = level(h, emb, context, mine, size)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))

    def _check(self, x: mx.array, context: mx.array):
        c, d = self.config.in_channels, self.config.cross_attention_dim
        if x.ndim != 4 or x.shape[-1] != c:
            hint = " (channels-first? this U-Net is channels-last)" if x.ndim == 4 and x.shape[1] == c else ""
            raise ValueError(f"latents must have shape (B, h, w, {c}), got {tuple(x.shape)}{hint}")
        if context.ndim != 3 or context.shape[-1] != d or context.shape[0] != x.shape[0]:
            raise ValueError(f"text states must have shape ({x.shape[0]}, S, {d}), got {tuple(context.shape)}")
