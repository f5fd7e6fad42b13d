"""DiT: the Diffusion Transformer (Peebles & Xie, 2023, "Scalable Diffusion Models with Transformers").

A ViT over latent patches. The latent (B, h, w, C) is cut into p x p patches, each linearly
embedded (`x_embedder`, a stride-p convolution in the original), plus a fixed 2-D sin-cos position
table; a stack of transformer blocks follows; the final layer maps each token back to a patch of
`out_channels` (DiT-XL/2: 8 = the noise eps and the learned variance, 4 channels each).

The conditioning vector c = t_embedder(sinusoid(t)) + y_embedder(y), y a class label (ImageNet:
1000 classes plus a null class, index 1000, for classifier-free guidance) or, for our own models,
a pooled text vector. The paper compares three ways of letting c into a block (its §3.2, Fig. 3):

    adaln-zero        c regresses (shift, scale, gate) for attention and MLP, 6 chunks per block
                      (layers/modulation.py); zero-initialised, so every block starts as the
                      identity. The paper's best, and DiT-XL/2's.
    in-context        the embeddings of t and y (and any text tokens) join the sequence as extra
                      tokens and are dropped before the final layer; plain pre-norm blocks.
    cross-attention   the same tokens form a separate sequence that a cross-attention layer after
                      self-attention reads.

In the last two the blocks' norms are ordinary LayerNorms and the final norm is not adaptive (as
in the paper). They start as identities too, by zeroing the output projection of every residual
branch (our choice; the paper gives them the ViT initialisation).

Parameter names follow the original code (`x_embedder`, `t_embedder`, `y_embedder`,
`blocks.3.attn.qkv`, `final_layer.linear`) except inside the pieces shared from layers/
(`MLPEmbedder.in_layer`, `Modulation.lin`); checkpoints/dit.py maps diffusers'
DiTTransformer2DModel onto them.
"""

from dataclasses import dataclass, replace
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..layers.attention import CROSS, attention, split_heads
from ..layers.embeddings import MLPEmbedder, ddpm_timestep_embedding, pack_latents, unpatchify
from ..layers.modulation import Modulation, layer_norm, modulate
from ..layers.positions import sincos_2d_interpolated
from .mmdit import mlp

CONDITIONINGS = ("adaln-zero", "in-context", "cross-attention")


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 4
    out_channels: int | None = 8  # None: in_channels; 2 x in_channels: eps and learned variance
    sample_size: int = 32  # latent side the position table is laid out for (256 px / 8)
    patch_size: int = 2
    num_heads: int = 16
    head_dim: int = 72
    depth: int = 28
    mlp_ratio: float = 4.0
    num_classes: int | None = 1000  # class-conditioned (a null class is added for guidance)
    text_dim: int | None = None  # text-conditioned: width of the pooled text vector
    context_dim: int | None = None  # width of text tokens (in-context / cross-attention only)
    conditioning: str = "adaln-zero"
    norm_eps: float = 1e-5  # the MLP's LayerNorm (diffusers' norm3); the others use 1e-6

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def learned_sigma(self) -> bool:
        return self.output_channels == 2 * self.in_channels

    def __post_init__(self):
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown DiT conditioning {self.conditioning!r}: use one of {CONDITIONINGS}")
        if (self.num_classes is None) == (self.text_dim is None):
            raise ValueError("a DiT is conditioned on classes (num_classes) or on a pooled text vector (text_dim): set one")
        if self.context_dim is not None and self.conditioning == "adaln-zero":
            raise ValueError("text tokens (context_dim) need conditioning 'in-context' or 'cross-attention'")
        if self.sample_size % self.patch_size:
            raise ValueError(f"sample_size {self.sample_size} is not divisible by patch_size {self.patch_size}")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "DiTConfig":
        """From a diffusers DiTTransformer2DModel (or, in older repos, Transformer2DModel) config.json;
        absent keys take DiTTransformer2DModel's defaults."""
        checks = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                  "norm_elementwise_affine": False}
        for key, want in checks.items():
            if cfg.get(key, want) != want:
                raise ValueError(f"DiT config has {key}={cfg[key]!r}; only {want!r} (as DiT-XL/2) is implemented")
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels"),
            sample_size=cfg.get("sample_size", 32),
            patch_size=cfg.get("patch_size", 2),
            num_heads=cfg.get("num_attention_heads", 16),
            head_dim=cfg.get("attention_head_dim", 72),
            depth=cfg.get("num_layers", 28),
            num_classes=cfg.get("num_embeds_ada_norm", 1000),
            norm_eps=cfg.get("norm_eps", 1e-5),
        )


