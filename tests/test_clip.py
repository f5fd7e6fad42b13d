"""CLIP's text model equals transformers' CLIPTextModel (fixtures: tests/reference/text_encoders.py)."""

import json
from dataclasses import replace

import mlx.core as mx
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture, recording_outputs
from tiny_imagegen.checkpoints.mapping import CheckpointError, load_checkpoint, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.safetensors_io import read_checkpoint
from tiny_imagegen.checkpoints.text_encoders import CLIP_HUB, CLIP_TRANSFORMERS5, clip_table, load_clip_text_model
from tiny_imagegen.models.clip import CLIP_VIT_L14_TEXT, CLIPTextConfig, CLIPTextModel

# bf16: ours / torch's relative L2 to the fp32 reference, at most this. Measured 0.99 to 1.21 (the pooled vector);
# the float32 islands are checked one by one in test_bf16_islands.py
BF16_FACTOR = 1.35

# fp32, relative to the largest output (~3): sums in another order through 3 blocks and 7
# LayerNorms (2.1e-6 measured, ~7 ulp)
RTOL = 2e-6


def folder():
    return fixture_path("text_encoders", "flux", "text_encoder")


def model(**config_changes) -> CLIPTextModel:
    m = load_clip_text_model(folder(), dtype=mx.float32)
    if config_changes:  # the same weights under another config
        other = CLIPTextModel(replace(m.config, **config_changes))
        other.update(m.parameters())
        return other
    return m


def test_config_is_read():
    config = CLIPTextConfig.from_config_json(folder() / "config.json")
    assert (config.hidden_size, config.num_hidden_layers, config.hidden_act, config.eos_token_id) == (64, 3, "quick_gelu", 2)
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        CLIPTextConfig(hidden_act="relu")


@pytest.mark.parametrize("masked", [False, True], ids=["causal_only_as_flux", "padding_mask"])
def test_clip_text_model_equals_transformers(masked):
    """Batch of two, one padded with <|endoftext|>: hidden states and the pooled output (legacy rule:
    eos_token_id 2 in the config, as FLUX's, so the position of the largest id)."""
    ref = load_fixture("text_encoders", "clip.safetensors")
    assert int(ref["attention_mask"].sum(axis=1).min()) < 77, "the batch must hold padding"
    hidden, pooled = model()(ref["input_ids"], ref["attention_mask"] if masked else None)
    suffix = "_masked" if masked else ""
    label = "padding mask" if masked else "causal only"
    assert_close(f"CLIP hidden states ({label})", hidden, ref["hidden_states" + suffix], atol=0.0, rtol=RTOL)
    assert_close(f"CLIP pooled output ({label})", pooled, ref["pooled" + suffix], atol=0.0, rtol=RTOL)


def test_pooled_output_is_independent_of_padding():
    """Causal attention: what follows the end token cannot change the state read at it."""
    ref = load_fixture("text_encoders", "clip.safetensors")
    ids = ref["input_ids"][:1]
    end = int(mx.argmax(ids, axis=-1).item())
    _, pooled = model()(ids)
    _, unpadded = model()(ids[:, : end + 1])
    _, pad_bang = model()(mx.concatenate([ids[:, : end + 1], mx.zeros((1, 76 - end), mx.int32)], axis=1))
    assert_close("CLIP pooled: padded vs unpadded", pooled, unpadded, atol=0.0, rtol=RTOL)
    assert_close("CLIP pooled: padded with <|endoftext|> vs with id 0", pooled, pad_bang, atol=0.0, rtol=RTOL)


def test_exact_gelu_where_the_config_says_so():
    ref = load_fixture("text_encoders", "clip.safetensors")
    hidden, pooled = model(hidden_act="gelu")(ref["input_ids"])
    assert_close("CLIP hidden states (hidden_act gelu)", hidden, ref["hidden_states_gelu"], atol=0.0, rtol=RTOL)
    assert_close("CLIP pooled output (hidden_act gelu)", pooled, ref["pooled_gelu"], atol=0.0, rtol=RTOL)


