"""FLUX.2 transformer parity against diffusers' Flux2Transformer2DModel (fixtures from
tests/reference/flux2.py), in float32 and bfloat16, block by block; key tables and manifests."""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.flux2 import BFL, DIFFUSERS, infer_config, load_flux2_transformer
from tiny_imagegen.checkpoints.mapping import CheckpointError, load_checkpoint, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.safetensors_io import read_checkpoint
from tiny_imagegen.layers.embeddings import timestep_embedding
from tiny_imagegen.layers.mlp import swiglu
from tiny_imagegen.layers.norms import rms_norm_rounded_once
from tiny_imagegen.layers.positions import flux2_image_ids, flux2_text_ids
from tiny_imagegen.layers.rope import axial_rope
from tiny_imagegen.models.flux2 import Flux2Config, Flux2Transformer, preset

# fp32 through 4 blocks of width 24 (the timestep sinusoid's few 6e-5 float32 differences, see
# test_mmdit.py, pass through time_in); measured 7e-7 and 1.8e-6
MODEL_ATOL = 2e-5
NAMES = ["klein_tiny", "guidance_tiny"]


def _load(name, dtype=None):
    return load_flux2_transformer(fixture_path("flux2", name, "diffusers"), dtype=dtype)


def run(model, io, intermediates=None):
    return model(io["img"], np.array(io["img_ids"]), io["txt"], np.array(io["txt_ids"]), io["timesteps"],
                 io.get("guidance"), intermediates=intermediates)


def block_outputs(model, io, suffix=""):
    """(name, ours, reference) for every block output."""
    found = []
    run(model, io, found)
    n = model.config.depth_double
    pairs = []
    for i, (img, txt) in enumerate(found[:n]):
        pairs += [(f"double.{i}.img", img, io[f"double.{i}.img{suffix}"]), (f"double.{i}.txt", txt, io[f"double.{i}.txt{suffix}"])]
    pairs += [(f"single.{i}", x, io[f"single.{i}{suffix}"]) for i, x in enumerate(found[n:])]
    return pairs


