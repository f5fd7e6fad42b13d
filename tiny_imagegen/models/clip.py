"""CLIP's text transformer (Radford et al. 2021), whose pooled output is FLUX's global text vector.

A GPT-2-style pre-LayerNorm transformer over at most 77 tokens: token plus learned absolute
position embeddings, causal self-attention (each token sees itself and the tokens before it),
an MLP with quick-GELU x·σ(1.702x) (or exact GELU where the config says `gelu`), a final
LayerNorm. The *pooled* output is the final hidden state at the end-of-text token: with causal
attention that position has read the whole prompt, and nothing after it (padding) can change it.
FLUX uses it without CLIP's projection head (768 numbers for ViT-L/14); SD3 with it
(`CLIPTextModelWithProjection`, CLIP-L and OpenCLIP bigG), and reads a layer's hidden states too
(`encode`: the penultimate layer's, before the final LayerNorm).

Which position is "the end-of-text token" follows transformers 5.24 (`CLIPTextModel.forward`):
- configs with `eos_token_id == 2` (the value openai/clip-vit-large-patch14 and FLUX's
  text_encoder/config.json carry, from before transformers PR #24773): the position of the
  largest token id in each row (`argmax`, first one on ties), which is `<|endoftext|>` because
  it is the last entry of CLIP's vocabulary;
- any other `eos_token_id`: the first position holding that id.
Both give the same position for prompts made by CLIP's tokenizer, padded with `<|endoftext|>` or `!`.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..layers.attention import sdpa

ACTIVATIONS = {"quick_gelu": nn.gelu_fast_approx, "gelu": nn.gelu}
LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # transformers' default; see CLIP_VIT_L14_TEXT
    projection_dim: int = 768  # the width of CLIPTextModelWithProjection's text_projection

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP config: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPTextConfig":
        """From a transformers config.json: a CLIPTextModel's, or a CLIPModel's `text_config`."""
        config = config.get("text_config", config)
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    @classmethod
    def from_config_json(cls, path: str | Path) -> "CLIPTextConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# openai/clip-vit-large-patch14's text model, FLUX's text_encoder (123 M parameters); its
# config.json (FLUX's too) still has the legacy eos_token_id 2
CLIP_VIT_L14_TEXT = CLIPTextConfig(eos_token_id=LEGACY_EOS_TOKEN_ID)


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        # x: (B, L, D); mask: additive, (B or 1, 1, L, L)
        B, L, D = x.shape
        q, k, v = (p(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = sdpa(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig = CLIP_VIT_L14_TEXT):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """input_ids (B, L) -> (hidden states (B, L, D), pooled (B, D)). An `attention_mask`
        (B, L) additionally hides keys where it is 0 (FLUX passes none)."""
        _, x, pooled = self.encode(input_ids, attention_mask)
        return x, pooled

    def encode(self, input_ids: mx.array, attention_mask: mx.array | None = None):
        """-> (hidden_states, last, pooled): hidden_states as transformers' `output_hidden_states`
        gives them, the embeddings then every layer's output (N + 1 of (B, L, D); the last entry is
        *not* final-normed), `last` the final LayerNorm's output, `pooled` its end-of-text row."""
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"CLIP: {L} tokens, more than the {self.config.max_position_embeddings} positions it has")
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:L]
        visible = mx.tril(mx.ones((L, L), dtype=mx.bool_))[None, None]
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, :].astype(mx.bool_)
        mask = mx.where(visible, 0.0, -mx.inf).astype(x.dtype)  # additive, in the weights' dtype
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        x = self.final_layer_norm(x)
        return hidden_states, x, x[mx.arange(B), self.end_of_text_positions(input_ids)]

    def end_of_text_positions(self, input_ids: mx.array) -> mx.array:
        """(B,) index of the token the pooled output is read from (see the module docstring)."""
        eos = self.config.eos_token_id
        if eos == LEGACY_EOS_TOKEN_ID:
            return mx.argmax(input_ids, axis=-1)
        found = input_ids == eos
        if not mx.all(mx.any(found, axis=-1)).item():
            raise ValueError(f"CLIP: a prompt has no end-of-text token (id {eos}) to pool from")
        return mx.argmax(found.astype(mx.int32), axis=-1)


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP's text model with its projection head (no bias): pooled -> text_projection(pooled),
    the `text_embeds` SD3 pools (CLIP-L 768, OpenCLIP bigG 1280)."""

    def __init__(self, config: CLIPTextConfig = CLIP_VIT_L14_TEXT):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def encode(self, input_ids: mx.array, attention_mask: mx.array | None = None):
        hidden_states, last, pooled = super().encode(input_ids, attention_mask)
        return hidden_states, last, self.text_projection(pooled)
