"""Qwen-Image transformer parity against diffusers' QwenImageTransformer2DModel (fixtures from
tests/reference/qwen_image.py) in float32 and bfloat16, block by block: batch 2 with a text
padding mask, a non-square odd token grid, an even grid; MSRoPE tables; key table and the
full-size manifest."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.mapping import CheckpointError, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.qwen_image import DIFFUSERS, load_qwen_image_transformer
from tiny_imagegen.layers.embeddings import timestep_embedding
from tiny_imagegen.layers.positions import msrope_image_ids, msrope_text_ids
from tiny_imagegen.layers.rope import axial_rope_fp32
from tiny_imagegen.models.qwen_image import QwenImageConfig, QwenImageTransformer

# fp32 through 2 blocks of width 32; the few float32-ulp differences of the sinusoid and the
# complex rotation pass through (measured below 1e-6)
MODEL_ATOL = 1e-5


def _load(dtype=None):
    return load_qwen_image_transformer(fixture_path("qwen_image", "tiny", "diffusers"), dtype=dtype)


def _run(model, io, intermediates=None):
    return model(io["img"], io["txt"], io["timesteps"], (3, 5), io["mask"], intermediates=intermediates)


def test_transformer_matches_diffusers_fp32():
    model, io = _load(), load_fixture("qwen_image", "tiny", "io.safetensors")
    found = []
    out = _run(model, io, found)
    assert out.dtype == mx.float32
    assert_close("qwen-image fp32 (batch 2, mask, 3x5 grid)", out, io["out"], atol=MODEL_ATOL)
    for i, (img, txt) in enumerate(found):
        assert_close(f"qwen-image block.{i}.img fp32", img, io[f"block.{i}.img"], atol=MODEL_ATOL)
        # padded text rows are computed but never read: compare the valid ones
        assert_close(f"qwen-image block.{i}.txt fp32 (valid rows)", txt[1, :4], io[f"block.{i}.txt"][1, :4], atol=MODEL_ATOL)
        assert_close(f"qwen-image block.{i}.txt fp32 (sample 0)", txt[0], io[f"block.{i}.txt"][0], atol=MODEL_ATOL)
    even = model(io["even.img"], io["even.txt"], mx.array([0.5]), (4, 2))
    assert_close("qwen-image fp32 (4x2 grid, no mask)", even, io["even.out"], atol=MODEL_ATOL)


def test_the_mask_makes_padding_invisible():
    """Sample 1 with 3 padded text tokens equals its unpadded run alone (as diffusers' does), and
    no value of the padding moves the image."""
    model, io = _load(), load_fixture("qwen_image", "tiny", "io.safetensors")
    out = _run(model, io)
    solo = model(io["img"][1:], io["txt"][1:, :4], io["timesteps"][1:], (3, 5))
    assert_close("qwen-image masked row == solo (ours)", out[1:], solo, atol=1e-6)
    assert_close("qwen-image solo vs diffusers", solo, io["solo.out"], atol=MODEL_ATOL)
    noisy = dict(io, txt=mx.concatenate([io["txt"][:1], mx.concatenate([io["txt"][1:, :4], 50 * mx.ones((1, 3, 24))], 1)]))
    assert_close("qwen-image padding values do not matter", _run(model, noisy), out, atol=0)
    unmasked = model(io["img"], io["txt"], io["timesteps"], (3, 5))
    assert float(mx.abs(unmasked[1] - out[1]).max()) > 1e-3  # the mask is doing something


def test_transformer_bf16_against_torch_bf16():
    model, io = _load(mx.bfloat16), load_fixture("qwen_image", "tiny", "io.safetensors")
    found = []
    out = _run(model, io, found)
    assert_bf16_parity("qwen-image", out, io["out"], io["out_bf16"], factor=1.5)
    for i, (img, _) in enumerate(found):
        assert img.dtype == mx.bfloat16
        assert_bf16_parity(f"qwen-image block.{i}.img", img, io[f"block.{i}.img"], io[f"block.{i}.img_bf16"], factor=1.5)
    even = model(io["even.img"], io["even.txt"], mx.array([0.5]), (4, 2))
    assert_bf16_parity("qwen-image 4x2 grid", even, io["even.out"], io["even.out_bf16"], factor=1.5)


def test_msrope_tables_are_diffusers():
    """13 x 6 grid and 600 text tokens: image rows -7..5, columns -3..2, text from 6 to 605."""
    u = load_fixture("qwen_image", "units.safetensors")
    img_ids, txt_ids = msrope_image_ids(13, 6), msrope_text_ids(600, 13, 6)
    assert img_ids[:, 1].min() == -7 and img_ids[:, 1].max() == 5 and img_ids[:, 2].min() == -3
    assert txt_ids[0].tolist() == [6, 6, 6] and txt_ids[-1].tolist() == [605, 605, 605]
    for name, ids in (("img", img_ids), ("txt", txt_ids)):
        cos, sin = axial_rope_fp32(ids, (16, 56, 56))
        # torch's float32 pow is 1 ulp off for a few frequencies (layers/rope.py): 2e-6 at position 600
        assert_close(f"MSRoPE {name} cos", cos, u[f"rope.{name}.cos"], atol=4e-6)
        assert_close(f"MSRoPE {name} sin", sin, u[f"rope.{name}.sin"], atol=4e-6)


def test_timestep_sinusoid_is_diffusers():
    u = load_fixture("qwen_image", "units.safetensors")
    emb = timestep_embedding(u["timestep.t"], time_factor=1.0, arg_scale=1000.0)
    # torch's float32 exp is 1 ulp off in 3 of 128 frequencies here; times arguments up to 1000
    # that is <= 6e-5, as for FLUX (test_mmdit.py); scaling before the product is twice as far
    assert_close("Qwen-Image timestep sinusoid (t w) 1000", emb, u["timestep.proj"], atol=6e-5)
    other_order = timestep_embedding(u["timestep.t"])
    assert float(mx.abs(other_order - u["timestep.proj"]).max()) > float(mx.abs(emb - u["timestep.proj"]).max())


def test_positions_on_small_grids():
    # h = 3 -> rows -2, -1, 0; h = 4 -> -2 .. 1; text starts at max(h//2, w//2) on all axes
    assert sorted(set(msrope_image_ids(3, 1)[:, 1].tolist())) == [-2, -1, 0]
    assert sorted(set(msrope_image_ids(4, 1)[:, 1].tolist())) == [-2, -1, 0, 1]
    assert msrope_text_ids(2, 3, 5).tolist() == [[2, 2, 2], [3, 3, 3]]
    assert (msrope_image_ids(3, 5)[:, 0] == 0).all()


def test_full_size_manifest_maps_completely():
    manifest = json.loads(fixture_path("qwen_image", "manifest_qwen-image.json").read_text())
    ours = parameter_shapes(QwenImageTransformer(QwenImageConfig()))  # lazy: nothing allocated
    mapped = map_checkpoint(DIFFUSERS, ours, shape_placeholders(manifest))
    assert set(mapped) == set(ours) and all(tuple(mapped[k].shape) == ours[k] for k in ours)
    n = sum(v.size for v in mapped.values())
    print(f"qwen-image: {len(manifest)} tensors -> {len(ours)} parameters, {n:,} values")
    assert n == sum(int(np.prod(s)) for s in manifest.values()) == 20_430_401_088


def test_config_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="guidance_embeds"):
        QwenImageConfig.from_diffusers({"guidance_embeds": True})
    with pytest.raises(ValueError, match="zero_cond_t"):
        QwenImageConfig.from_diffusers({"zero_cond_t": True})
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(CheckpointError, match="not a QwenImageTransformer2DModel"):
        load_qwen_image_transformer(tmp_path)
    model, io = _load(), load_fixture("qwen_image", "tiny", "io.safetensors")
    with pytest.raises(ValueError, match="packed latents"):
        model(io["img"], io["txt"], io["timesteps"], (4, 5))
    with pytest.raises(ValueError, match="txt_mask"):
        model(io["img"], io["txt"], io["timesteps"], (3, 5), io["mask"][:, :3])


def test_lora_matches_diffusers_load_lora_weights():
    """A PEFT file as QwenImagePipeline.save_lora_weights writes it (every Linear, one q/k/v piece
    absent, norm_out's (scale, shift) rows), at weight 0.7, against diffusers' load_lora_weights +
    fuse_lora (fixtures from tests/reference/qwen_image_lora.py)."""
    from conftest import require_modules
    from tiny_imagegen.checkpoints.lora import apply_loras

    require_modules("peft")
    model, io = _load(), load_fixture("qwen_image", "tiny", "io.safetensors")
    ref = load_fixture("qwen_image_lora", "io.safetensors")
    records = apply_loras(model, [(str(fixture_path("qwen_image_lora", "diffusers.safetensors")), 0.7)])
    assert records[0]["format"] == "diffusers" and records[0]["layers"] == 2 * 10 + 6  # 10 Linears per block, 6 outside
    out = _run(model, io)
    assert float(mx.abs(out - io["out"]).max()) > 100 * MODEL_ATOL  # the LoRA changes the output
    assert_close("qwen-image LoRA (diffusers/PEFT, weight 0.7) vs load_lora_weights", out, ref["out"], atol=MODEL_ATOL)