def test_pooled_at_first_end_token_for_current_configs():
    """eos_token_id other than 2: the first position holding it (here id 5, with larger ids around
    it, so that the legacy argmax rule would pick another position)."""
    ref = load_fixture("text_encoders", "clip.safetensors")
    ids = ref["input_ids_first_eos"]
    m = model(eos_token_id=5)
    assert m.end_of_text_positions(ids).tolist() == [7, 15]
    assert model().end_of_text_positions(ids).tolist() != [7, 15]
    _, pooled = m(ids)
    assert_close("CLIP pooled output (first end token rule)", pooled, ref["pooled_first_eos"], atol=0.0, rtol=RTOL)
    with pytest.raises(ValueError, match="no end-of-text token"):
        m(mx.full((1, 4), 6, mx.int32))


def test_too_many_tokens_is_an_error():
    with pytest.raises(ValueError, match="78 tokens"):
        model()(mx.zeros((1, 78), mx.int32))


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_both_layouts_load(layout):
    source = read_checkpoint(folder())  # the hub's text_model. prefix
    if layout == "transformers5":
        source = {k.removeprefix("text_model."): v for k, v in source.items()}
    source["text_model.embeddings.position_ids" if layout == "hub" else "embeddings.position_ids"] = mx.arange(77)[None]
    assert clip_table(source) is (CLIP_HUB if layout == "hub" else CLIP_TRANSFORMERS5)
    m = load_checkpoint(CLIPTextModel(CLIPTextConfig.from_config_json(folder() / "config.json")), clip_table(source), source)
    assert mx.array_equal(m.layers[2].mlp.fc2.bias, model().layers[2].mlp.fc2.bias)


def test_missing_key_is_named():
    source = read_checkpoint(folder())
    del source["text_model.encoder.layers.1.self_attn.v_proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing.*\n.*text_model\.encoder\.layers\.1\.self_attn\.v_proj\.bias"):
        load_checkpoint(CLIPTextModel(CLIPTextConfig.from_config_json(folder() / "config.json")), CLIP_HUB, source)


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_full_size_manifest_maps_completely(layout):
    """FLUX's text_encoder: CLIP ViT-L/14's text model, every tensor with its shape."""
    manifest = json.loads(fixture_path("text_encoders", f"manifest_clip_vit_l14_text_{layout}.json").read_text())
    ours = parameter_shapes(CLIPTextModel(CLIP_VIT_L14_TEXT))
    mapped = map_checkpoint(clip_table(manifest), ours, shape_placeholders(manifest))
    assert set(mapped) == set(ours)
    n = sum(v.size for v in mapped.values())
    print(f"CLIP ViT-L/14 text ({layout}): {len(manifest)} tensors -> {len(ours)} parameters, {n:,} values, "
          f"{2 * n / 1e6:.0f} MB in bf16, {4 * n / 1e6:.0f} MB in fp32")
    assert n == 123_060_480


def test_bf16_model_stays_bf16_and_is_as_accurate_as_torch():
    """Loaded in bf16, every layer, the hidden states and the pooled vector are bf16 and no
    further from the fp32 reference than transformers' bf16 run is (relative L2, within BF16_FACTOR)."""
    ref = load_fixture("text_encoders", "clip.safetensors")
    clip = load_clip_text_model(folder(), dtype=mx.bfloat16)
    with recording_outputs({f"layer.{i}": (clip.layers, i) for i in range(len(clip.layers))}) as seen:
        hidden, pooled = clip(ref["input_ids"])
    assert len(seen) == len(clip.layers)
    for key, ours in seen.items():
        assert_bf16_parity(f"CLIP {key}", ours, ref[key], ref[f"bf16.{key}"], BF16_FACTOR)
    assert_bf16_parity("CLIP hidden states", hidden, ref["out"], ref["bf16.out"], BF16_FACTOR)
    assert_bf16_parity("CLIP pooled", pooled, ref["pooled"], ref["bf16.pooled"], BF16_FACTOR)
