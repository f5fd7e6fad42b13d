"""Qwen-Image's text side against the references (fixtures from tests/reference/qwen_image_text.py):
Qwen2.5-VL's language model as Qwen3 with two switches (q/k/v biases, no q/k norm) against
transformers' Qwen2_5_VLForConditionalGeneration, fp32 and bf16, batch 2 with padding; the prompt
encoding against diffusers' QwenImagePipeline.encode_prompt; the full-size manifest."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.mapping import map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.qwen3 import QWEN2_5_VL, load_qwen3, qwen3_table
from tiny_imagegen.models.qwen3 import QWEN2_5_VL_7B, Qwen3Config, Qwen3Model
from tiny_imagegen.conditioning.qwen import QWEN_IMAGE_TEMPLATE, QwenImagePromptEncoder
from tiny_imagegen.text import QwenTokenizer

ATOL = 5e-5  # fp32, 3 layers of width 32, values up to ~5 (measured 1.2e-5)


def _model(dtype=None):
    return load_qwen3(fixture_path("qwen_image_text", "text_encoder"), dtype)


def _encoder(dtype=None, max_sequence_length=512):
    tokenizer = QwenTokenizer.from_folder(fixture_path("qwen3", "tokenizer_small"))
    return QwenImagePromptEncoder(tokenizer, _model(dtype), max_sequence_length)


def test_config_switches_from_the_hub_config():
    cfg = Qwen3Config.from_config_json(fixture_path("qwen_image_text", "text_encoder", "config.json"))
    assert cfg.qkv_bias and not cfg.qk_norm and cfg.head_dim == 8 and cfg.rope_theta == 1e6
    # the pre-transformers-5 file: the language model's fields at the top level, mRoPE in rope_scaling
    flat = Qwen3Config.from_config({"model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944,
                                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                    "vocab_size": 152064, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
                                    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}})
    assert flat == QWEN2_5_VL_7B
    with pytest.raises(ValueError, match="hidden_size"):  # no silent 72B defaults
        Qwen3Config.from_config({"model_type": "qwen2_5_vl", "text_config": {"vocab_size": 10}})


def test_language_model_matches_transformers_fp32_and_bf16():
    io = load_fixture("qwen_image_text", "io.safetensors")
    ids, mask = io["batch.ids"].astype(mx.int32), io["batch.mask"].astype(mx.int32)
    assert int(mask.sum(axis=1).min()) < ids.shape[1]  # the batch is padded
    valid = np.array(mask).astype(bool)[..., None]
    out = _model()(ids, mask)
    assert_close("qwen2.5-vl hidden_states[-1] fp32 (real rows)", np.where(valid, out, 0),
                 np.where(valid, io["batch.hidden"], 0), atol=ATOL)
    out16 = _model(mx.bfloat16)(ids, mask)
    assert_bf16_parity("qwen2.5-vl hidden_states[-1]", mx.array(np.where(valid, out16.astype(mx.float32), 0)).astype(mx.bfloat16),
                       np.where(valid, io["batch.hidden"], 0), np.where(valid, io["batch.hidden_bf16"], 0), factor=1.5)


CASES = [c[0] for c in json.loads(fixture_path("qwen_image_text", "prompts.json").read_text())["cases"]]


@pytest.mark.parametrize("case", CASES)
def test_prompt_encoding_matches_the_pipeline(case):
    io = load_fixture("qwen_image_text", "io.safetensors")
    _, prompts, max_len = next(c for c in json.loads(fixture_path("qwen_image_text", "prompts.json").read_text())["cases"]
                               if c[0] == case)
    embeds, mask = _encoder(max_sequence_length=max_len)(prompts)
    assert_close(f"qwen-image prompt embeds fp32 ({case})", embeds, io[f"prompt.{case}.embeds"], atol=ATOL)
    if f"prompt.{case}.mask" in io:
        assert mask is not None and np.array_equal(np.array(mask), np.array(io[f"prompt.{case}.mask"]))
    else:
        assert mask is None  # one prompt, or all of one length: no mask, as the pipeline
    embeds16, _ = _encoder(mx.bfloat16, max_len)(prompts)
    assert embeds16.dtype == mx.bfloat16
    assert_bf16_parity(f"qwen-image prompt embeds ({case})", embeds16, io[f"prompt.{case}.embeds"],
                       io[f"prompt.{case}.embeds_bf16"], factor=1.5)


def test_padding_rows_are_zero_and_cut_is_counted():
    embeds, mask = _encoder()(["the quick brown fox jumps over the lazy dog near a river bank", "a cat"])
    n1 = int(mask[1].sum())
    assert n1 < embeds.shape[1] and float(mx.abs(embeds[1, n1:]).max()) == 0.0  # re-padded with zeros
    encoder = _encoder(max_sequence_length=6)
    long_prompt = "the quick brown fox jumps over the lazy dog near a river bank"
    n = len(encoder.tokenizer.encode(QWEN_IMAGE_TEMPLATE.format(long_prompt)))
    assert encoder.tokens_cut(long_prompt) == n - 34 - 6 > 0
    assert encoder(long_prompt)[0].shape[1] == 6
    assert _encoder().tokens_cut("a cat") == 0
    with pytest.raises(ValueError, match="max_sequence_length"):
        _encoder(max_sequence_length=1025)


def test_from_folder_reads_the_hub_layout():
    """tokenizer/ + text_encoder/ as the repo holds them; with bits=8 too (the tiny widths are below
    the quantization groups, so the policy leaves every Linear as it is: the same embeddings)."""
    repo, prompts = fixture_path("qwen_image_pipeline", "repo"), ["a red cat on a mat", "a cat"]
    embeds, mask = QwenImagePromptEncoder.from_folder(repo, mx.float32)(prompts)
    assert embeds.shape[0] == 2 and mask is not None and int(mask[1].sum()) < int(mask[0].sum())
    embeds8, _ = QwenImagePromptEncoder.from_folder(repo, mx.float32, bits=8)(prompts)
    assert mx.array_equal(embeds, embeds8)


def test_full_size_manifest_maps_completely():
    manifest = json.loads(fixture_path("qwen_image_text", "manifest_qwen2_5_vl_7b.json").read_text())
    source = shape_placeholders(manifest)
    assert qwen3_table(source) is QWEN2_5_VL
    ours = parameter_shapes(Qwen3Model(QWEN2_5_VL_7B))
    mapped = map_checkpoint(QWEN2_5_VL, ours, source)
    assert set(mapped) == set(ours)
    n = sum(int(np.prod(s)) for s in ours.values())
    total = sum(int(np.prod(s)) for s in manifest.values())
    print(f"qwen2.5-vl-7b: {len(manifest)} tensors, {total:,} values; the language model {n:,}")
    assert (total, n) == (8_292_166_656, 7_070_619_136)
