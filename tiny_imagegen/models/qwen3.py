"""Qwen3 (Qwen team 2025), a decoder-only language model used here for its hidden states.

Z-Image and FLUX.2 klein condition on what a Qwen3 model computes for the prompt, not on the
words it would write next: Z-Image-Turbo takes `hidden_states[-2]` (the output after N-1 of
Qwen3-4B's N = 36 layers, un-normed), FLUX.2 klein concatenates `hidden_states[9]`,
`hidden_states[18]` and `hidden_states[27]` per token (3 x hidden features, pads kept). The LM head
is never used, so there is none here.

Qwen-Image reads Qwen2.5-VL-7B's language model the same way (`hidden_states[-1]`, after the final
norm). For text-only input that model is Qwen2 (REFERENCE-NOTES-TURN3 A1: its multimodal RoPE
gives every axis the position arange(L), which is the 1-D RoPE, bitwise): the same decoder with two
switches, `qkv_bias` (q/k/v projections with biases; o_proj without) and `qk_norm=False` (no
per-head RMSNorm of q and k). Its vision tower and LM head are never used.

The architecture, as transformers 5.24's `Qwen3Model` computes it:

- token embeddings (no position embeddings: RoPE carries the positions);
- N pre-norm decoder layers, x += attn(norm(x)); x += mlp(norm(x));
- attention with grouped queries (GQA, Ainslie et al. 2023): `num_key_value_heads` k/v heads,
  each shared by `num_attention_heads / num_key_value_heads` query heads; q and k are RMS-normed
  per head (a learned scale of `head_dim`) *before* RoPE; logits scaled by head_dim^-1/2;
- rotate-half RoPE (the halves (x[:d/2], x[d/2:]) pair up, not adjacent channels) with
  ω_j = theta^(-2j/d), theta = 1e6 for Qwen3;
- SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)), no biases anywhere;
- a final RMSNorm.

RMSNorm takes the mean square in float32, casts back, then multiplies by the weight in the model
dtype (two roundings in bf16): that is `mx.fast.rms_norm` (bitwise on MLX's CPU backend). RoPE's
angles are fp32 position x ω_j with ω_j rounded as torch rounds it; on bf16 inputs
`mx.fast.rope` is bitwise transformers' recipe too (cos/sin cast to bf16, each product rounded;
checked on the CPU backend).

The mask is "causal AND the key is not padding": position ids are arange(L) for pads too, and a
pad row attends to every real token before it (FLUX.2 keeps the pad rows, so this matters).

`hidden_states` is indexed as transformers' `output_hidden_states` tuple: 0 is the embedding
output, i the output of decoder layer i (un-normed), and the last entry, N, is the output of the
final norm. Only the layers an index needs are run.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..layers.activations import silu
from ..layers.attention import sdpa


@dataclass(frozen=True)
class Qwen3Config:
    """Defaults are transformers' `Qwen3Config` defaults, so a config.json missing a field
    means what it means to transformers; the published models are the presets below."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128  # an explicit field, not hidden_size / heads (2560 / 32 = 80 for Qwen3-4B)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # transformers' fallback when a config names none
    qkv_bias: bool = False  # Qwen2 / Qwen2.5-VL: q, k, v projections with biases
    qk_norm: bool = True  # Qwen3's per-head RMSNorm of q and k; Qwen2 has none

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3 config: {self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )

    @classmethod
    def from_config(cls, config: dict) -> "Qwen3Config":
        """From a transformers config.json of a Qwen3Model or Qwen3ForCausalLM, or of a
        Qwen2_5_VLForConditionalGeneration (its language model: `text_config`, or the top level
        in files written before transformers 5)."""
        if config.get("model_type") in QWEN2_5_VL_TYPES:
            return cls._from_qwen2_5_vl(config)
        if config.get("model_type", "qwen3") != "qwen3":
            raise ValueError(f"Qwen3 config: model_type is {config['model_type']!r}, not 'qwen3'")
        unsupported = {
            "hidden_act": (config.get("hidden_act", "silu"), "silu"),
            "attention_bias": (config.get("attention_bias", False), False),
            "use_sliding_window": (config.get("use_sliding_window", False), False),
        }
        for name, (found, supported) in unsupported.items():
            if found != supported:
                raise ValueError(f"Qwen3 config: {name}={found!r} is not supported (only {supported!r})")
        # transformers 5 writes `rope_parameters`; older files `rope_theta` (+ `rope_scaling`)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"Qwen3 config: rope type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", config.get("rope_theta", cls.rope_theta))
        heads = config.get("num_attention_heads", cls.num_attention_heads)
        kv_heads = config.get("num_key_value_heads") or heads  # None means MHA, as in transformers
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim", "rms_norm_eps")
        known = {name: config[name] for name in names if config.get(name) is not None}
        return cls(**known, num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=float(theta))

    @classmethod
    def _from_qwen2_5_vl(cls, config: dict) -> "Qwen3Config":
        text = {**config, **config.get("text_config", {})}
        # no fallbacks: transformers' defaults here are the 72B model's (REFERENCE-NOTES-TURN3 A1)
        names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [n for n in names if text.get(n) is None]
        if missing:
            raise ValueError(f"Qwen2.5-VL config: {', '.join(missing)} missing")
        if text.get("hidden_act", "silu") != "silu" or text.get("use_sliding_window"):
            raise ValueError("Qwen2.5-VL config: only SiLU without sliding-window attention is supported")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        heads = text["num_attention_heads"]
        return cls(
            **{n: text[n] for n in names}, num_key_value_heads=text.get("num_key_value_heads") or heads,
            head_dim=text["hidden_size"] // heads, rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1e6))), qkv_bias=True, qk_norm=False,
        )

    @classmethod
    def from_config_json(cls, path: str | Path) -> "Qwen3Config":
        return cls.from_config(json.loads(Path(path).read_text()))


