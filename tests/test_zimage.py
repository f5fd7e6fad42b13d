"""Z-Image transformer parity against diffusers' ZImageTransformer2DModel (fixtures from
tests/reference/zimage.py), in float32 and bfloat16, with and without the batch-padding mask."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.mapping import map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.zimage import DIFFUSERS, load_zimage_transformer
from tiny_imagegen.layers.embeddings import timestep_embedding
from tiny_imagegen.layers.rope import axial_rope_fp32_angles
from tiny_imagegen.models.zimage import (
    ZImageConfig, ZImageTransformer, patchify, preset, sequence_layout, unpatchify,
)

# Where float32 differs from the reference: torch's float32 exp gives 2 of the 128 timestep
# frequencies 1 ulp off the correctly rounded ones we use, which at t·1000 = 700 moves the sinusoid
# by up to 3e-5 (test_timestep_embedding) and the output by up to 3.1e-5 (measured: 7e-6 when
# torch's sinusoid is substituted for ours). The rest: diffusers rotates q, k as complex64
# products (3e-7, notes A2) with float32 cos/sin 1 ulp off in ~1% of entries (test_rope_table).
MODEL_ATOL = 5e-5
BLOCK_RTOL = 1e-5  # block outputs are residual streams up to |6.4|: 5e-5 + 1e-5 x max |ref|
BF16_FACTOR = 1.25  # ours vs torch's bf16 distance from the fp32 reference (conftest); measured up to 1.07


def model(dtype=mx.float32):
    return load_zimage_transformer(fixture_path("zimage", "tiny", "diffusers"), dtype=dtype)


def inputs(io, batch):
    latents = io[f"{batch}.latents"].transpose(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
    lengths = np.array(io[f"{batch}.cap_lengths"]).tolist()
    return latents, io[f"{batch}.t"], io[f"{batch}.cap_feats"], lengths


def nchw(x):
    return x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("batch", ["mask", "nomask"])
def test_transformer_matches_diffusers(batch):
    io = load_fixture("zimage", "tiny", "io.safetensors")
    out = model()(*inputs(io, batch))
    assert out.dtype == mx.float32
    assert_close(f"zimage {batch} (fp32)", nchw(out), io[f"{batch}.out"], atol=MODEL_ATOL)


@pytest.mark.parametrize("batch", ["mask", "nomask"])
def test_transformer_bf16(batch):
    io = load_fixture("zimage", "tiny", "io.safetensors")
    out = model(mx.bfloat16)(*inputs(io, batch))
    assert_bf16_parity(f"zimage {batch}", nchw(out), io[f"{batch}.out"], io[f"{batch}.out.bf16"], BF16_FACTOR)


def _valid_rows(io, name, layout):
    """Rows of a padded-batch block output that carry a token (batch padding is undefined)."""
    if name == "noise_refiner":
        return [layout.img_len] * 2
    if name == "context_refiner":
        return list(layout.cap_lens)
    return [layout.img_len + n for n in layout.cap_lens]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_block_outputs(dtype):
    """The last refiners and the first main block, batch with the mask: values and dtype."""
    io = load_fixture("zimage", "tiny", "io.safetensors")
    m, captured = model(dtype), {}
    latents, t, cap, lengths = inputs(io, "mask")
    m(latents, t, cap, lengths, capture=captured)
    layout = sequence_layout(m.config, latents.shape[1] // 2, latents.shape[2] // 2, lengths)
    assert layout.mask is not None and layout.cap_lens == (32, 64)
    for name in ("noise_refiner", "context_refiner", "layers.0"):
        ours = captured[name]
        assert ours.dtype == dtype, f"{name}: {ours.dtype}"
        for i, n in enumerate(_valid_rows(io, name, layout)):
            ref = io[f"mask.{name}"][i, :n]
            if dtype == mx.float32:
                assert_close(f"zimage {name} sample {i}", ours[i, :n], ref, atol=MODEL_ATOL, rtol=BLOCK_RTOL)
            else:
                assert_bf16_parity(f"zimage {name} sample {i}", ours[i, :n], ref, io[f"mask.{name}.bf16"][i, :n],
                                   BF16_FACTOR)


def test_sample_independent_of_batch():
    """A sample's output depends only on its own padded lengths, not on the batch it is in."""
    io = load_fixture("zimage", "tiny", "io.safetensors")
    m = model()
    latents, t, cap, lengths = inputs(io, "mask")
    alone = m(latents[1:], t[1:], cap[1:], lengths[1:])
    assert_close("zimage sample alone vs in batch", alone, m(latents, t, cap, lengths)[1:], atol=1e-5)


def test_rope_table():
    u = load_fixture("zimage", "units.safetensors")
    cos, sin = axial_rope_fp32_angles(np.array(u["rope.ids"]), (32, 48, 48), 256.0)
    # torch's float32 cos/sin of the same float32 angles: 1 ulp apart in ~1% of entries
    assert_close("zimage rope cos", cos, u["rope.cos"], atol=1.2e-7)
    assert_close("zimage rope sin", sin, u["rope.sin"], atol=1.2e-7)


def test_patchify_order():
    u = load_fixture("zimage", "units.safetensors")
    latents = u["patchify.latents"].transpose(1, 2, 0)[None]  # (C, H, W) -> (1, H, W, C)
    tokens = patchify(latents)
    assert_close("zimage patchify", tokens[0], u["patchify.tokens"], atol=0)
    assert mx.array_equal(unpatchify(tokens, 6, 10), latents)


def test_timestep_embedding():
    u = load_fixture("zimage", "units.safetensors")
    # t already scaled (t_scale 1000): 2 of torch's 128 float32 frequencies are 1 ulp off
    emb = timestep_embedding(u["timestep.t"], 256, time_factor=1.0)
    assert_close("zimage timestep sinusoid", emb, u["timestep.emb"], atol=6e-5)


