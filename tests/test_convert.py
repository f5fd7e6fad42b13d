"""Our weights format (checkpoints/convert.py): round trips in fp32, 8-bit and 4-bit, every
component of a tiny FLUX repo, and the errors a damaged folder gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from conftest import assert_close, fixture_path, load_fixture, relative_l2
from test_hub import COMMIT, cache_snapshot, needed, repo_files, tiny_flux_repo
from tiny_imagegen.checkpoints.components import COMPONENTS, import_ref
from tiny_imagegen.registry.convert import convert
from tiny_imagegen.checkpoints.convert import ConvertedModelError, load_component, load_converted, read_manifest, save_converted
from tiny_imagegen.checkpoints.quantize import quantize_component
from tiny_imagegen.checkpoints.safetensors_io import write_safetensors
from tiny_imagegen.checkpoints.flux import load_flux_transformer
from tiny_imagegen.registry.hub import is_converted, resolve_model
from tiny_imagegen.registry import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
MODEL_ATOL = 2e-5  # as test_mmdit: the fixture's diffusers output vs ours in fp32


def dev_tiny():
    return load_flux_transformer(fixture_path("flux_transformer", "dev_tiny", "diffusers"))


def run(model, io):
    return model(io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"], io.get("guidance"))


def params(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def test_fp32_round_trip_is_bit_identical(tmp_path):
    io = load_fixture("flux_transformer", "dev_tiny", "io.safetensors")
    original = dev_tiny()
    out = save_converted(tmp_path / "dev-fp32", {"transformer": original}, dtype="float32", source={"path": "fixture"})
    reloaded = load_component(out, "transformer")
    assert reloaded.config == original.config
    assert all(mx.array_equal(v, params(original)[k]) for k, v in params(reloaded).items())
    assert_close("converted fp32 vs in memory", run(reloaded, io), run(original, io), atol=0)
    assert_close("converted fp32 vs diffusers", run(reloaded, io), io["out"], atol=MODEL_ATOL)
    manifest = read_manifest(out)
    assert manifest["quantization"] is None and manifest["source"] == {"path": "fixture"}
    assert manifest["components"]["transformer"]["parameters"] == sum(v.size for v in params(original).values())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_round_trip_equals_quantizing_in_memory(tmp_path, bits):
    io = load_fixture("flux_transformer", "dev_tiny", "io.safetensors")
    fp32 = run(dev_tiny(), io)
    out = save_converted(tmp_path / f"dev-q{bits}", {"transformer": dev_tiny()}, bits=bits, dtype="float32")
    in_memory = dev_tiny()
    layers = quantize_component("transformer", in_memory, bits, group_size=64)
    reloaded = load_component(out, "transformer")
    assert_close(f"converted {bits}-bit vs quantized in memory", run(reloaded, io), run(in_memory, io), atol=0)

    # the rule: block Linears quantized; img_in, the embedders and final_layer kept (the fixture's
    # txt_in, 40 wide, is no multiple of 64 and stays too)
    entry = read_manifest(out)["components"]["transformer"]
    assert entry["quantized_layers"] == layers and "double_blocks.1.txt_mlp.layers.2" in layers
    assert "single_blocks.0.linear1" in layers and "single_blocks.1.modulation.lin" in layers
    assert not [p for p in layers if p.split(".")[0] in ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")]
    assert len(layers) == 2 * 10 + 2 * 3

    # what quantization costs on this tiny random-weight model: relative L2 vs fp32, bounded by the
    # measured value x 1.5 (the bounds on a FLUX-proportioned model: tests/test_quantization.py)
    err = relative_l2(run(reloaded, io), fp32)
    print(f"[quantization] dev_tiny {bits}-bit, group 64: relative L2 vs fp32 {err:.3e}")
    measured = {8: 9.7e-3, 4: 1.94e-1}[bits]
    assert measured / 1.5 <= err <= measured * 1.5


def test_every_component_of_a_flux_repo_round_trips(tmp_path):
    repo = tiny_flux_repo(tmp_path / "FLUX.1-schnell")
    out = convert(repo, tmp_path / "schnell-q4", bits=4, dtype="float32")
    assert is_converted(out) and resolve_model(out) == out
    manifest = read_manifest(out)
    flux = {name: COMPONENTS[name] for name in FAMILIES["flux1"].components}  # other families' components: not here
    assert sorted(manifest["components"]) == sorted(flux)
    assert manifest["source"] == {"path": str(repo.resolve())}
    assert not manifest["components"]["vae"]["quantized_layers"]  # the VAE is never quantized
    assert manifest["components"]["t5"]["quantized_layers"] and manifest["components"]["clip"]["quantized_layers"]

    reloaded = load_converted(out)
    for name, spec in flux.items():
        expected = import_ref(spec.loader)(repo / spec.source_folder)
        if spec.quantize:
            quantize_component(name, expected, 4)
        got, want = params(reloaded[name]), params(expected)
        assert sorted(got) == sorted(want), name
        assert all(got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]) for k in want), name
    for name in ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/spiece.model", "scheduler/scheduler_config.json"):
        assert (out / name).read_bytes() == (repo / name).read_bytes()
        assert name in manifest["files"]
    assert not (out / "flux1-schnell.safetensors").exists()

    # an unquantized converted folder can be quantized later, to the same bytes
    fp = convert(repo, tmp_path / "schnell-fp32", dtype="float32")
    again = convert(fp, tmp_path / "schnell-q4-again", bits=4, dtype="float32")
    files = lambda folder: {k: v for k, v in read_manifest(folder)["files"].items() if k.endswith(".safetensors")}
    assert files(again) == files(out)
    assert read_manifest(again)["source"]["converted_from"] == str(fp.resolve())
    with pytest.raises(ValueError, match="already quantized"):
        convert(out, tmp_path / "twice", bits=8)


def test_output_is_deterministic(tmp_path):
    first = save_converted(tmp_path / "a", {"transformer": dev_tiny()}, bits=4, dtype="bfloat16")
    second = save_converted(tmp_path / "b", {"transformer": dev_tiny()}, bits=4, dtype="bfloat16")
    assert (first / "model.json").read_bytes() == (second / "model.json").read_bytes()
    assert (first / "transformer.safetensors").read_bytes() == (second / "transformer.safetensors").read_bytes()
    assert mx.load(str(first / "transformer.safetensors"))["img_in.weight"].dtype == mx.bfloat16


def test_conversion_streams_one_tensor_at_a_time(tmp_path):
    """A full-size model must not be held in memory while it is written: mx.save_safetensors
    would evaluate every tensor at once. Here a 150 MB model goes through with a few MB."""
    from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig

    config = MMDiTConfig(num_heads=4, head_dim=128, depth_double=2, depth_single=2, axes_dim=(16, 56, 56))
    model = MMDiT(config)
    source = save_converted(tmp_path / "source", {"transformer": model}, dtype="float32")
    total = read_manifest(source)["files"]["transformer.safetensors"]["size"]
    largest = max(v.nbytes for v in params(model).values())
    del model
    mx.clear_cache()
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()
    convert(source, tmp_path / "q4", bits=4)  # read lazily, cast to bf16, quantized, written
    peak = mx.get_peak_memory() - baseline
    print(f"[memory] converting {total / 1e6:.0f} MB: peak {peak / 1e6:.1f} MB (largest tensor {largest / 1e6:.1f} MB)")
    assert total > 100e6 and peak < 4 * largest and peak < total / 8


# ---- damaged folders ------------------------------------------------------------------------------


@pytest.fixture
def converted(tmp_path) -> Path:
    return save_converted(tmp_path / "dev", {"transformer": dev_tiny()}, dtype="float32")


def test_truncated_file_is_named(converted):
    path = converted / "transformer.safetensors"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(ConvertedModelError, match=r"transformer\.safetensors is 100,000 bytes.*truncated"):
        load_component(converted, "transformer")


def test_corrupt_file_is_caught_by_its_sha256(converted):
    path = converted / "transformer.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    load_component(converted, "transformer")  # same size: only the hash can tell
    with pytest.raises(ConvertedModelError, match=r"transformer\.safetensors does not match its sha256"):
        load_component(converted, "transformer", verify=True)


def test_missing_and_misshaped_keys_are_named(converted):
    path = converted / "transformer.safetensors"
    tensors = dict(mx.load(str(path)))
    del tensors["double_blocks.0.img_attn.qkv.bias"]
    tensors["img_in.weight"] = tensors["img_in.weight"][:, :8]
    mx.eval(list(tensors.values()))  # read before the file is rewritten
    record = write_safetensors(path, tensors)
    manifest = json.loads((converted / "model.json").read_text())
    manifest["files"]["transformer.safetensors"] = record  # sizes agree: the key check must catch it
    (converted / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(ConvertedModelError) as e:
        load_component(converted, "transformer")
    message = str(e.value)
    assert "1 missing key(s): double_blocks.0.img_attn.qkv.bias" in message
    assert "img_in.weight: expected (64, 16), found (64, 8)" in message


def test_missing_file_and_unknown_component(converted):
    with pytest.raises(ConvertedModelError, match="has no component 't5'"):
        load_component(converted, "t5")
    (converted / "transformer.safetensors").unlink()
    with pytest.raises(ConvertedModelError, match=r"transformer\.safetensors is missing"):
        load_component(converted, "transformer")


def test_refuses_to_overwrite_and_never_leaves_a_partial_folder(tmp_path):
    target = save_converted(tmp_path / "dev", {"transformer": dev_tiny()}, dtype="float32")
    before = (target / "model.json").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        save_converted(target, {"transformer": dev_tiny()}, bits=8)

    def broken():
        raise RuntimeError("interrupted while reading the source")

    with pytest.raises(RuntimeError, match="interrupted"):
        save_converted(target, {"transformer": dev_tiny(), "vae": broken}, bits=8, force=True)
    assert (target / "model.json").read_bytes() == before  # the old folder is untouched
    save_converted(target, {"transformer": dev_tiny()}, bits=8, force=True)
    assert read_manifest(target)["quantization"]["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev"]  # no temporary folders left


# ---- the command ----------------------------------------------------------------------------------


def convert_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "examples/convert.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_convert_command(tmp_path):
    repo = tiny_flux_repo(tmp_path / "FLUX.1-schnell")
    out = tmp_path / "weights" / "schnell-q8"
    run = convert_command("--model", str(repo), "--output", str(out), "--quantize", "8", "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    print(run.stdout)
    assert "transformer" in run.stdout and f"wrote {out}" in run.stdout
    assert read_manifest(out)["quantization"] == {"bits": 8, "group_size": 64, "mode": "affine"}

    again = convert_command("--model", str(repo), "--output", str(out))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0
    assert again.stderr.startswith(f"error: {out} exists") and "--force" in again.stderr

    unknown = convert_command("--model", "flux3-turbo", "--output", str(tmp_path / "x"))
    assert unknown.returncode == 2 and "flux1-schnell, flux1-dev" in unknown.stderr
    assert unknown.stderr.strip().count("\n") == 0


def test_convert_command_from_the_hub_cache_offline(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf_home")}
    out = tmp_path / "weights" / "schnell"
    missing = convert_command("--model", "flux1-schnell", "--output", str(out), env=offline)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "HF_HUB_OFFLINE=1" in missing.stderr and "hf download black-forest-labs/FLUX.1-schnell" in missing.stderr

    cache_snapshot(tmp_path / "cache", "black-forest-labs/FLUX.1-schnell", needed(repo_files(tiny_flux_repo(tmp_path / "repo"))))
    run = convert_command("--model", "flux1-schnell", "--output", str(out), "--quantize", "4", env=offline)
    assert run.returncode == 0, run.stderr
    manifest = read_manifest(out)
    assert manifest["source"] == {"repo_id": "black-forest-labs/FLUX.1-schnell", "revision": COMMIT, "model": "flux1-schnell"}
    assert manifest["dtype"] == "bfloat16" and manifest["quantization"]["bits"] == 4