# The published configs (Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json on the hub, not reachable
# here: the numbers as we know them), checked against the model cards' counts, which our
# parameter count reproduces: Qwen3-4B "4.0B parameters, 3.6B non-embedding, 36 layers, 32 heads
# for Q and 8 for KV", embeddings tied to the LM head (we have no LM head: 4.02 B here, 3.63 B
# without the embedding); the text encoder of Z-Image-Turbo and FLUX.2 klein 4B.
QWEN3_4B = Qwen3Config(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
)
# Qwen3-8B: "8.2B parameters, 6.95B non-embedding", same depth and heads, an untied LM head
# (dropped: 7.57 B here, 6.95 B without the embedding); the text encoder of FLUX.2 klein 9B.
QWEN3_8B = Qwen3Config(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
)


# Qwen2.5-VL-7B-Instruct's language model, Qwen-Image's text encoder (hub config unverified offline;
# 7,070,619,136 parameters, REFERENCE-NOTES-TURN3 A1); an untied LM head and a vision tower, unused
QWEN2_5_VL_TYPES = ("qwen2_5_vl", "qwen2_5_vl_text")
QWEN2_5_VL_7B = Qwen3Config(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
    qkv_bias=True, qk_norm=False,
)


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """ω_j = 1 / theta^(2j/d) in float32, rounded step by step as transformers computes it:
    the exponent in fp32, the power rounded to fp32, then an fp32 reciprocal. (Rounding the
    exact value once differs from torch in ~20 of 64 entries by an ulp, which reaches 3e-5 in cos
    at position 500; this way 1 entry of Qwen3's 64 differs, by an ulp of torch's own powf.)"""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        d, heads, kv_heads = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, d
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * d, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(heads * d, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array, rope_periods: mx.array) -> mx.array:
        # x: (B, L, D); mask: (B or 1, 1, L, L) bool, True where a query may read a key
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        # rotate-half RoPE at positions 0..L-1; `freqs` takes periods 1/ω_j (see rope_inverse_frequencies)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=None, scale=1.0, offset=0, freqs=rope_periods)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=None, scale=1.0, offset=0, freqs=rope_periods)
        # k, v keep their kv_heads: the kernel shares each among its group of query heads (GQA)
        out = sdpa(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))  # silu rounded once, as torch


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def __call__(self, x: mx.array, mask: mx.array, rope_periods: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask, rope_periods)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_padding_mask(length: int, key_is_real: mx.array | None = None) -> mx.array:
    """Causal AND not padding: (B or 1, 1, L, L) bool, True where query i may read key j,
    i.e. j <= i and key_is_real[b, j]. key_is_real: (B, L), nonzero for real tokens."""
    positions = mx.arange(length)
    mask = (positions[None, :] <= positions[:, None])[None, None]
    if key_is_real is None:
        return mask
    return mask & key_is_real.astype(mx.bool_)[:, None, None, :]


