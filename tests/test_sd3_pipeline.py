"""SD3 / SD3.5 text side and pipeline against diffusers' StableDiffusion3Pipeline on a tiny random
repo (fixtures from tests/reference/sd3_pipeline.py)."""

import mlx.core as mx
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.text_encoders import load_clip_text_model, load_t5_encoder
from tiny_imagegen.models.clip import CLIPTextModelWithProjection
from tiny_imagegen.sd3_conditioning import SD3TextEncoders
from tiny_imagegen.text import CLIPTokenizer, T5Tokenizer

PROMPTS = ["a red circle to the left of a blue square", "Ein Café in Tōkyō"]
T5_LENGTH = 16


def encoders(dtype=None, t5=True) -> SD3TextEncoders:
    repo = fixture_path("sd3_pipeline", "repo")
    return SD3TextEncoders(
        CLIPTokenizer.from_folder(repo / "tokenizer"), load_clip_text_model(repo / "text_encoder", dtype),
        CLIPTokenizer.from_folder(repo / "tokenizer_2"), load_clip_text_model(repo / "text_encoder_2", dtype),
        T5Tokenizer.from_folder(repo / "tokenizer_3"), load_t5_encoder(repo / "text_encoder_3", dtype) if t5 else None,
        joint_dim=64, t5_length=T5_LENGTH)


@pytest.fixture(scope="module")
def io():
    return load_fixture("sd3_pipeline", "io.safetensors")


def test_encode_prompt_matches_diffusers(io):
    enc = encoders()
    assert isinstance(enc.clip_l, CLIPTextModelWithProjection) and enc.clip_g_tokenizer.pad_id != enc.clip_l_tokenizer.pad_id
    pos, neg = enc(PROMPTS), enc(["", ""])
    assert pos["txt"].shape == (2, 77 + T5_LENGTH, 64)
    assert_close("sd3 prompt_embeds", pos["txt"], io["enc.prompt_embeds"], atol=2e-5)
    assert_close("sd3 pooled_prompt_embeds", pos["pooled"], io["enc.pooled"], atol=2e-5)
    assert_close("sd3 negative_prompt_embeds ('')", neg["txt"], io["enc.negative_embeds"], atol=2e-5)
    assert_close("sd3 negative_pooled ('')", neg["pooled"], io["enc.negative_pooled"], atol=2e-5)


def test_clip_skip_and_negatives_ignore_it(io):
    enc = encoders()
    assert_close("sd3 prompt_embeds clip_skip=1", enc(PROMPTS, clip_skip=1)["txt"], io["enc_skip1.prompt_embeds"], atol=2e-5)
    # the reference encodes negatives with clip_skip=None whatever clip_skip is (SP:496,503)
    assert_close("sd3 negative embeds with clip_skip=1 given", enc(["", ""])["txt"], io["enc_skip1.negative_embeds"], atol=2e-5)
    with pytest.raises(ValueError, match="clip_skip 3: CLIP has only 3 layers"):
        enc(PROMPTS, clip_skip=3)


def test_without_t5_zeros(io):
    out = encoders(t5=False)(PROMPTS)
    assert_close("sd3 prompt_embeds without T5", out["txt"], io["enc_no_t5.prompt_embeds"], atol=2e-5)
    assert float(mx.max(mx.abs(out["txt"][:, 77:]))) == 0.0


def test_encode_prompt_bf16(io):
    out = encoders(mx.bfloat16)(PROMPTS)
    assert_bf16_parity("sd3 prompt_embeds", out["txt"], io["enc.prompt_embeds"], io["enc_bf16.prompt_embeds"])
    assert_bf16_parity("sd3 pooled", out["pooled"], io["enc.pooled"], io["enc_bf16.pooled"])
