"""FLUX.2's VAE (AutoencoderKLFlux2) and the klein pipeline's latent normalisation against
diffusers, fp32 and bf16 (fixtures: tests/reference/flux2_vae.py). A small model of the published
structure (four levels, 32 latent channels, quant convs), batch 2, non-square; BatchNorm
statistics far from (0, 1) so that a missing or misplaced normalisation shows."""

import json

import mlx.core as mx
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.flux2 import VAE_DIFFUSERS, load_flux2_vae
from tiny_imagegen.checkpoints.mapping import CheckpointError, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.models.vae_flux2 import AutoencoderKLFlux2, Flux2VAEConfig, patchify, unpatchify

RTOL = 1e-5  # of the largest reference value, as tests/test_vae.py
BF16_FACTOR = 1.5  # measured ratios to torch's own bf16 error: see the printed lines


@pytest.fixture(scope="module")
def io():
    return load_fixture("flux2_vae", "small", "io.safetensors")


def load(dtype=None):
    return load_flux2_vae(fixture_path("flux2_vae", "small", "diffusers"), dtype=dtype)


def tokens_grid(io):
    h, w = (int(v) for v in io["tokens_hw"].tolist())
    return io["tokens"].reshape(io["tokens"].shape[0], h, w, -1)  # row-major tokens = the packed grid


def test_config_from_diffusers():
    cfg = load().config
    assert (cfg.latent_channels, cfg.packed_channels, cfg.batch_norm_eps) == (32, 128, 1e-4)
    assert cfg.use_quant_conv and cfg.use_post_quant_conv and cfg.block_out_channels == (8, 16, 16, 16)
    default = Flux2VAEConfig.from_dict({})  # AutoencoderKLFlux2's own defaults
    assert default.block_out_channels == (128, 256, 512, 512) and default.layers_per_block == 2
    with pytest.raises(ValueError, match="decoder_block_out_channels"):
        Flux2VAEConfig.from_dict({"decoder_block_out_channels": [64, 128, 256, 256]})


def test_encode_decode_fp32(io):
    vae = load()
    q = vae.encode(io["images"])
    assert_close("flux2 vae encode mean", q.mean, io["mean"], 0, RTOL)
    assert_close("flux2 vae encode logvar", q.logvar, io["logvar"], 0, RTOL)
    assert_close("flux2 vae decode", vae.decode(io["z"]), io["decode"], 0, RTOL)


def test_pipeline_normalisation_fp32(io):
    """Encode: patchify(mode) then (z - mean) / sqrt(var + eps); decode: the inverse, from the
    sampler's packed tokens (FP:464-477, 906-922)."""
    vae = load()
    assert_close("flux2 encode_latents (patchify + BN)", vae.encode_latents(io["images"], sample=False),
                 io["encode_latents"], 0, RTOL)
    assert_close("flux2 from_latents (BN + unpatchify)", vae.from_latents(tokens_grid(io)), io["decode_latents_z"], 0, RTOL)
    assert_close("flux2 decode_latents", vae.decode_latents(tokens_grid(io)), io["decode_latents"], 0, RTOL)


def test_bf16_against_torch_bf16(io):
    vae = load(mx.bfloat16)
    assert vae.bn.running_var.dtype == mx.bfloat16  # the sqrt is taken in bf16, as torch's bf16 buffers
    images = io["images"].astype(mx.bfloat16)
    q = vae.encode(images)
    checks = {
        "mean": q.mean,
        "decode": vae.decode(io["z"].astype(mx.bfloat16)),
        "encode_latents": vae.encode_latents(images, sample=False),
        "decode_latents_z": vae.from_latents(tokens_grid(io).astype(mx.bfloat16)),
        "decode_latents": vae.decode_latents(tokens_grid(io).astype(mx.bfloat16)),
    }
    for name, ours in checks.items():
        assert_bf16_parity(f"flux2 vae {name}", ours, io[name], io[f"{name}_bf16"], factor=BF16_FACTOR)
    # the BN part alone is torch's bitwise: the same error as torch's bf16
    assert_bf16_parity("flux2 vae BN de-normalise alone", checks["decode_latents_z"], io["decode_latents_z"],
                       io["decode_latents_z_bf16"], factor=1.0)


def test_tiled_decode_bf16_values(io):
    vae = load(mx.bfloat16)
    tiled = vae.decode(io["z_tiled"].astype(mx.bfloat16), tiled=True, tile=4, overlap=1)
    assert_bf16_parity("flux2 vae tiled decode", tiled.astype(mx.bfloat16), io["decode_tiled"], io["decode_tiled_bf16"],
                       factor=BF16_FACTOR)


def test_tiled_decode_bf16_dtype(io):  # the tiles' blend keeps the VAE's dtype
    vae = load(mx.bfloat16)
    assert vae.decode(io["z_tiled"].astype(mx.bfloat16), tiled=True, tile=4, overlap=1).dtype == mx.bfloat16


def test_tiled_decode_matches_diffusers(io):
    vae = load()
    tiled = vae.decode(io["z_tiled"], tiled=True, tile=4, overlap=1)
    assert_close("flux2 vae tiled decode", tiled, io["decode_tiled"], 0, RTOL)
    whole = vae.decode(io["z_tiled"], tiled=False)
    assert float(mx.abs(tiled - whole).max()) > 1e-3  # tiles really were decoded separately


def test_patchify_is_channel_major():
    z = mx.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3).astype(mx.float32)
    x = patchify(z)  # (2, 2, 3, 12)
    # packed channel c*4 + 2*dy + dx of patch (i, j) is z[2i + dy, 2j + dx, c]
    assert x[1, 1, 2, 2 * 4 + 2 * 1 + 0].item() == z[1, 3, 4, 2].item()
    assert mx.array_equal(unpatchify(x), z)


def test_full_size_manifest_maps_completely():
    manifest = json.loads(fixture_path("flux2_vae", "manifest_flux2_diffusers.json").read_text())
    ours = parameter_shapes(AutoencoderKLFlux2(Flux2VAEConfig()))  # lazy
    mapped = map_checkpoint(VAE_DIFFUSERS, ours, shape_placeholders(manifest))
    assert set(mapped) == set(ours)
    n = sum(v.size for v in mapped.values())
    print(f"AutoencoderKLFlux2 (defaults): {len(manifest)} tensors -> {len(ours)} parameters, {n:,} values")
    assert n == sum(int(mx.array(s).prod().item()) for k, s in manifest.items() if k != "bn.num_batches_tracked")


def test_bad_input_is_named(io):
    vae = load()
    with pytest.raises(ValueError, match=r"\(B, H, W, 128\)"):
        vae.decode_latents(io["z"])  # unpacked z is not what the sampler hands over
    with pytest.raises(CheckpointError, match="diffusers vae/ folder"):
        load_flux2_vae(fixture_path("flux2_vae", "small", "diffusers", "diffusion_pytorch_model.safetensors"))
