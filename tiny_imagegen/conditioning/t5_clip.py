"""FLUX's text conditioning: prompts -> (T5 sequence, T5 mask, CLIP pooled vector).

FLUX reads each prompt twice. T5-v1.1-XXL's encoder turns it into a sequence of 4096-wide token
states, the text stream of the MM-DiT: 256 tokens for schnell, 512 for dev, padded with `<pad>`
and, as in both the original code and diffusers, not masked: padding positions are attended to
and passed on. CLIP ViT-L/14's text model gives one 768-wide vector (its pooled output) that joins
the timestep in the adaLN conditioning vector. The T5 mask is returned for models that want it.

Memory at full size (parameters x bytes): T5 encoder 4.76 B -> 9.5 GB in bf16, 19.0 GB in fp32
(with 8-bit linears: 5.2 GB, 4-bit: 2.9 GB); CLIP text 123 M -> 0.25 GB in bf16, 0.49 GB in fp32.
Weights are read lazily, when first evaluated. `encode_prompts` encodes with CLIP, lets it go,
then with T5, and lets that go too, so the denoiser can be loaded into the memory they held.

    from tiny_imagegen.conditioning.t5_clip import encode_prompts
    t5_sequence, t5_mask, clip_pooled = encode_prompts("FLUX.1-schnell", ["a cat"], max_sequence_length=256)
"""

import gc
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from ..checkpoints.text_encoders import load_clip_text_model, load_t5_encoder
from ..text import CLIPTokenizer, T5Tokenizer


class TextConditioning(NamedTuple):
    t5_sequence: mx.array  # (B, L, 4096): the MM-DiT's text tokens
    t5_mask: mx.array  # (B, L) int32: 1 on prompt tokens and </s>, 0 on padding
    clip_pooled: mx.array  # (B, 768): into the adaLN vector


def default_dtype() -> mx.Dtype:
    """bf16 on a GPU (Apple, CUDA); fp32 on a CPU, where MLX's bf16 matmuls are slow."""
    return mx.bfloat16 if mx.default_device().type == mx.gpu else mx.float32


class FluxTextEncoders:
    """Both tokenizers and both encoders of a FLUX repository folder, for encoding more than once."""

    def __init__(self, clip_tokenizer, clip, t5_tokenizer, t5):
        self.clip_tokenizer, self.clip = clip_tokenizer, clip
        self.t5_tokenizer, self.t5 = t5_tokenizer, t5

    @classmethod
    def from_folder(
        cls, folder: str | Path, max_sequence_length: int = 512, dtype: mx.Dtype | None = None, t5_bits: int | None = None
    ) -> "FluxTextEncoders":
        """`folder` holds text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/ as the FLUX
        repositories do. `max_sequence_length`: 256 for schnell, 512 for dev. `t5_bits`: 4 or 8 to
        quantize T5's linear layers."""
        folder = Path(folder)
        dtype = dtype or default_dtype()
        t5 = load_t5_encoder(folder / "text_encoder_2", dtype)
        if t5_bits:
            t5.quantize(bits=t5_bits)
        return cls(
            CLIPTokenizer.from_folder(folder / "tokenizer"),
            load_clip_text_model(folder / "text_encoder", dtype),
            T5Tokenizer.from_folder(folder / "tokenizer_2", max_length=max_sequence_length),
            t5,
        )

    def encode_clip(self, prompts: list[str]) -> mx.array:
        ids, _ = self.clip_tokenizer(prompts)
        _, pooled = self._require(self.clip, "CLIP")(ids)  # causal mask only, as FLUX
        return pooled

    def encode_t5(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        ids, mask = self.t5_tokenizer(prompts)
        return self._require(self.t5, "T5")(ids), mask  # no padding mask, as FLUX

    def __call__(self, prompts: str | list[str]) -> TextConditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        pooled = self.encode_clip(prompts)
        sequence, mask = self.encode_t5(prompts)
        mx.eval(sequence, pooled)
        return TextConditioning(sequence, mask, pooled)

    def release(self, which: str = "both") -> None:
        """Drop the encoders' weights ("clip", "t5" or "both"); the tokenizers stay."""
        if which in ("clip", "both"):
            self.clip = None
        if which in ("t5", "both"):
            self.t5 = None
        gc.collect()
        mx.clear_cache()

    @staticmethod
    def _require(model, name: str):
        if model is None:
            raise RuntimeError(f"the {name} encoder was released; load the encoders again to encode")
        return model


def encode_prompts(
    folder: str | Path,
    prompts: str | list[str],
    max_sequence_length: int = 512,
    dtype: mx.Dtype | None = None,
    t5_bits: int | None = None,
) -> TextConditioning:
    """The single call: load both encoders of a FLUX folder lazily, encode `prompts`, release them.
    Returns (t5_sequence (B, L, 4096), t5_mask (B, L), clip_pooled (B, 768)) with
    L = max_sequence_length (schnell: 256, dev: 512)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    encoders = FluxTextEncoders.from_folder(folder, max_sequence_length, dtype, t5_bits)
    pooled = encoders.encode_clip(prompts)
    mx.eval(pooled)
    encoders.release("clip")
    sequence, mask = encoders.encode_t5(prompts)
    mx.eval(sequence)
    encoders.release("t5")
    return TextConditioning(sequence, mask, pooled)


# ---- one T5, no CLIP (tiny-shapes) ----------------------------------------------------------------


def masked_mean(h: mx.array, mask: mx.array) -> mx.array:
    """(B, L, D) hidden states, (B, L) mask -> (B, D): the mean over each prompt's own tokens
    (mask 1), the pooled vector of a model with one T5 and no CLIP. Padding never moves it."""
    m = mask.astype(h.dtype)[..., None]
    return (h * m).sum(axis=1) / m.sum(axis=1)


class PooledT5Text:
    """prompts -> (T5 sequence (B, L, D), its masked mean (B, D)): one small encoder for both of
    the MM-DiT's text inputs, as the tiny-shapes model is trained. T5 itself gets no mask, as in FLUX."""

    def __init__(self, tokenizer: T5Tokenizer, t5):
        self.tokenizer, self.t5 = tokenizer, t5

    def __call__(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        ids, mask = self.tokenizer(prompts)
        seq = self.t5(ids)
        return seq, masked_mean(seq, mask)