PRESETS = {
    # facebook/DiT-XL-2-256 and -512 (transformer/config.json; the paper's Table 1 and §5): 675 M
    # parameters, hidden 1152 = 16 heads x 72, 28 blocks, 2x2 patches of the 4-channel SD VAE
    # latent (32x32 or 64x64), 8 output channels (eps + learned variance), 1000 ImageNet classes.
    "dit-xl-2-256": DiTConfig(sample_size=32),
    "dit-xl-2-512": DiTConfig(sample_size=64),
}


def preset(name: str, **overrides) -> DiTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---- blocks ---------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention (fused q/k/v, biases, no QK-norm), or cross-attention to `context`."""

    def __init__(self, dim: int, num_heads: int, cross: bool = False):
        super().__init__()
        self.num_heads, self.cross = num_heads, cross
        if cross:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        """x (B, L, D) [, context (B, S, D)] -> (B, L, D)."""
        if self.cross:
            B, L, D = x.shape
            q = self.q(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
            kv = self.kv(context).reshape(B, context.shape[1], 2, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]
        else:
            q, k, v = split_heads(self.qkv(x), self.num_heads)
        return self.proj(attention(q, k, v, span=CROSS if self.cross else None))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.conditioning, self.norm_eps = cfg.conditioning, cfg.norm_eps
        self.attn = Attention(D, cfg.num_heads)
        self.mlp = mlp(D, cfg.mlp_ratio)
        if cfg.conditioning == "adaln-zero":
            self.modulation = Modulation(D, 6, zero_init=True)
            return
        self.norm1, self.norm2 = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=cfg.norm_eps)
        branches = [self.attn.proj, self.mlp.layers[2]]
        if cfg.conditioning == "cross-attention":
            self.norm_cross, self.cross_attn = nn.LayerNorm(D, eps=1e-6), Attention(D, cfg.num_heads, cross=True)
            branches.append(self.cross_attn.proj)
        for linear in branches:  # each residual branch starts at zero: the block is the identity
            linear.weight, linear.bias = mx.zeros_like(linear.weight), mx.zeros_like(linear.bias)

    def __call__(self, x: mx.array, c: mx.array, context: mx.array | None = None) -> mx.array:
        """x (B, L, D), c (B, D), context (B, S, D) for cross-attention -> (B, L, D)."""
        if self.conditioning == "adaln-zero":  # diffusers' AdaLayerNormZero: this chunk order
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
            x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x, 1e-6), shift_msa, scale_msa))
            return x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x, self.norm_eps), shift_mlp, scale_mlp))
        x = x + self.attn(self.norm1(x))
        if self.conditioning == "cross-attention":
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """LayerNorm, adaptive (shift, scale from c) under adaLN, then a Linear to p·p·out_channels."""

    def __init__(self, dim: int, out_dim: int, adaptive: bool):
        super().__init__()
        self.adaptive = adaptive
        if adaptive:
            self.modulation = Modulation(dim, 2, zero_init=True)
        else:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.linear.weight, self.linear.bias = mx.zeros_like(self.linear.weight), mx.zeros_like(self.linear.bias)

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        if self.adaptive:
            shift, scale = self.modulation(c)
            return self.linear(modulate(layer_norm(x, 1e-6), shift, scale))
        return self.linear(self.norm(x))


# ---- the model ------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _position_table(dim: int, grid_h: int, grid_w: int, base_size: int) -> mx.array:
    return sincos_2d_interpolated(dim, grid_h, grid_w, base_size)  # built once per grid, not per step


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Linear(cfg.in_channels * p * p, D)  # = the stride-p convolution
        self.t_embedder = MLPEmbedder(256, D)
        if cfg.num_classes is not None:
            self.y_embedder = nn.Embedding(cfg.num_classes + 1, D)  # the last row: the null class
        else:
            self.y_embedder = MLPEmbedder(cfg.text_dim, D)
        if cfg.context_dim is not None:
            self.txt_in = nn.Linear(cfg.context_dim, D)
        self.blocks = [DiTBlock(cfg) for _ in range(cfg.depth)]
        self.final_layer = FinalLayer(D, p * p * cfg.output_channels, adaptive=cfg.conditioning == "adaln-zero")

    @property
    def dtype(self) -> mx.Dtype:
        return self.x_embedder.weight.dtype

    @property
    def null_class(self) -> int:
        """The label of the unconditional branch of classifier-free guidance."""
        return self.config.num_classes

    def conditioning_vectors(self, timesteps: mx.array, y: mx.array) -> tuple[mx.array, mx.array]:
        """(t_emb, y_emb), each (B, D): the timestep and the class label or pooled text."""
        cfg = self.config
        # the sinusoid is float32 and is cast to the weights' dtype, as diffusers does (hidden_dtype)
        t_emb = self.t_embedder(ddpm_timestep_embedding(timesteps).astype(self.dtype))
        if cfg.num_classes is not None:
            if y.ndim != 1 or mx.issubdtype(y.dtype, mx.floating):
                raise ValueError(f"a class-conditioned DiT takes integer labels y (B,), got {y.dtype} {tuple(y.shape)}")
            return t_emb, self.y_embedder(y)
        if y.ndim != 2 or y.shape[-1] != cfg.text_dim:
            raise ValueError(f"a text-conditioned DiT takes pooled text y (B, {cfg.text_dim}), got {tuple(y.shape)}")
        return t_emb, self.y_embedder(y.astype(self.dtype))

    def position_table(self, grid_h: int, grid_w: int) -> mx.array:
        """(grid_h * grid_w, D) sin-cos table; other grids than the trained one are stretched over it."""
        return _position_table(self.config.hidden_size, grid_h, grid_w, self.config.sample_size // self.config.patch_size)

    def embed(self, x: mx.array, timesteps: mx.array, y: mx.array, context: mx.array | None = None):
        """-> (tokens (B, L, D), c (B, D), cross-attention context (B, S, D) or None)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be latents (B, h, w, {cfg.in_channels}), got {tuple(x.shape)}")
        B, h, w, _ = x.shape
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {cfg.patch_size}")
        if timesteps.shape != (B,):
            raise ValueError(f"timesteps must be (B,) = ({B},), got {tuple(timesteps.shape)}")
        if (context is not None) != (cfg.context_dim is not None):
            raise ValueError("pass text tokens (context) exactly when the model has context_dim set")
        tokens = self.x_embedder(pack_latents(x.astype(self.dtype), cfg.patch_size))
        # diffusers' PatchEmbed adds its float32 table to the tokens in float32, then casts back
        pos = self.position_table(h // cfg.patch_size, w // cfg.patch_size)
        tokens = (tokens.astype(mx.float32) + pos).astype(self.dtype)
        t_emb, y_emb = self.conditioning_vectors(timesteps, y)
        c = t_emb + y_emb
        if cfg.conditioning == "adaln-zero":
            return tokens, c, None
        cond = mx.stack([t_emb, y_emb], axis=1)  # (B, 2, D), plus any text tokens
        if context is not None:
            cond = mx.concatenate([cond, self.txt_in(context.astype(self.dtype))], axis=1)
        if cfg.conditioning == "in-context":
            return mx.concatenate([cond, tokens], axis=1), c, None
        return tokens, c, cond

    def head(self, tokens: mx.array, c: mx.array, h: int, w: int) -> mx.array:
        """Final layer and unpatchify: (B, L, D) -> (B, h, w, out_channels). In-context
        conditioning tokens (at the front) are dropped first."""
        tokens = tokens[:, tokens.shape[1] - (h // self.config.patch_size) * (w // self.config.patch_size) :]
        return unpatchify(self.final_layer(tokens, c), h, w, self.config.patch_size)

    def __call__(
        self,
        x: mx.array,  # (B, h, w, in_channels) latents
        timesteps: mx.array,  # (B,) DDPM timesteps in [0, 1000)
        y: mx.array,  # (B,) class labels (null class = num_classes) or (B, text_dim) pooled text
        context: mx.array | None = None,  # (B, S, context_dim) text tokens, in-context / cross-attention
        cache=None,  # a step_cache context: may skip all blocks but the first
    ) -> mx.array:  # (B, h, w, out_channels): eps [and the learned variance]
        tokens, c, ctx = self.embed(x, timesteps, y, context)

        def blocks(tokens, start, stop=None):
            for block in self.blocks[start:stop]:
                tokens = block(tokens, c, ctx)
            return tokens

        if cache is None:
            tokens = blocks(tokens, 0)
        else:  # one stream: the token sequence
            none = tokens[:, :0]
            tokens, _ = cache(tokens, none, lambda h, _: (blocks(h, 0, 1), none), lambda h, _: (blocks(h, 1), none))
        return self.head(tokens, c, x.shape[1], x.shape[2])


def initialize_weights(model: DiT, seed: int = 0) -> DiT:
    """The original DiT initialisation, for training: Xavier-uniform Linears (the patch embedding
    as one flattened matrix) with zero biases, N(0, 0.02) embeddings and timestep MLP. What the
    constructor zeroed (modulations, residual branches, final layer) stays zero."""
    mx.random.seed(seed)
    xavier, normal = nn.init.glorot_uniform(), nn.init.normal(std=0.02)
    zeroed = {k for k, v in tree_flatten(model.parameters()) if not mx.any(v != 0).item()}
    updates = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            init = normal if path.startswith("t_embedder") else xavier
            updates += [(f"{path}.weight", init(module.weight)), (f"{path}.bias", mx.zeros_like(module.bias))]
        elif isinstance(module, nn.Embedding):
            updates.append((f"{path}.weight", normal(module.weight)))
    model.load_weights([(k, mx.zeros_like(v) if k in zeroed else v) for k, v in updates], strict=False)
    return model
