"""SD3 / SD3.5 transformer parity against diffusers' SD3Transformer2DModel (fixtures from
tests/reference/sd3_transformer.py), both checkpoint layouts, full-size manifests."""

import json
from dataclasses import replace

import mlx.core as mx
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture, recording_outputs
from tiny_imagegen.checkpoints.mapping import CheckpointError, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.sd3 import DIFFUSERS, STABILITY, load_sd3_transformer
from tiny_imagegen.layers.positions import sincos_2d_interpolated
from tiny_imagegen.models.sd3 import SD35_LARGE, SD35_MEDIUM, SD3Config, SD3Transformer, crop_positions

NAMES = ["mmditx_tiny", "sd3_tiny"]
MODEL_ATOL = 2e-5  # as the FLUX MM-DiT: the timestep sinusoid at 1000 rad differs by <= 6e-5 before t_embedder


def run(model, io, dtype=mx.float32, skip=()):
    nhwc = io["x"].transpose(0, 2, 3, 1).astype(dtype)
    out = model(nhwc, io["txt"].astype(dtype), io["timesteps"], io["pooled"].astype(dtype), skip_layers=skip)
    return out.transpose(0, 3, 1, 2)


def _load(name, layout="diffusers", dtype=None):
    folder = fixture_path("sd3_transformer", name)
    io = load_fixture("sd3_transformer", name, "io.safetensors")
    if layout == "diffusers":
        return load_sd3_transformer(folder / "diffusers", dtype=dtype), io
    config = load_sd3_transformer(folder / "diffusers").config  # a single file without QK norm: head width 64 assumed
    return load_sd3_transformer(folder / "stability.safetensors", config=config, dtype=dtype), io


@pytest.mark.parametrize("layout", ["diffusers", "stability"])
@pytest.mark.parametrize("name", NAMES)
def test_transformer_matches_diffusers(name, layout):
    model, io = _load(name, layout)
    cfg = model.config
    assert cfg.qk_norm == (name == "mmditx_tiny") and bool(cfg.dual_attention_layers) == (name == "mmditx_tiny")
    assert_close(f"sd3 {name} ({layout} layout)", run(model, io), io["out"], atol=MODEL_ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_skip_layers(name):
    """Skip-layer guidance's pass: block 1 left out, both streams pass through it."""
    model, io = _load(name)
    assert_close(f"sd3 {name} skip_layers=[1]", run(model, io, skip=(1,)), io["out_skip1"], atol=MODEL_ATOL)
    assert float(mx.max(mx.abs(io["out_skip1"] - io["out"]))) > 100 * MODEL_ATOL


def test_single_file_config_read_off_shapes():
    folder = fixture_path("sd3_transformer", "mmditx_tiny")
    a = load_sd3_transformer(folder / "diffusers").config
    b = load_sd3_transformer(folder / "stability.safetensors").config
    assert a == replace(b, sample_size=8)  # the one number a single file does not carry (128 in releases)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_model_stays_bf16_and_is_as_accurate_as_torch(name):
    model, io = _load(name, dtype=mx.bfloat16)
    blocks = {f"double.{i}": (model.double_blocks, i) for i in range(len(model.double_blocks))}
    with recording_outputs(blocks) as seen:
        out = run(model, io, mx.bfloat16)
    for block, (img, txt) in seen.items():
        assert_bf16_parity(f"sd3 {name} {block}.img", img, io[f"{block}.img"], io[f"bf16.{block}.img"])
        if txt is not None:
            assert_bf16_parity(f"sd3 {name} {block}.txt", txt, io[f"{block}.txt"], io[f"bf16.{block}.txt"])
    assert_bf16_parity(f"sd3 {name} output", out, io["out"], io["bf16.out"])
    skipped = run(model, io, mx.bfloat16, skip=(1,))
    assert_bf16_parity(f"sd3 {name} output skip_layers=[1]", skipped, io["out_skip1"], io["bf16.out_skip1"])


def test_position_table_formula_and_crop():
    """diffusers' untrained table is the sin-cos formula of layers/positions.py with base_size =
    sample_size / patch; a 3x5 grid takes rows 2..4 and columns 1..5 of the 8x8 table."""
    fresh = load_fixture("sd3_transformer", "fresh_pos.safetensors")["pos_embed"]
    assert_close("sd3 position table formula", sincos_2d_interpolated(32, 8, 8, base_size=4), fresh, atol=1e-6)
    table = mx.arange(64 * 2).reshape(64, 2)
    crop = crop_positions(table, 8, 3, 5)
    assert crop[:, 0].tolist() == [2 * (8 * r + c) for r in range(2, 5) for c in range(1, 6)]


def test_too_large_image_names_the_largest_size():
    model, io = _load("sd3_tiny")
    x = mx.zeros((1, 18, 4, 16))  # 9 patches > the 8-patch table
    with pytest.raises(ValueError, match=r"9x2 patches.*8x8: images up to 128 pixels a side"):
        model(x, io["txt"][:1], io["timesteps"][:1], io["pooled"][:1])
    assert SD35_LARGE.max_image_size == 3072 and SD35_MEDIUM.max_image_size == 6144


@pytest.mark.parametrize("model", ["sd3.5-large", "sd3.5-medium"])
@pytest.mark.parametrize("layout", ["diffusers", "stability"])
def test_full_size_manifest_maps_completely(model, layout):
    manifest = json.loads(fixture_path("sd3_transformer", f"manifest_{model}_{layout}.json").read_text())
    config = {"sd3.5-large": SD35_LARGE, "sd3.5-medium": SD35_MEDIUM}[model]
    ours = parameter_shapes(SD3Transformer(config))  # lazy: nothing allocated
    mapped = map_checkpoint({"diffusers": DIFFUSERS, "stability": STABILITY}[layout], ours, shape_placeholders(manifest))
    assert set(mapped) == set(ours)
    n = sum(v.size for v in mapped.values())
    print(f"{model} ({layout}): {len(manifest)} tensors -> {len(ours)} parameters, {n:,} values")
    assert n == {"sd3.5-large": 8_056_627_520 + 89_653_248, "sd3.5-medium": 2_243_171_520 + 226_492_416}[model]


def test_missing_and_misshaped_keys_are_named():
    from tiny_imagegen.checkpoints.mapping import load_checkpoint
    from tiny_imagegen.checkpoints.safetensors_io import read_checkpoint

    folder = fixture_path("sd3_transformer", "mmditx_tiny")
    source = read_checkpoint(folder / "stability.safetensors")
    del source["model.diffusion_model.joint_blocks.1.x_block.attn2.qkv.weight"]
    source["model.diffusion_model.pos_embed"] = mx.zeros((1, 60, 32))
    model = load_sd3_transformer(folder / "diffusers")
    with pytest.raises(CheckpointError, match=r"(?s)missing.*joint_blocks\.1\.x_block\.attn2\.qkv\.weight.*"
                                              r"pos_embed: expected \(1, 64, 32\), found \(1, 60, 32\)"):
        load_checkpoint(model, STABILITY, source)


def test_config_checks():
    with pytest.raises(ValueError, match="caption_projection_dim 40"):
        SD3Config.from_diffusers({"num_attention_heads": 2, "attention_head_dim": 16, "caption_projection_dim": 40})
    with pytest.raises(ValueError, match=r"\(B, h, w, 16\)"):
        SD3Transformer(SD3Config(num_heads=1, head_dim=8, depth=1, pos_embed_max_size=4))(
            mx.zeros((1, 4, 4, 3)), mx.zeros((1, 2, 4096)), mx.ones(1), mx.zeros((1, 2048)))
