"""The SD U-Net (UNet2DConditionModel) against diffusers, with the same weights and inputs.

Fixtures: tests/reference/unet.py. `sd_small`: SD 1.5's structure, narrow (three levels, attention
on the two finer ones and the middle, two resnets per level, 1x1-conv projections, heads per
level), both checkpoint layouts. `linear_small`: Linear projections (SD 2 style), two transformer
blocks per attention, one resnet per level. Batch 2, odd non-square 7x10 latents (the up path
crops where the down path rounded up), one timestep per sample (one fractional). Tolerances are
relative to the largest reference value.
"""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints import unet as ckpt
from tiny_imagegen.checkpoints.mapping import CheckpointError, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.layers.embeddings import timestep_embedding
from tiny_imagegen.models.unet import UNET_PRESETS, UNetConfig, resize_nearest, unet_from_preset

# bf16: ours / torch's relative L2 to the fp32 reference, at most this. Measured 1.22 and 1.29;
# the float32 islands are checked one by one in test_bf16_islands.py
BF16_FACTOR = 1.45

RTOL = 1e-5


def load(name: str, layout: str = "diffusers", dtype=None):
    if layout == "diffusers":
        return ckpt.load_unet(fixture_path("unet", name, "diffusers"), dtype)
    cfg = UNetConfig.from_diffusers(json.loads(fixture_path("unet", name, "diffusers", "config.json").read_text()))
    return ckpt.load_unet(fixture_path("unet", name, "ldm.safetensors"), dtype, config=cfg)


@pytest.mark.parametrize("name, layout", [("sd_small", "diffusers"), ("sd_small", "ldm"), ("linear_small", "diffusers")])
def test_forward(name, layout):
    io = load_fixture("unet", name, "io.safetensors")
    out = load(name, layout)(io["x"], io["t"], io["context"])
    assert_close(f"unet {name} ({layout} layout)", out, io["out"], 0, RTOL)


def test_layouts_load_the_same_weights():
    a = dict(tree_flatten(load("sd_small", "diffusers").parameters()))
    b = dict(tree_flatten(load("sd_small", "ldm").parameters()))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]) for k in a), [k for k in a if not mx.array_equal(a[k], b[k])]


@pytest.mark.parametrize("name", ["sd_small", "linear_small"])
def test_bf16(name):
    """Weights and inputs in bf16: every block returns bf16, and the output is as close to the fp32
    reference as torch's own bf16 run."""
    io = load_fixture("unet", name, "io.safetensors")
    model = load(name, dtype=mx.bfloat16)
    x, ctx = io["x"].astype(mx.bfloat16), io["context"].astype(mx.bfloat16)
    # the forward pass, block by block, to see every intermediate dtype
    emb = model.time_embedding(timestep_embedding(io["t"], model.config.block_out_channels[0], time_factor=1.0).astype(mx.bfloat16))
    h = model.conv_in(x)
    dtypes = {"emb": emb.dtype, "conv_in": h.dtype}
    for i, level in enumerate(model.down_blocks):
        h, outputs = level(h, emb, ctx)
        dtypes.update({f"down {i}": h.dtype, **{f"down {i} skip {j}": o.dtype for j, o in enumerate(outputs)}})
    dtypes["mid"] = model.mid_block(h, emb, ctx).dtype
    assert set(dtypes.values()) == {mx.bfloat16}, {k: v for k, v in dtypes.items() if v != mx.bfloat16}
    assert_bf16_parity(f"unet {name}", model(x, io["t"], ctx), io["out"], io["out_bf16"], BF16_FACTOR)


# ---- config and checkpoints ------------------------------------------------------------------------


