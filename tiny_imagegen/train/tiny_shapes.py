"""tiny-shapes: FLUX's architecture at a size that trains on two CPU cores in under two hours.

The same components and code paths as FLUX.1, each shrunk:

    VAE          our AutoencoderKL, 3 levels (16, 32, 32 channels): 64x64 RGB -> 16x16x4 latents (4x down)
    tokenizer    a SentencePiece BPE model (100 pieces) trained on the dataset's captions, T5's conventions
    text encoder a 2-layer T5 v1.1 encoder (d_model 128), trained from scratch with the MM-DiT
    pooled text  the masked mean of the T5 hidden states (FLUX uses CLIP's pooled output here;
                 one encoder is enough for a closed caption grammar)
    MM-DiT       hybrid, 2 double + 2 single blocks, hidden 128 = 2 heads x 64, 2-D mixed RoPE
                 (image tokens at centred (row, col), text on the diagonal beyond the grid, as MSRoPE);
                 the 16x16x4 latent is packed 2x2 as FLUX packs it: 64 tokens of 16 channels

Training (examples/train_tiny.py): the VAE first (L1 + L2 reconstruction, a small KL), then the
T5 + MM-DiT on the VAE's latents with the flow-matching loss (train/objectives.py: logit-normal
t), 10% of captions dropped to the empty caption so that classifier-free guidance works.

Sampling: Euler steps on FLUX's unshifted linear schedule (64 tokens is below FLUX's shift range)
with classifier-free guidance, v = v(∅) + g (v(c) - v(∅)).

Weights folder (`save_tiny_shapes`): our converted format (checkpoints/convert.py):
`transformer.safetensors`, `t5.safetensors`, `vae.safetensors`, the tokenizer in `tokenizer_2/`,
and `model.json` with the configs, size + SHA-256 of every file and the sampling recipe ("t5-mean"
text, steps, guidance). There is no sampler here: the generic Pipeline loads the folder as
`--model tiny-shapes` and samples it exactly as it samples FLUX (`load_pipeline`).
"""

import io
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.mmdit import MMDiT, MMDiTConfig
from ..models.t5 import T5Config, T5Encoder
from ..models.vae import AutoencoderKL, VAEConfig
from ..text.t5_sentencepiece import T5Tokenizer
from ..conditioning.t5_clip import masked_mean
from .objectives import flow_matching_loss, interpolate
from .shapes_dataset import sample_scene

IMAGE_SIZE = 64
PATCH = 2  # FLUX's 2x2 latent packing
MAX_LENGTH = 16  # text tokens: the longest caption of the grammar is 15 pieces + </s>
VOCAB_SIZE = 100
TOKENIZER_SEED, TOKENIZER_CAPTIONS = 1234, 4000


def vae_config() -> VAEConfig:
    # scaling/shift are set from the encoded training set after the VAE is trained
    return VAEConfig(latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     scaling_factor=1.0, shift_factor=0.0)


def t5_config(vocab_size: int = VOCAB_SIZE) -> T5Config:
    return T5Config(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=16, relative_attention_max_distance=32)


def mmdit_config(latent_channels: int = 4, text_dim: int = 128) -> MMDiTConfig:
    return MMDiTConfig(in_channels=latent_channels * PATCH * PATCH, num_heads=2, head_dim=64, depth_double=2,
                       depth_single=2, mlp_ratio=4.0, context_dim=text_dim, vec_dim=text_dim, rope="mixed")


# ---- the tokenizer -------------------------------------------------------------------------------


def train_tokenizer(folder: Path, vocab_size: int = VOCAB_SIZE) -> T5Tokenizer:
    """A SentencePiece BPE model on captions of the train split (deterministic: fixed captions,
    one thread), written as `spiece.model` + `tokenizer_config.json` (no sentinel ids)."""
    import sentencepiece

    captions = [sample_scene(TOKENIZER_SEED, i, "train").caption for i in range(TOKENIZER_CAPTIONS)]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(proto.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 0, "model_max_length": MAX_LENGTH}))
    return T5Tokenizer.from_folder(folder, max_length=MAX_LENGTH)


# ---- the denoiser: text encoder + MM-DiT, trained together ----------------------------------------