def hidden_state_indices(indices: Sequence[int], num_hidden_layers: int) -> list[int]:
    """Indices into the (N + 1)-entry hidden_states tuple, negative ones counted from its end
    (-1 = N, after the final norm; -2 = N - 1). Entry i needs the first i decoder layers, so
    max(result) is how many a model must have."""
    n = num_hidden_layers
    if isinstance(indices, int):
        raise TypeError("Qwen3: indices must be a sequence of ints, e.g. (-2,) or (9, 18, 27)")
    bad = [i for i in indices if not -(n + 1) <= i <= n]
    if bad:
        raise ValueError(f"Qwen3: hidden state index {bad[0]} is out of range for {n} layers (0..{n}, or -{n + 1}..-1)")
    return [i % (n + 1) for i in indices]


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config = QWEN3_4B, num_layers: int | None = None):
        """`num_layers` builds only the first decoder layers, for a pipeline that reads an early
        hidden state (FLUX.2 klein needs 27 of Qwen3's 36, Z-Image 35); entries past them raise."""
        super().__init__()
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"Qwen3: num_layers must be 0..{config.num_hidden_layers}, got {num_layers}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Qwen3DecoderLayer(config) for _ in range(num_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._rope_periods = mx.array(1.0 / rope_inverse_frequencies(config.head_dim, config.rope_theta))

    def hidden_states(
        self, input_ids: mx.array, attention_mask: mx.array | None = None, indices: Sequence[int] = (-1,)
    ) -> list[mx.array]:
        """The entries `indices` of transformers' `hidden_states` tuple (N + 1 entries, negative
        indices count from its end): 0 = token embeddings, i = output of decoder layer i,
        N (= -1) = after the final norm. Each (B, L, hidden_size) in the model's dtype.

        input_ids (B, L) int; attention_mask (B, L), 1 for real tokens, 0 for padding (right
        padding: every row starts with a real token). Runs only max(indices) layers.
        Z-Image: `indices=(-2,)`; FLUX.2 klein: `indices=(9, 18, 27)`, concatenated per token."""
        wanted = self._resolve(indices)
        x, mask = self._embed(input_ids, attention_mask)
        found = {0: x}
        for i, layer in enumerate(self.layers[: max(wanted, default=0)], start=1):
            x = layer(x, mask, self._rope_periods)
            if i in wanted:  # keep only the entries asked for
                found[i] = x
        if self.config.num_hidden_layers in wanted:
            found[self.config.num_hidden_layers] = self.norm(x)
        return [found[i] for i in wanted]

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """The last hidden state (after the final norm): (B, L, hidden_size)."""
        return self.hidden_states(input_ids, attention_mask, (-1,))[0]

    def _resolve(self, indices: Sequence[int]) -> list[int]:
        resolved = hidden_state_indices(indices, self.config.num_hidden_layers)
        needed = max(resolved, default=0)
        if needed > len(self.layers):
            raise ValueError(f"Qwen3: hidden state {needed} needs {needed} layers, but this model was built "
                             f"with num_layers={len(self.layers)}")
        return resolved

    def _embed(self, input_ids: mx.array, key_is_real: mx.array | None) -> tuple[mx.array, mx.array]:
        if input_ids.ndim != 2:
            raise ValueError(f"Qwen3: input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if key_is_real is not None:
            if key_is_real.shape != input_ids.shape:
                raise ValueError(
                    f"Qwen3: attention_mask shape {tuple(key_is_real.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            # a row whose first token is padding has a query that sees no key at all (left padding)
            if not bool(mx.all(key_is_real[:, 0] != 0)):
                raise ValueError("Qwen3: every row must start with a real token (right padding; mask[:, 0] == 1)")
        return self.embed_tokens(input_ids), causal_padding_mask(input_ids.shape[1], key_is_real)