def test_sd15_config_is_the_preset():
    cfg = json.loads(fixture_path("unet", "sd15_config.json").read_text())
    assert UNetConfig.from_diffusers(cfg) == UNET_PRESETS["sd15"]


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_full_size_manifest_maps_completely(layout):
    """Every tensor of the published SD 1.5 U-Net has a place in ours and fills every parameter
    (lazy placeholders: no memory is used); 859,520,964 parameters."""
    manifest = json.loads(fixture_path("unet", f"manifest_sd15_{layout}.json").read_text())
    if layout == "ldm":
        manifest = {k.removeprefix(ckpt.LDM_PREFIX): v for k, v in manifest.items()}
    ours = parameter_shapes(unet_from_preset("sd15"))
    table = ckpt.DIFFUSERS if layout == "diffusers" else ckpt.ldm_table(UNET_PRESETS["sd15"])
    mapped = map_checkpoint(table, ours, shape_placeholders(manifest))
    assert mapped.keys() == ours.keys() and len(manifest) == len(ours) == 686
    assert sum(math.prod(s) for s in ours.values()) == 859_520_964


def test_checkpoint_problems_are_named():
    tensors = dict(mx.load(str(fixture_path("unet", "sd_small", "ldm.safetensors"))))
    del tensors[ckpt.LDM_PREFIX + "output_blocks.5.2.conv.weight"]  # up block 1's upsampler
    tensors[ckpt.LDM_PREFIX + "input_blocks.9.0.in_layers.0.weight"] = mx.zeros((16,))
    tensors[ckpt.LDM_PREFIX + "middle_block.1.proj_in.weight"] = mx.zeros((16, 8, 1, 1))
    path = fixture_path("unet") / "_bad.safetensors"
    mx.save_safetensors(str(path), tensors)
    cfg = UNetConfig.from_diffusers(json.loads(fixture_path("unet", "sd_small", "diffusers", "config.json").read_text()))
    try:
        with pytest.raises(CheckpointError) as e:
            ckpt.load_unet(path, config=cfg)
    finally:
        path.unlink()
    for name in ("output_blocks.5.2.conv.weight", "input_blocks.9.0.in_layers.0.weight", "middle_block.1.proj_in"):
        assert name in str(e.value), str(e.value)


# ---- pieces and bad input ----------------------------------------------------------------------------


def test_resize_nearest_matches_torch():
    """F.interpolate(size=..., mode="nearest") on ramps, down and up, both axes at once
    (tests/reference/resize.py): each output value names the input element it read."""
    ref = load_fixture("resize", "nearest.safetensors")
    assert len(ref) == 9
    for key, want in ref.items():
        (n_in, m_in), (n_out, m_out) = [tuple(int(v) for v in side.split("x")) for side in key.split("->")]
        ramp = mx.arange(n_in * m_in, dtype=mx.float32).reshape(1, n_in, m_in, 1)
        got = resize_nearest(ramp, (n_out, m_out))[0, :, :, 0]
        assert mx.array_equal(got, want), f"resize {key}: {np.argwhere(np.array(got != want))[:3].tolist()} differ"


@pytest.mark.parametrize("x_shape, ctx_shape, message", [
    ((1, 4, 8, 8), (1, 5, 12), r"channels-first"),
    ((1, 8, 8, 3), (1, 5, 12), r"latents must have shape \(B, h, w, 4\)"),
    ((1, 8, 8, 4), (1, 5, 768), r"text states must have shape \(1, S, 12\)"),
    ((2, 8, 8, 4), (1, 5, 12), r"text states must have shape \(2, S, 12\)"),
])
def test_bad_input_is_named(x_shape, ctx_shape, message):
    model = load("sd_small")
    with pytest.raises(ValueError, match=message):
        model(mx.zeros(x_shape), 10, mx.zeros(ctx_shape))


