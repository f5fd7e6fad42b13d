"""Full-size FLUX.1 key/shape manifests map completely onto our MM-DiT; bad checkpoints are named."""

import json

import mlx.core as mx
import pytest

from conftest import fixture_path
from tiny_imagegen.checkpoints.flux import BFL, DIFFUSERS, load_flux_transformer
from tiny_imagegen.checkpoints.mapping import (
    CheckpointError, load_checkpoint, map_checkpoint, parameter_shapes, shape_placeholders,
)
from tiny_imagegen.checkpoints.safetensors_io import read_checkpoint
from tiny_imagegen import registry
from tiny_imagegen.models.mmdit import MMDiT

TABLES = {"bfl": BFL, "diffusers": DIFFUSERS}


@pytest.mark.parametrize("model", ["flux1-schnell", "flux1-dev"])
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_full_size_manifest_maps_completely(model, layout):
    manifest = json.loads(fixture_path("flux_transformer", f"manifest_{model}_{layout}.json").read_text())
    ours = parameter_shapes(MMDiT(registry.find(model).configs["transformer"]))  # lazy: nothing allocated
    mapped = map_checkpoint(TABLES[layout], ours, shape_placeholders(manifest))  # raises on any gap
    assert set(mapped) == set(ours)
    assert all(tuple(mapped[k].shape) == ours[k] for k in ours)
    n = sum(v.size for v in mapped.values())
    print(f"{model} ({layout}): {len(manifest)} tensors -> {len(ours)} parameters, {n:,} values")
    assert n == {"flux1-schnell": 11_891_178_560, "flux1-dev": 11_901_408_320}[model]


def _dev_source():
    return read_checkpoint(fixture_path("flux_transformer", "dev_tiny", "bfl.safetensors"))


def _dev_model():
    return load_flux_transformer(fixture_path("flux_transformer", "dev_tiny", "diffusers"))


def test_missing_key_is_named():
    source = _dev_source()
    del source["double_blocks.1.txt_attn.qkv.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*\n.*double_blocks\.1\.txt_attn\.qkv\.weight"):
        load_checkpoint(_dev_model(), BFL, source)


def test_unexpected_key_is_named():
    source = _dev_source()
    source["double_blocks.9.img_mod.lin.weight"] = mx.zeros((3, 3))
    with pytest.raises(CheckpointError, match=r"unexpected.*\n.*double_blocks\.9\.img_mod\.lin\.weight \(3, 3\)"):
        load_checkpoint(_dev_model(), BFL, source)


def test_wrong_shape_names_expected_and_found():
    source = _dev_source()
    source["txt_in.weight"] = mx.zeros((64, 41))
    with pytest.raises(CheckpointError, match=r"txt_in\.weight: expected \(64, 40\), found \(64, 41\)"):
        load_checkpoint(_dev_model(), BFL, source)


def test_fused_qkv_shape_error_names_every_part():
    folder = fixture_path("flux_transformer", "dev_tiny", "diffusers")
    source = read_checkpoint(folder)
    source["transformer_blocks.0.attn.to_k.weight"] = mx.zeros((32, 64))
    with pytest.raises(CheckpointError, match=r"to_q\.weight \(64, 64\), .*to_k\.weight \(32, 64\)"):
        load_checkpoint(_dev_model(), DIFFUSERS, source)


def test_truncated_file_is_a_clear_error(tmp_path):
    data = fixture_path("flux_transformer", "dev_tiny", "bfl.safetensors").read_bytes()
    (tmp_path / "flux.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*flux\.safetensors.*incomplete download"):
        load_flux_transformer(tmp_path / "flux.safetensors")


def test_shard_listed_in_index_but_absent(tmp_path):
    folder = fixture_path("flux_transformer", "dev_tiny", "diffusers")
    for f in folder.iterdir():
        if "00002" not in f.name:
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_flux_transformer(tmp_path)


def test_not_a_flux_checkpoint(tmp_path):
    mx.save_safetensors(str(tmp_path / "x.safetensors"), {"encoder.conv_in.weight": mx.zeros((1,))})
    with pytest.raises(CheckpointError, match="not a FLUX transformer"):
        load_flux_transformer(tmp_path / "x.safetensors")
