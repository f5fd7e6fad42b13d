"""The T5 v1.1 encoder equals transformers' T5EncoderModel (fixtures: tests/reference/text_encoders.py)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture, recording_outputs
from tiny_imagegen.checkpoints.mapping import CheckpointError, load_checkpoint, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.safetensors_io import read_checkpoint
from tiny_imagegen.checkpoints.text_encoders import T5_ENCODER_EMBED, T5_SHARED, load_t5_encoder, t5_table
from tiny_imagegen.models.t5 import T5_V1_1_XXL, T5Config, T5Encoder, relative_position_bucket

# bf16: ours / torch's relative L2 to the fp32 reference, at most this. Measured 0.98 to 1.00;
# the float32 islands are checked one by one in test_bf16_islands.py
BF16_FACTOR = 1.2

# fp32, relative to the largest output (~4): sums in another order through 3 blocks and 7 norms
# leave ~20 ulp (7e-6 to 9e-6 measured, with and without OpenBLAS)
RTOL = 5e-6


def folder():
    return fixture_path("text_encoders", "flux", "text_encoder_2")


def test_relative_position_buckets_equal_transformers():
    ref = load_fixture("text_encoders", "t5.safetensors")
    ours = relative_position_bucket(ref["bucket_offsets"], num_buckets=32, max_distance=128)
    bad = np.nonzero(np.array(ours) != np.array(ref["buckets"]))[0]
    assert bad.size == 0, f"offsets {np.array(ref['bucket_offsets'])[bad][:10]} fall in other buckets"


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask_as_flux", "padding_mask"])
def test_t5_encoder_equals_transformers(masked):
    ref = load_fixture("text_encoders", "t5.safetensors")
    assert int(ref["attention_mask"].sum(axis=1).min()) < ref["attention_mask"].shape[1], "the batch must hold padding"
    assert not mx.allclose(ref["hidden_states"], ref["hidden_states_masked"]), "the mask must matter"
    model = load_t5_encoder(folder(), dtype=mx.float32)
    out = model(ref["input_ids"], ref["attention_mask"] if masked else None)
    assert_close(f"T5 encoder hidden states ({'padding mask' if masked else 'no mask'})", out,
                 ref["hidden_states_masked" if masked else "hidden_states"], atol=0.0, rtol=RTOL)


def _tiny_source():
    return read_checkpoint(folder())


@pytest.mark.parametrize("names", ["shared", "encoder.embed_tokens", "both"])
def test_embedding_under_either_name(names):
    source = _tiny_source()
    embedding = source.pop("shared.weight")
    if names in ("encoder.embed_tokens", "both"):
        source["encoder.embed_tokens.weight"] = embedding
    if names in ("shared", "both"):
        source["shared.weight"] = embedding
    assert t5_table(source) is (T5_ENCODER_EMBED if names == "encoder.embed_tokens" else T5_SHARED)
    model = T5Encoder(T5Config.from_config_json(folder() / "config.json"))
    load_checkpoint(model, t5_table(source), source)
    assert mx.array_equal(model.embed_tokens.weight, embedding)


def test_decoder_tensors_of_a_full_t5_are_left_unused():
    source = _tiny_source()
    source["decoder.block.0.layer.0.SelfAttention.q.weight"] = mx.zeros((64, 64))
    source["lm_head.weight"] = mx.zeros((256, 64))
    load_checkpoint(T5Encoder(T5Config.from_config_json(folder() / "config.json")), T5_SHARED, source)


def test_missing_and_unexpected_keys_are_named():
    source = _tiny_source()
    del source["encoder.block.2.layer.1.DenseReluDense.wo.weight"]
    source["encoder.block.3.layer.0.layer_norm.weight"] = mx.ones((64,))
    model = T5Encoder(T5Config.from_config_json(folder() / "config.json"))
    with pytest.raises(CheckpointError, match=r"(?s)missing.*block\.2\.layer\.1\.DenseReluDense\.wo.*unexpected.*block\.3\.layer\.0"):
        load_checkpoint(model, T5_SHARED, source)


def test_config_is_read_and_checked():
    config = T5Config.from_config_json(folder() / "config.json")
    assert (config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff, config.vocab_size) == (64, 3, 4, 16, 128, 256)
    with pytest.raises(ValueError, match="feed_forward_proj 'relu'"):
        T5Config.from_dict({"feed_forward_proj": "relu"})


def test_full_size_manifest_maps_completely():
    """FLUX's text_encoder_2: the T5-v1.1-XXL encoder, every tensor with its shape."""
    manifest = json.loads(fixture_path("text_encoders", "manifest_t5_v1_1_xxl_encoder.json").read_text())
    ours = parameter_shapes(T5Encoder(T5_V1_1_XXL))  # lazy: nothing allocated
    mapped = map_checkpoint(t5_table(manifest), ours, shape_placeholders(manifest))  # raises on any gap
    assert set(mapped) == set(ours)
    n = sum(v.size for v in mapped.values())
    print(f"T5-v1.1-XXL encoder: {len(manifest)} tensors -> {len(ours)} parameters, {n:,} values, "
          f"{2 * n / 1e9:.2f} GB in bf16, {4 * n / 1e9:.2f} GB in fp32")
    assert n == 4_762_310_656