@pytest.mark.parametrize("change, message", [
    (dict(flip_sin_to_cos=False), "not implemented"),
    (dict(up_block_types=["CrossAttnUpBlock2D"] * 4), "mirror"),
    (dict(norm_num_groups=24), "divisible"),
    (dict(class_embed_type="timestep"), "not implemented"),
])
def test_bad_config_is_named(change, message):
    cfg = json.loads(fixture_path("unet", "sd15_config.json").read_text())
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers({**cfg, **change})


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_converted_round_trip(tmp_path, bits):
    """Our converted format: fp32 bit-identical; 4/8-bit equals quantizing in memory. The small
    model's Linears with inputs of a multiple of the group size (32) are the 17 resnets' time
    projections (4 x 8 wide) and the 11 GEGLU output projections (4 x 8 or 4 x 16): those are
    quantized; the timestep MLP (also 32 wide) is kept."""
    from tiny_imagegen.checkpoints.convert import load_component, read_manifest, save_converted
    from tiny_imagegen.checkpoints.quantize import quantize_component

    io = load_fixture("unet", "sd_small", "io.safetensors")
    run = lambda m: m(io["x"], io["t"], io["context"])  # noqa: E731
    out = save_converted(tmp_path / "unet", {"unet": load("sd_small")}, bits=bits, group_size=32, dtype="float32")
    reloaded = load_component(out, "unet")
    expected = load("sd_small")
    if bits:
        layers = quantize_component("unet", expected, bits, group_size=32)
        assert sorted(p.rsplit(".", 1)[-1] for p in layers) == ["proj_out"] * 11 + ["time_emb_proj"] * 17
        assert read_manifest(out)["components"]["unet"]["quantized_layers"] == layers
        assert float(mx.abs(run(expected) - io["out"]).max()) > 0  # quantization did change something
    assert_close(f"unet converted ({bits or 'fp32'})", run(reloaded), run(expected), atol=0)
    assert read_manifest(out)["components"]["unet"]["config"]["attention_heads"] == [2, 2, 4]


def test_sd15_quantization_rule():
    """At full size: every attention, GEGLU, projection and per-resnet time Linear is quantized;
    convolutions and the timestep MLP are not."""
    from tiny_imagegen.checkpoints.quantize import quantizable_layers

    layers = quantizable_layers("unet", unet_from_preset("sd15"), 64)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in layers
    assert "up_blocks.3.attentions.2.transformer_blocks.0.ff.proj_out" in layers
    assert "mid_block.resnets.1.time_emb_proj" in layers and "down_blocks.1.attentions.1.proj_in" in layers
    assert not [p for p in layers if p.startswith("time_embedding") or "conv" in p]
    assert len(layers) == 16 * 12 + 22  # 16 transformers x (proj in/out, 2 x q k v out, ff in/out), 22 resnets


def test_single_file_with_the_other_components(tmp_path):
    """v1-5-pruned-emaonly.safetensors also holds the VAE (first_stage_model.*), the text encoder
    (cond_stage_model.*) and LDM's schedule buffers: only model.diffusion_model.* is the U-Net."""
    tensors = dict(mx.load(str(fixture_path("unet", "sd_small", "ldm.safetensors"))))
    tensors.update({"first_stage_model.decoder.conv_in.weight": mx.zeros((8, 4, 3, 3)), "alphas_cumprod": mx.ones((1000,)),
                    "cond_stage_model.transformer.text_model.final_layer_norm.weight": mx.ones((12,))})
    mx.save_safetensors(str(tmp_path / "v1-5-tiny.safetensors"), tensors)
    cfg = UNetConfig.from_diffusers(json.loads(fixture_path("unet", "sd_small", "diffusers", "config.json").read_text()))
    a = dict(tree_flatten(ckpt.load_unet(tmp_path / "v1-5-tiny.safetensors", config=cfg).parameters()))
    b = dict(tree_flatten(load("sd_small").parameters()))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    mx.save_safetensors(str(tmp_path / "vae-only.safetensors"), {"encoder.conv_in.weight": mx.zeros((8, 3, 3, 3))})
    with pytest.raises(CheckpointError, match="holds no U-Net"):
        ckpt.load_unet(tmp_path / "vae-only.safetensors")