class TinyDenoiser(nn.Module):
    """v_θ(x_t, t, caption): the T5 encoder and the MM-DiT as one trainable module."""

    def __init__(self, text_encoder: T5Encoder, transformer: MMDiT, latent_size: int = IMAGE_SIZE // 4):
        super().__init__()
        t5, mm = text_encoder.config, transformer.config
        if mm.context_dim != t5.d_model or mm.vec_dim != t5.d_model:
            raise ValueError(f"MM-DiT context/vec dims {mm.context_dim}/{mm.vec_dim} != T5 width {t5.d_model}")
        self.text_encoder, self.transformer = text_encoder, transformer
        txt_ids, img_ids = transformer.position_ids(latent_size // PATCH, latent_size // PATCH, MAX_LENGTH)
        self._txt_ids, self._img_ids = mx.array(txt_ids), mx.array(img_ids)  # (16, 2), (64, 2)

    @classmethod
    def from_configs(cls, t5: T5Config, mmdit: MMDiTConfig, latent_size: int = IMAGE_SIZE // 4) -> "TinyDenoiser":
        return cls(T5Encoder(t5), MMDiT(mmdit), latent_size)

    def encode_text(self, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        """ids, mask (B, L) -> hidden states (B, L, D) and pooled vector (B, D), the mean over
        the caption's own tokens (mask 1). As in FLUX, T5 itself gets no mask (padding is
        attended to and passed on), which is what the generic pipeline does (text_conditioning.PooledT5Text)."""
        h = self.text_encoder(ids)
        return h, masked_mean(h, mask)

    def __call__(self, x_t: mx.array, t: mx.array, txt: mx.array, pooled: mx.array) -> mx.array:
        """x_t (B, 64, 16) packed latents, t (B,) -> velocity (B, 64, 16)."""
        return self.transformer(x_t, self._img_ids, txt, self._txt_ids, t, pooled)


def denoiser_loss(model: TinyDenoiser, x0, ids, mask, noise, t) -> mx.array:
    """The flow-matching loss of one batch: x0, noise (B, 64, 16) packed latents, ids/mask (B, L), t (B,)."""
    txt, pooled = model.encode_text(ids, mask)
    return flow_matching_loss(model(interpolate(x0, noise, t), t, txt, pooled), x0, noise)


def init_for_training(denoiser: TinyDenoiser) -> TinyDenoiser:
    """adaLN-Zero (DiT §3.2): every modulation and the final projection start at zero, so every
    block starts as the identity and the output at 0."""
    mmdit = denoiser.transformer
    for _, module in mmdit.named_modules():
        if type(module).__name__ == "Modulation":
            module.lin.weight = mx.zeros_like(module.lin.weight)
            module.lin.bias = mx.zeros_like(module.lin.bias)
    mmdit.final_layer.linear.weight = mx.zeros_like(mmdit.final_layer.linear.weight)
    mmdit.final_layer.linear.bias = mx.zeros_like(mmdit.final_layer.linear.bias)
    return denoiser


# ---- the shipped folder, and sampling it with the generic pipeline -------------------------------


# How the generic pipeline samples it (pipelines/pipeline.py reads this recipe from model.json).
SAMPLING_DEFAULTS = {"steps": 20, "guidance": 4.0, "shift": False, "text_length": MAX_LENGTH,
                     "width": IMAGE_SIZE, "height": IMAGE_SIZE}


def save_tiny_shapes(folder: str | Path, vae: AutoencoderKL, denoiser: TinyDenoiser, tokenizer_folder: Path,
                     sampling: dict | None = None, training: dict | None = None) -> Path:
    """Our converted format (checkpoints/convert.py): transformer / t5 / vae safetensors, the
    tokenizer as `tokenizer_2/` (FLUX's slot for the T5 tokenizer), sizes and SHA-256 of every
    file and the sampling recipe in model.json. Replaces `folder` if it exists."""
    from ..checkpoints.convert import save_converted

    recipe = {"family": "flux1", "name": "tiny-shapes", "text": "t5-mean", "defaults": {**SAMPLING_DEFAULTS, **(sampling or {})}}
    return save_converted(
        folder, {"transformer": denoiser.transformer, "t5": denoiser.text_encoder, "vae": vae},
        copy={"tokenizer_2": Path(tokenizer_folder)}, source={"trained_with": "examples/train_tiny.py", **(training or {})},
        pipeline=recipe, force=True,
    )


def load_pipeline(folder: str | Path = "weights/tiny-shapes"):
    """The shipped model as the generic Pipeline runs it (the CLI's path), in fp32 and with the
    text encoder kept for many prompts. Every file's size and SHA-256 is checked against
    model.json first, so a truncated or altered file fails by name."""
    from ..pipelines.pipeline import Pipeline

    return Pipeline.from_pretrained(str(folder), dtype=mx.float32, keep_text_encoders=True, verify=True)


def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int | None = None,
                    guidance: float | None = None) -> np.ndarray:
    """(B, 64, 64, 3) uint8 images, prompt i from noise seed i (independent of the rest of the batch)."""
    images = pipe.generate(list(prompts), seed=list(seeds), steps=steps, guidance=guidance)
    return np.stack([np.asarray(image) for image in images])