def test_bf16_model_stays_bf16_and_is_as_accurate_as_torch():
    """Loaded in bf16, every layer returns bf16 (a hidden float32 upcast would show) and each
    layer's output and the encoder's are no further from the fp32 reference than transformers'
    bf16 run of the same weights is (relative L2, within BF16_FACTOR)."""
    ref = load_fixture("text_encoders", "t5.safetensors")
    model = load_t5_encoder(folder(), dtype=mx.bfloat16)
    assert model.blocks[0].ff.wo.weight.dtype == mx.bfloat16
    with recording_outputs({f"layer.{i}": (model.blocks, i) for i in range(len(model.blocks))}) as seen:
        out = model(ref["input_ids"])
    assert len(seen) == len(model.blocks)
    for key, ours in seen.items():
        assert_bf16_parity(f"T5 {key}", ours, ref[key], ref[f"bf16.{key}"], BF16_FACTOR)
    assert_bf16_parity("T5 encoder output", out, ref["out"], ref["bf16.out"], BF16_FACTOR)


@pytest.mark.parametrize("bits, min_cosine, mean_cosine", [(8, 0.995, 0.999), (4, 0.6, 0.85)])
def test_quantized_linears_stay_close(bits, min_cosine, mean_cosine):
    """nn.quantize of the linear layers (affine, groups of 64): cosine similarity per token of the
    output against the unquantized encoder. The tiny encoder has random Gaussian weights, which
    4 bits store with 9 % relative error (8 bits: 0.6 %), and its blocks each rewrite much of the
    residual stream, so this is a pessimistic figure, not a forecast for T5-XXL's trained weights."""
    ref = load_fixture("text_encoders", "t5.safetensors")
    full = load_t5_encoder(folder(), dtype=mx.float32)
    quantized = load_t5_encoder(folder(), dtype=mx.float32).quantize(bits=bits, group_size=64)
    assert quantized.blocks[0].attn.q.bits == bits and quantized.embed_tokens.weight.dtype == mx.float32
    w, q = full.blocks[0].ff.wi_0.weight, quantized.blocks[0].ff.wi_0
    weight_error = mx.linalg.norm(mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=bits) - w) / mx.linalg.norm(w)
    a, b = quantized(ref["input_ids"]), full(ref["input_ids"])
    cosine = (a * b).sum(-1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1))
    print(f"[quantized T5] {bits}-bit: relative weight error {weight_error.item():.4f}; cosine similarity "
          f"of the output to fp32 per token: min {cosine.min().item():.5f}, mean {cosine.mean().item():.5f}")
    assert cosine.min().item() >= min_cosine and cosine.mean().item() >= mean_cosine
    measured = {8: 0.0054, 4: 0.0909}[bits]  # the weights' error is a property of the format: +-20%
    assert measured / 1.2 <= weight_error.item() <= measured * 1.2
