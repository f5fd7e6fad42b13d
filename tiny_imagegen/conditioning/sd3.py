"""SD3's text conditioning: three encoders, one token sequence and one pooled vector per prompt.

    CLIP-L (768) and OpenCLIP bigG (1280): 77 tokens each, the *penultimate* layer's states
    (before the final LayerNorm; `clip_skip` k reads k layers earlier), joined channel-wise (2048)
    and zero-padded to T5's width (4096);
    T5-XXL: 256 tokens (its final states), appended along the sequence -> (B, 77 + 256, 4096);
    pooled: CLIP-L's and bigG's projected end-of-text vectors joined -> (B, 2048).

As StableDiffusion3Pipeline does it (SP:233-536), quirks included: no attention mask for any of
the three (CLIP's causal mask only; T5 attends to its padding, SP:260-276), every one of the 77
CLIP rows goes on (padding rows too, which depend on the pad token: "!" for bigG, SP:306-331),
both CLIP sequences in CLIP-L's dtype (SP:331). Without T5 (`t5=None`, the reference's
`text_encoder_3=None`, SP:247-256) its 256 rows are zeros in CLIP-L's dtype: 9.5 GB saved (bf16)
for a small loss of prompt following (what the reference allows, hence `--no-t5`).
"""

import mlx.core as mx
import mlx.nn as nn


class SD3TextEncoders:
    """prompts -> {"txt": (B, 77 + L_t5, joint_dim), "pooled": (B, pooled_l + pooled_g)}."""

    def __init__(self, clip_l_tokenizer, clip_l, clip_g_tokenizer, clip_g, t5_tokenizer, t5, joint_dim: int,
                 t5_length: int = 256):
        self.clip_l_tokenizer, self.clip_l = clip_l_tokenizer, clip_l
        self.clip_g_tokenizer, self.clip_g = clip_g_tokenizer, clip_g
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5  # a model, a function loading it when first needed, or None
        self.joint_dim, self.t5_length = joint_dim, t5_length  # the pipeline's max_sequence_length

    def clip_states(self, tokenizer, model, prompts: list[str], clip_skip: int | None):
        """(hidden_states[-(clip_skip + 2)] (B, 77, D), projected pooled (B, P)) (SP:324-330)."""
        ids, _ = tokenizer(prompts)
        hidden, _, pooled = model.encode(ids)  # no attention mask: SD3 passes none (SP:324)
        k = 2 if clip_skip is None else clip_skip + 2
        if not 2 <= k <= len(hidden):
            raise ValueError(f"clip_skip {clip_skip}: CLIP has only {len(hidden) - 1} layers")
        return hidden[-k], pooled

    def __call__(self, prompts: list[str], clip_skip: int | None = None, use_t5: bool = True) -> dict:
        """`use_t5=False` (or no T5 given) puts zeros where T5's states go, without loading it."""
        l_states, l_pooled = self.clip_states(self.clip_l_tokenizer, self.clip_l, prompts, clip_skip)
        g_states, g_pooled = self.clip_states(self.clip_g_tokenizer, self.clip_g, prompts, clip_skip)
        dtype = l_states.dtype  # both sequences in CLIP-L's dtype (SP:331)
        clip = mx.concatenate([l_states, g_states.astype(dtype)], axis=-1)
        if clip.shape[-1] > self.joint_dim:
            raise ValueError(f"CLIP widths {l_states.shape[-1]} + {g_states.shape[-1]} exceed the transformer's "
                             f"text width {self.joint_dim}")
        clip = mx.pad(clip, [(0, 0), (0, 0), (0, self.joint_dim - clip.shape[-1])])  # SP:459
        if self.t5 is not None and use_t5 and not isinstance(self.t5, nn.Module):
            self.t5 = self.t5()  # loaded when first needed
        if self.t5 is None or not use_t5:
            t5 = mx.zeros((len(prompts), self.t5_length, self.joint_dim), dtype)
        else:
            ids, _ = self.t5_tokenizer(prompts, max_length=self.t5_length)
            t5 = self.t5(ids)  # no mask: the padding is attended to (SP:276)
        return {"txt": mx.concatenate([clip, t5.astype(dtype)], axis=1),
                "pooled": mx.concatenate([l_pooled, g_pooled.astype(l_pooled.dtype)], axis=-1)}