def test_positions():
    cfg = model().config
    layout = sequence_layout(cfg, 2, 3, [7, 40])
    assert layout.n_img == 6 and layout.img_len == 32 and layout.cap_lens == (32, 64)
    equal = sequence_layout(cfg, 2, 3, [5, 20])
    assert equal.mask is None and equal.cap_mask is None  # both pad to 32: no mask, as diffusers
    from tiny_imagegen.layers.positions import zimage_caption_ids, zimage_image_ids

    assert zimage_caption_ids(3).tolist() == [[1, 0, 0], [2, 0, 0], [3, 0, 0]]
    ids = zimage_image_ids(2, 2, 33, 6)
    assert ids.tolist() == [[33, 0, 0], [33, 0, 1], [33, 1, 0], [33, 1, 1], [0, 0, 0], [0, 0, 0]]


def test_full_size_manifest_maps_exactly():
    manifest = json.loads(fixture_path("zimage", "manifest_z-image-turbo.json").read_text())
    ours = ZImageTransformer(preset("z-image-turbo"))
    expected = parameter_shapes(ours)
    mapped = map_checkpoint(DIFFUSERS, expected, shape_placeholders(manifest))  # raises on any gap
    assert set(mapped) == set(expected)
    n = sum(int(np.prod(s)) for s in manifest.values())
    assert n == sum(int(np.prod(s)) for s in expected.values())
    assert 6.0e9 < n < 6.3e9, n  # Z-Image-Turbo: 6.15 B parameters


def test_config_from_diffusers():
    folder = fixture_path("zimage", "tiny", "diffusers")
    cfg = ZImageConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    assert (cfg.dim, cfg.n_heads, cfg.head_dim, cfg.ffn_hidden, cfg.adaln_dim) == (32, 2, 16, 85, 32)
    assert preset("z-image-turbo").ffn_hidden == 10240 and preset("z-image-turbo").head_dim == 128
    with pytest.raises(ValueError, match="sum\\(axes_dims\\)"):
        ZImageConfig(dim=64, n_heads=2, axes_dims=(8, 12, 8))
    with pytest.raises(ValueError, match="Omni"):
        ZImageConfig.from_diffusers({"siglip_feat_dim": 1152})
    with pytest.raises(ValueError, match="unknown Z-Image preset"):
        preset("z-image")


def test_bad_inputs_are_named():
    m = model()
    cfg = m.config
    lat, t, cap = mx.zeros((1, 4, 6, 16)), mx.ones((1,)), mx.zeros((1, 5, cfg.cap_feat_dim))
    with pytest.raises(ValueError, match="latents must be"):
        m(mx.zeros((1, 4, 6, 3)), t, cap)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(mx.zeros((1, 5, 6, 16)), t, cap)
    with pytest.raises(ValueError, match="cap_feats must be"):
        m(lat, t, mx.zeros((1, 5, 7)))
    with pytest.raises(ValueError, match="cap_lengths"):
        m(lat, t, cap, [6])
    with pytest.raises(ValueError, match="axes_lens"):
        m(mx.zeros((1, 4, 66, 16)), t, cap)  # 33 token rows > axes_lens[1] = 32


def test_learned_pad_tokens_take_part():
    """The pad tokens are attended like real tokens (not masked): changing them moves the output
    far beyond the parity tolerance, so the parity test sees a masking mistake."""
    io = load_fixture("zimage", "tiny", "io.safetensors")
    m = model()
    args = inputs(io, "mask")
    reference = m(*args)
    m.cap_pad_token = mx.zeros_like(m.cap_pad_token)
    assert float(mx.max(mx.abs(m(*args) - reference))) > 100 * MODEL_ATOL


def test_convert_and_quantize(tmp_path):
    """The "zimage_transformer" component round trips bit-identically in fp32 and quantizes
    everything but the boundary layers."""
    from tiny_imagegen.checkpoints.convert import load_component, read_manifest, save_converted

    io = load_fixture("zimage", "tiny", "io.safetensors")
    args = inputs(io, "mask")
    fp32 = save_converted(tmp_path / "fp32", {"zimage_transformer": model()}, dtype="float32")
    converted = load_component(fp32, "zimage_transformer")
    assert_close("zimage converted fp32 vs loaded", converted(*args), model()(*args), atol=0)

    q8 = save_converted(tmp_path / "q8", {"zimage_transformer": model()}, bits=8, group_size=32, dtype="float32")
    layers = read_manifest(q8)["components"]["zimage_transformer"]["quantized_layers"]
    assert "layers.0.attention.qkv" in layers and "layers.0.adaLN_modulation" in layers
    assert not [n for n in layers if n.startswith(("x_embedder", "final_layer", "t_embedder", "cap_embedder"))]
    out = load_component(q8, "zimage_transformer")(*args)
    err, scale = float(mx.max(mx.abs(nchw(out) - io["mask.out"]))), float(mx.max(mx.abs(io["mask.out"])))
    print(f"[quantization] zimage tiny 8-bit, group 32: max abs error vs fp32 {err:.3e} (max |out| {scale:.3f})")
    assert 0 < err < 0.05 * scale


def test_positions_stay_inside_the_reference_tables():
    cfg = model().config  # axes_lens (128, 32, 32): caption ids up to Lp, the image at Lp + 1 < 128
    sequence_layout(cfg, 32, 32, [96])  # Lp 96: image at 97
    with pytest.raises(ValueError, match="axes_lens"):
        sequence_layout(cfg, 2, 2, [127])  # Lp 128: the image would sit at 129