@pytest.mark.parametrize("name", NAMES)
def test_transformer_matches_diffusers_fp32(name):
    model, io = _load(name), load_fixture("flux2", name, "io.safetensors")
    assert model.config.guidance_embed == (name == "guidance_tiny")
    out = run(model, io)
    assert out.dtype == mx.float32
    assert_close(f"flux2 {name} fp32", out, io["out"], atol=MODEL_ATOL)
    for block, ours, ref in block_outputs(model, io):
        assert_close(f"flux2 {name} {block} fp32", ours, ref, atol=MODEL_ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_transformer_bf16_against_torch_bf16(name):
    """Ours in bf16 is as close to the fp32 reference as torch's bf16 run is (measured ratio
    1.00 / 1.02), and every block computes in bf16."""
    model, io = _load(name, mx.bfloat16), load_fixture("flux2", name, "io.safetensors")
    assert_bf16_parity(f"flux2 {name}", run(model, io), io["out"], io["out_bf16"], factor=1.25)
    for block, ours, ref32 in block_outputs(model, io):
        assert ours.dtype == mx.bfloat16, f"{block} returned {ours.dtype}"
        assert_bf16_parity(f"flux2 {name} {block}", ours, ref32, io[f"{block}_bf16"], factor=1.25)


def test_original_layout_gives_the_same_model():
    folder = fixture_path("flux2", "klein_tiny")
    io = load_fixture("flux2", "klein_tiny", "io.safetensors")
    config = _load("klein_tiny").config
    bfl = load_flux2_transformer(folder / "bfl.safetensors", config=config)
    assert_close("flux2 klein_tiny (original layout)", run(bfl, io), io["out"], atol=MODEL_ATOL)
    # the config read off the file's shapes: all but the RoPE split (12 has no even 4-way split)
    with pytest.raises(CheckpointError, match="axes_dim"):
        load_flux2_transformer(folder / "bfl.safetensors")


def test_config_from_the_shapes_of_an_original_file():
    source = read_checkpoint(fixture_path("flux2", "klein_tiny", "bfl.safetensors"))
    inferred = infer_config(source, axes_dim=(2, 4, 4, 2))
    assert inferred == replace(_load("klein_tiny").config, out_channels=16)


def test_final_layer_order_matters():
    """Swapping the final modulation's halves (the one place the layouts order chunks
    differently) moves the output far beyond tolerance: the parity test sees the order."""
    io = load_fixture("flux2", "klein_tiny", "io.safetensors")
    source = read_checkpoint(fixture_path("flux2", "klein_tiny", "bfl.safetensors"))
    w = source["final_layer.adaLN_modulation.1.weight"]
    source["final_layer.adaLN_modulation.1.weight"] = mx.concatenate(mx.split(w, 2)[::-1])
    model = load_checkpoint(_load("klein_tiny"), BFL, source)
    assert float(mx.abs(run(model, io) - io["out"]).max()) > 100 * MODEL_ATOL


def test_rope_tables_are_diffusers_bitwise():
    u = load_fixture("flux2", "units.safetensors")
    cos, sin = axial_rope(np.array(u["rope.ids"]), (32, 32, 32, 32), theta=2000.0)
    assert_close("flux2 rope cos (theta 2000, 4 axes)", mx.repeat(cos, 2, axis=-1), u["rope.cos"], atol=0)
    assert_close("flux2 rope sin", mx.repeat(sin, 2, axis=-1), u["rope.sin"], atol=0)


def test_bf16_numerics_are_torch_bitwise():
    u = load_fixture("flux2", "units.safetensors")
    bf = lambda k: u[k].astype(mx.bfloat16)  # noqa: E731  (stored as float32, exactly bf16 values)
    out = rms_norm_rounded_once(bf("rmsnorm.x_bf16"), bf("rmsnorm.weight_bf16"), 1e-6)
    assert out.dtype == mx.bfloat16
    assert_close("torch.nn.RMSNorm bf16", out, u["rmsnorm.out_bf16"], atol=0)
    assert_close("SwiGLU bf16", swiglu(bf("swiglu.h_bf16")), u["swiglu.out_bf16"], atol=0)
    # t / 1000 rounded to bf16, x 1000 in bf16 (968, not 967.384), then the float32 sinusoid
    t = bf("timestep.t_bf16")
    assert (t * 1000)[0].item() == 968.0
    emb = timestep_embedding(t * 1000, time_factor=1.0).astype(mx.bfloat16)
    assert_close("timestep embedding bf16", emb, u["timestep.emb_bf16"], atol=2 ** -7)


def test_position_ids_are_the_pipelines():
    io = load_fixture("flux2", "klein_tiny", "io.safetensors")
    assert np.array_equal(flux2_image_ids(3, 5), np.array(io["img_ids"]))
    assert np.array_equal(flux2_text_ids(7), np.array(io["txt_ids"]))
    txt_ids, img_ids = Flux2Transformer.position_ids(3, 5, 7)
    assert np.array_equal(img_ids, flux2_image_ids(3, 5)) and np.array_equal(txt_ids, flux2_text_ids(7))


@pytest.mark.parametrize("name", ["flux2-klein-4b", "flux2-klein-9b"])
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_full_size_manifest_maps_completely(name, layout):
    manifest = json.loads(fixture_path("flux2", f"manifest_{name}_{layout}.json").read_text())
    ours = parameter_shapes(Flux2Transformer(preset(name)))  # lazy: nothing allocated
    mapped = map_checkpoint({"bfl": BFL, "diffusers": DIFFUSERS}[layout], ours, shape_placeholders(manifest))
    assert set(mapped) == set(ours) and all(tuple(mapped[k].shape) == ours[k] for k in ours)
    n = sum(v.size for v in mapped.values())
    print(f"{name} ({layout}): {len(manifest)} tensors -> {len(ours)} parameters, {n:,} values")
    assert n == sum(int(np.prod(s)) for s in manifest.values())  # every value of the checkpoint, once
    assert n == {"flux2-klein-4b": 3_875_544_576, "flux2-klein-9b": 9_078_581_248}[name]  # as README states


def test_no_biases_anywhere():
    shapes = parameter_shapes(Flux2Transformer(preset("flux2-klein-4b")))
    assert not [k for k in shapes if k.endswith(".bias")]


def test_errors_are_named():
    model, io = _load("guidance_tiny"), load_fixture("flux2", "guidance_tiny", "io.safetensors")
    with pytest.raises(ValueError, match="guidance"):
        model(io["img"], np.array(io["img_ids"]), io["txt"], np.array(io["txt_ids"]), io["timesteps"])
    with pytest.raises(ValueError, match="packed latents"):
        model(io["img"][..., :4], np.array(io["img_ids"]), io["txt"], np.array(io["txt_ids"]), io["timesteps"])
    batched_ids = np.repeat(np.array(io["img_ids"])[None], 2, axis=0)
    with pytest.raises(ValueError, match="shared by the batch"):
        model(io["img"], batched_ids, io["txt"], np.array(io["txt_ids"]), io["timesteps"], io["guidance"])
    with pytest.raises(ValueError, match="unknown FLUX.2 preset"):
        preset("flux2-klein-2b")
    with pytest.raises(ValueError, match="sum to head_dim"):
        Flux2Config(head_dim=64)


def test_not_a_flux2_checkpoint(tmp_path):
    flux1 = fixture_path("flux_transformer", "dev_tiny")
    with pytest.raises(CheckpointError, match="not a Flux2Transformer2DModel"):
        load_flux2_transformer(flux1 / "diffusers")
    with pytest.raises(CheckpointError, match="not a FLUX.2 transformer"):
        load_flux2_transformer(flux1 / "bfl.safetensors")


# ---- our converted format, quantized ------------------------------------------------------------


def _small_random(seed=0):
    mx.random.seed(seed)  # widths that are multiples of the group size, so that layers quantize
    return Flux2Transformer(Flux2Config(in_channels=64, num_heads=2, head_dim=32, depth_double=1, depth_single=1,
                                        context_dim=64, axes_dim=(8, 8, 8, 8)))


def _inputs():
    g = np.random.default_rng(0)
    img, txt = mx.array(g.standard_normal((1, 6, 64)), mx.float32), mx.array(g.standard_normal((1, 5, 64)), mx.float32)
    txt_ids, img_ids = Flux2Transformer.position_ids(2, 3, 5)
    return img, img_ids, txt, txt_ids, mx.array([0.5])


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_converted_round_trip(tmp_path, bits):
    from tiny_imagegen.checkpoints.convert import load_component, read_manifest, save_converted
    from tiny_imagegen.checkpoints.quantize import quantize_component

    out = save_converted(tmp_path / "klein", {"flux2_transformer": _small_random()}, bits=bits, dtype="float32")
    reloaded = load_component(out, "flux2_transformer")
    expected = _small_random()
    layers = quantize_component("flux2_transformer", expected, bits) if bits else []
    assert reloaded.config == expected.config
    assert read_manifest(out)["components"]["flux2_transformer"]["quantized_layers"] == layers
    assert_close(f"flux2 converted ({bits or 'fp32'})", reloaded(*_inputs()), expected(*_inputs()), atol=0)
    if bits:
        assert "single_blocks.0.linear1" in layers and "double_blocks.0.img_mlp.layers.0" in layers
        kept = ("img_in", "final_layer", "time_in", "double_stream_modulation_img", "double_stream_modulation_txt",
                "single_stream_modulation")
        assert not [p for p in layers if p.split(".")[0] in kept]


def test_full_size_quantization_keeps_the_boundary_and_the_shared_modulation():
    from mlx.utils import tree_flatten

    from tiny_imagegen.checkpoints.quantize import quantizable_layers

    model = Flux2Transformer(preset("flux2-klein-4b"))  # lazy
    layers = set(quantizable_layers("flux2_transformer", model, 64))
    modules = dict(model.named_modules())
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    quantized = sum(modules[p].weight.size for p in layers)
    print(f"klein 4B: {1 - quantized / total:.2%} of the parameters kept unquantized")
    assert 0.04 < 1 - quantized / total < 0.05
