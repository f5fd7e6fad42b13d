"""Qwen-Image's VAE against diffusers' AutoencoderKLQwenImage (fixtures from tests/reference/qwen_vae.py):
the one-frame causal 3-D convolution as a 2-D one, encode, decode, tiled decode in fp32 and bf16,
the latents' normalisation, the full-size manifest."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.mapping import CheckpointError, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.qwen_image import VAE_DIFFUSERS, causal_conv_on_one_frame, load_qwen_vae, pointwise
from tiny_imagegen.models.vae_qwen import AutoencoderKLQwenImage, QwenVAEConfig

ATOL = 2e-5  # fp32, ~20 convolutions of width <= 16 (measured below 1e-6)


def _nhwc(x):
    return mx.transpose(x, (0, 2, 3, 1))


def _load(dtype=None):
    return load_qwen_vae(fixture_path("qwen_vae", "tiny", "diffusers"), dtype=dtype)


def test_one_frame_causal_conv3d_is_a_conv2d_with_the_last_time_slice():
    """diffusers' QwenImageCausalConv3d on one frame == Conv2d(W[:, :, -1]); 1x1x1 == Linear(W[:, :, 0])."""
    u = load_fixture("qwen_vae", "units.safetensors")
    conv = nn.Conv2d(5, 6, 3, padding=1)
    conv.weight, conv.bias = causal_conv_on_one_frame([u["conv3.weight"]]), u["conv3.bias"]
    assert_close("causal conv3d (one frame) as conv2d", conv(_nhwc(u["conv3.x"])), _nhwc(u["conv3.out"]), atol=1e-6)
    # the other two time slices do not matter: zero them, nothing moves
    w = u["conv3.weight"] * mx.array([0.0, 0.0, 1.0]).reshape(1, 1, 3, 1, 1)
    assert mx.array_equal(causal_conv_on_one_frame([w]), conv.weight)
    lin = nn.Linear(5, 6)
    lin.weight, lin.bias = pointwise([u["conv1.weight"]]), u["conv1.bias"]
    assert_close("1x1x1 conv as Linear", lin(_nhwc(u["conv1.x"])), _nhwc(u["conv1.out"]), atol=1e-6)


def test_encode_and_decode_match_diffusers_fp32():
    vae, io = _load(), load_fixture("qwen_vae", "tiny", "io.safetensors")
    q = vae.encode(_nhwc(io["images"]))
    assert_close("qwen vae encode mean fp32 (24x40)", q.mean, _nhwc(io["mean"]), atol=ATOL)
    assert_close("qwen vae encode logvar fp32", q.logvar, _nhwc(io["logvar"]), atol=ATOL)
    decoded = vae.decode(_nhwc(io["z"]))
    assert decoded.dtype == mx.float32 and float(mx.abs(decoded).max()) <= 1.0
    assert_close("qwen vae decode fp32 (3x5 latents)", decoded, _nhwc(io["decoded"]), atol=ATOL)
    tiled = vae.decode(_nhwc(io["z_big"]), tiled=True, tile=4, overlap=1)
    assert_close("qwen vae tiled decode fp32 (7x9 latents, 4-latent tiles)", tiled, _nhwc(io["tiled"]), atol=ATOL)


def test_encode_and_decode_bf16_against_torch_bf16():
    vae, io = _load(mx.bfloat16), load_fixture("qwen_vae", "tiny", "io.safetensors")
    q = vae.encode(_nhwc(io["images"]))
    assert_bf16_parity("qwen vae encode mean", q.mean, _nhwc(io["mean"]), _nhwc(io["mean_bf16"]), factor=1.5)
    assert_bf16_parity("qwen vae decode", vae.decode(_nhwc(io["z"])), _nhwc(io["decoded"]), _nhwc(io["decoded_bf16"]),
                       factor=1.5)
    tiled = vae.decode(_nhwc(io["z_big"]), tiled=True, tile=4, overlap=1)
    assert_bf16_parity("qwen vae tiled decode", tiled, _nhwc(io["tiled"]), _nhwc(io["tiled_bf16"]), factor=1.5)


def test_latents_normalisation_round_trips():
    vae = AutoencoderKLQwenImage(QwenVAEConfig(latent_channels=4, block_out_channels=(4, 8, 16, 16),
                                               latents_mean=(0.1, -0.5, 0.9, -0.2), latents_std=(2.5, 1.5, 0.75, 1.25)))
    z = mx.random.normal((1, 2, 3, 4), key=mx.random.key(0))
    latents = vae.to_latents(z)
    expected = (np.array(z) - np.array([0.1, -0.5, 0.9, -0.2])) / np.array([2.5, 1.5, 0.75, 1.25])
    assert_close("qwen vae (z - mean) / std", latents, expected, atol=1e-6)
    assert_close("qwen vae round trip", vae.from_latents(latents), z, atol=1e-6)


def test_full_size_manifest_maps_completely():
    manifest = json.loads(fixture_path("qwen_vae", "manifest_qwen-image.json").read_text())
    ours = parameter_shapes(AutoencoderKLQwenImage(QwenVAEConfig()))
    mapped = map_checkpoint(VAE_DIFFUSERS, ours, shape_placeholders(manifest))
    assert set(mapped) == set(ours) and all(tuple(mapped[k].shape) == ours[k] for k in ours)
    total = sum(int(np.prod(s)) for s in manifest.values())
    unread = sum(int(np.prod(s)) for k, s in manifest.items() if ".time_conv." in k)
    n = sum(int(np.prod(s)) for s in ours.values())
    print(f"qwen vae: {len(manifest)} tensors, {total:,} values; ours {n:,}; time_conv (unread) {unread:,}")
    assert total == 126_892_531 and unread == 2_324_544
    # each 3x3x3 kernel keeps one of its three time slices
    kernels = sum(int(np.prod(s)) for k, s in manifest.items() if len(s) == 5 and s[2] == 3 and ".time_conv." not in k)
    assert n == total - unread - kernels * 2 // 3


def test_bad_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"attn_scales": [0.5]}))
    with pytest.raises(CheckpointError, match="attn_scales"):
        load_qwen_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"dim_mult": [2, 2, 4, 4]}))  # conv_in is base_dim wide
    with pytest.raises(CheckpointError, match="dim_mult"):
        load_qwen_vae(tmp_path)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        _load().encode(mx.zeros((1, 3, 16, 16)))
