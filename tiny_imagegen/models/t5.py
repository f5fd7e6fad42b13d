"""The T5 v1.1 encoder (Raffel et al. 2020), whose output sequence is FLUX's text stream.

A pre-norm transformer encoder with four choices of its own:

- Positions enter only as a learned bias on the attention logits, one scalar per head and
  *relative position bucket* (Shaw et al. 2018, bucketed as in T5 §2.1): offsets below 8 in
  either direction get a bucket each, larger ones share logarithmically wider buckets up to a
  distance of 128. The bias table belongs to the first layer in the checkpoint, but the bias it
  gives is computed once and added in every layer.
- No 1/sqrt(d) scaling of the logits (T5 folds it into the initialisation of the weights).
- RMSNorm (Zhang & Sennrich 2019) without mean subtraction or bias; the mean square is
  taken in float32 whatever the weights' dtype.
- v1.1's gated feed-forward, GEGLU (Shazeer 2020): wo(gelu_tanh(wi_0 x) * wi_1 x).

Names follow the transformers checkpoint where they read well (q, k, v, o, wi_0, wi_1, wo).
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..layers.activations import gelu_tanh
from ..layers.attention import sdpa


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_dict(cls, config: dict) -> "T5Config":
        """From a transformers config.json (T5EncoderModel / T5ForConditionalGeneration)."""
        ff = config.get("feed_forward_proj", "gated-gelu")
        if ff != "gated-gelu":
            raise ValueError(f"T5 config: feed_forward_proj {ff!r} is not supported (only v1.1's 'gated-gelu')")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    @classmethod
    def from_config_json(cls, path: str | Path) -> "T5Config":
        return cls.from_dict(json.loads(Path(path).read_text()))


# google/t5-v1_1-xxl, the encoder of FLUX's text_encoder_2 (4.76 B parameters)
T5_V1_1_XXL = T5Config()


def relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    """Bidirectional T5 buckets for offsets `key - query`: half of the buckets per direction;
    in each half, exact buckets for |offset| < num_buckets/4, then log-spaced up to max_distance."""
    num_buckets //= 2
    direction = (relative_position > 0).astype(mx.int32) * num_buckets
    distance = mx.abs(relative_position)
    max_exact = num_buckets // 2
    # float32 log as in the reference: the truncation to int decides the bucket at the edges
    log_ratio = mx.log(distance.astype(mx.float32) / max_exact) / math.log(max_distance / max_exact)
    far = max_exact + (log_ratio * (num_buckets - max_exact)).astype(mx.int32)
    far = mx.minimum(far, num_buckets - 1)
    return direction + mx.where(distance < max_exact, distance, far)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        # x: (B, L, D); bias: (B or 1, H, L, L), relative positions plus any padding mask
        B, L, _ = x.shape
        q, k, v = (proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for proj in (self.q, self.k, self.v))
        out = sdpa(q, k, v, scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class T5FeedForward(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(gelu_tanh(self.wi_0(x)) * self.wi_1(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attn = T5Attention(config)
        self.ff_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.ff = T5FeedForward(config)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nn.Module):
    # T5 v1.1 was trained in bfloat16 and its feed-forward outputs overflow float16: transformers
    # keeps the `wo` layers in float32 (`_keep_in_fp32_modules`) and clamps every block's output.
    unsupported_dtypes = {mx.float16: "T5 v1.1's feed-forward outputs overflow float16 (max 65504); use bfloat16 or float32"}

    def __init__(self, config: T5Config = T5_V1_1_XXL):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.blocks = [T5Block(config) for _ in range(config.num_layers)]
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def position_bias(self, length: int) -> mx.array:
        """The learned bias for every (query, key) pair: (1, H, L, L)."""
        positions = mx.arange(length)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None],
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """input_ids (B, L) -> hidden states (B, L, D). With `attention_mask` (B, L), keys where
        it is 0 are not attended to (FLUX's pipelines pass none: padding is attended)."""
        if input_ids.ndim != 2:
            raise ValueError(f"T5Encoder: input_ids must be (batch, length), got shape {input_ids.shape}")
        x = self.embed_tokens(input_ids)
        bias = self.position_bias(input_ids.shape[1])
        if attention_mask is not None:
            bias = bias + mx.where(attention_mask[:, None, None, :].astype(mx.bool_), 0.0, -mx.inf)
        bias = bias.astype(x.dtype)  # once, not per layer (the logits and softmax: inside the fused attention)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)

    def quantize(self, bits: int = 8, group_size: int = 64) -> "T5Encoder":
        """Quantize the linear layers in place (`nn.quantize`, affine, per group of `group_size`
        input weights); embeddings and norms stay as they are. Of T5-XXL's 4.76 B parameters,
        4.63 B are in linear layers."""
        nn.quantize(self, group_size=group_size, bits=bits, class_predicate=lambda _, m: isinstance(m, nn.Linear))
        return self
