"""LoRA files of every format against diffusers' load_lora_weights + fuse_lora (tests/reference/flux_lora.py),
and a LoRA beside a quantized model against the merged fp32 one."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from conftest import assert_close, fixture_path, load_fixture
from test_pipeline import PROMPTS, hub_folder
from tiny_imagegen.checkpoints.flux import load_flux_transformer
from tiny_imagegen.checkpoints.lora import apply_loras, parse_lora_spec
from tiny_imagegen.checkpoints.mapping import CheckpointError
from tiny_imagegen.layers.embeddings import pack_latents
from tiny_imagegen.layers.lora import LoRALinear
from tiny_imagegen.pipelines.pipeline import Pipeline

CASES = {  # as the fixture maker's CASES: (file, weight)
    "diffusers": [("diffusers", 0.7)],
    "kohya": [("kohya", 1.0)],
    "comfyui": [("comfyui", 1.0)],
    "xlabs": [("xlabs", 1.0)],
    "bfl": [("bfl", 1.0)],
    "two": [("diffusers", 0.8), ("kohya", -0.5)],
}
MODEL_ATOL = 2e-5  # one call of the tiny fp32 transformer, as test_mmdit
# four steps, as test_pipeline (1e-5 there); the adapters about double the weights' size (B A has
# std 0.09 against the base's 0.1) and reach CLIP too: measured up to 2.9e-5
LATENTS_ATOL = 5e-5


def files(case):
    return [(fixture_path("flux_lora", f"{name}.safetensors"), w) for name, w in CASES[case]]


def transformer():
    return load_flux_transformer(fixture_path("flux_pipeline", "dev_like", "transformer"))


def run(model, io):
    return model(io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"], io["guidance"])


@pytest.mark.parametrize("case", list(CASES))
def test_transformer_output_matches_diffusers(case):
    io = load_fixture("flux_lora", "io.safetensors")
    model = transformer()
    assert_close("lora: base transformer", run(model, io), io["base.out"], atol=MODEL_ATOL)
    records = apply_loras(model, files(case), skip_clip=True)  # diffusers' transformer is independent of CLIP
    assert all(r["applied"] == "merged" for r in records)
    assert_close(f"lora {case}: transformer output", run(model, io), io[f"{case}.out"], atol=MODEL_ATOL)
    # the adapter changes the output far beyond the tolerance (so the comparison can fail)
    assert float(mx.max(mx.abs(io[f"{case}.out"] - io["base.out"]))) > 1e-2


@pytest.mark.parametrize("case", ["diffusers", "kohya", "comfyui", "xlabs", "bfl", "two"])
def test_four_steps_match_diffusers(tmp_path, case):
    io = load_fixture("flux_lora", "io.safetensors")
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path, "dev_like")), dtype=mx.float32)
    apply_loras({"transformer": pipe.transformer, "clip": pipe.text_encoder.encoders.clip}, files(case))
    pipe.generate(PROMPTS, width=48, height=32, steps=4, latents=io["noise"].transpose(0, 2, 3, 1))
    assert_close(f"lora {case}: latents after 4 steps", pack_latents(pipe.last_latents), io[f"{case}.latents"],
                 atol=LATENTS_ATOL)


def test_pipeline_loras_survive_releasing_the_text_encoder(tmp_path):
    """Pipeline.from_pretrained(loras=...): the CLIP parts come back when the released encoders are re-loaded."""
    io = load_fixture("flux_lora", "io.safetensors")
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path, "dev_like")), dtype=mx.float32,
                                    loras=[(str(p), w) for p, w in files("two")])
    assert [r["weight"] for r in pipe.loras] == [0.8, -0.5] and len(pipe.loras[0]["sha256"]) == 64
    for attempt in ("first", "after re-loading the text encoders"):
        pipe.generate(PROMPTS, width=48, height=32, steps=4, latents=io["noise"].transpose(0, 2, 3, 1))
        assert pipe.text_encoder is None  # released after encoding
        assert_close(f"lora two via Pipeline, {attempt}", pack_latents(pipe.last_latents), io["two.latents"],
                     atol=LATENTS_ATOL)
    from tiny_imagegen.checkpoints.lora import lora_metadata

    meta = lora_metadata(pipe.loras)
    assert meta["loras"][1].endswith(":-0.5") and len(meta["lora_sha256"][0]) == 12


def test_unknown_keys_are_named_in_one_error(tmp_path):
    tensors = dict(mx.load(str(fixture_path("flux_lora", "kohya.safetensors"))))
    tensors["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = mx.zeros((4, 32))
    tensors["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = mx.zeros((1, 32))
    tensors["lora_unet_single_blocks_0_linear2.lora_up.weight"] = mx.zeros((33, 4))
    path = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(path), tensors)
    with pytest.raises(CheckpointError) as e:
        apply_loras(transformer(), [(path, 1.0)])
    message = str(e.value)
    for part in ("double_blocks_7_img_attn_qkv", "dora_scale", "single_blocks_0_linear2", "no CLIP model"):
        assert part in message
    with pytest.raises(CheckpointError, match="known format"):
        mx.save_safetensors(str(path), {"foo.weight": mx.zeros((2, 2))})
        apply_loras(transformer(), [(path, 1.0)])


def test_lora_spec():
    assert parse_lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_spec("org/name/style.safetensors:0.6") == ("org/name/style.safetensors", 0.6)
    assert parse_lora_spec("C:/x.safetensors:-1") == ("C:/x.safetensors", -1.0)


# ---- quantized: an unmerged branch beside nn.QuantizedLinear ---------------------------------------


def quantized_with_lora(bits, weight):
    from tiny_imagegen.checkpoints.quantize import quantize_component

    model = transformer()
    quantize_component("transformer", model, bits, group_size=32)
    records = apply_loras(model, [(fixture_path("flux_lora", "diffusers.safetensors"), weight)], skip_clip=True)
    return model, records


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_lora_is_bounded_by_the_quantization_error(bits):
    """|q+LoRA - fp32 merged| <= 1.5 x |q - fp32| + 1e-5 elementwise-max: the branch adds no error of
    its own beyond quantizing the base; with the wrong scale it is far outside."""
    io = load_fixture("flux_lora", "io.safetensors")
    reference = io["diffusers.out"]  # diffusers, fp32, merged at weight 0.7
    base_q = transformer()
    from tiny_imagegen.checkpoints.quantize import quantize_component

    quantize_component("transformer", base_q, bits, group_size=32)
    quantization_error = float(mx.max(mx.abs(run(base_q, io) - io["base.out"])))
    bound = 1.5 * quantization_error + 1e-5
    model, records = quantized_with_lora(bits, 0.7)
    assert records[0]["applied"] in ("branch", "mixed")
    assert any(isinstance(m, LoRALinear) and isinstance(m.base, nn.QuantizedLinear) for _, m in model.named_modules())
    assert_close(f"lora diffusers on {bits}-bit: vs fp32 merged", run(model, io), reference, atol=bound)
    wrong, _ = quantized_with_lora(bits, 0.7 * 1.1)  # a 10% wrong scale
    err = float(mx.max(mx.abs(run(wrong, io) - reference)))
    print(f"[lora] {bits}-bit: quantization error {quantization_error:.2e}, bound {bound:.2e}, wrong scale {err:.2e}")
    assert err > bound


def test_merge_into_quantized_is_refused():
    from tiny_imagegen.checkpoints.quantize import quantize_component

    model = transformer()
    quantize_component("transformer", model, 8, group_size=32)
    with pytest.raises(ValueError, match="quantized"):
        apply_loras(model, [(fixture_path("flux_lora", "xlabs.safetensors"), 1.0)], merge=True)


def test_branch_equals_merge_in_fp32():
    io = load_fixture("flux_lora", "io.safetensors")
    merged, branched = transformer(), transformer()
    apply_loras(merged, files("two"), skip_clip=True)
    apply_loras(branched, files("two"), merge=False, skip_clip=True)
    assert_close("lora: branch vs merged (fp32)", run(branched, io), run(merged, io), atol=2e-6)


# ---- names diffusers cannot check, dtypes, hub files -------------------------------------------


def test_kohya_top_level_names_equal_the_bfl_names(tmp_path):
    """diffusers drops kohya's img_in/txt_in/time_in/vector_in/guidance_in/final_layer LoRAs (see
    the fixture maker), so these kohya names are checked against the BFL file's, which diffusers reads."""
    io = load_fixture("flux_lora", "io.safetensors")
    bfl = mx.load(str(fixture_path("flux_lora", "bfl.safetensors")))
    top = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
    bfl_top = {k: v for k, v in bfl.items() if k.startswith(top)}
    kohya_top = {"lora_unet_" + k.split(".lora_")[0].replace(".", "_") + (".lora_down.weight" if ".lora_A." in k
                 else ".lora_up.weight"): v for k, v in bfl_top.items()}
    assert len(kohya_top) == 20
    outs = []
    for name, tensors in (("bfl", bfl_top), ("kohya", kohya_top)):
        path = tmp_path / f"{name}.safetensors"
        mx.save_safetensors(str(path), tensors)
        model = transformer()
        apply_loras(model, [(path, 1.0)])
        outs.append(run(model, io))
    assert float(mx.max(mx.abs(outs[0] - io["base.out"]))) > 1e-2
    assert_close("lora: kohya top-level names vs BFL names", outs[1], outs[0], atol=0)


@pytest.mark.parametrize("merge", [None, False])
def test_bf16_model_stays_bf16(merge):
    io = load_fixture("flux_lora", "io.safetensors")
    model = load_flux_transformer(fixture_path("flux_pipeline", "dev_like", "transformer"), dtype=mx.bfloat16)
    apply_loras(model, files("two"), merge=merge, skip_clip=True)
    assert all(v.dtype == mx.bfloat16 for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    inputs = {k: (v if k.endswith("ids") else v.astype(mx.bfloat16)) for k, v in io.items()}
    out = run(model, inputs)
    base = load_flux_transformer(fixture_path("flux_pipeline", "dev_like", "transformer"), dtype=mx.bfloat16)
    assert out.dtype == run(base, inputs).dtype  # the adapter changes no dtype (the base's own is not ours to test)
    branch = next((m for _, m in model.named_modules() if isinstance(m, LoRALinear)), None)
    if branch is not None:
        assert branch(mx.zeros((1, 3, branch.lora_a.shape[1]), mx.bfloat16)).dtype == mx.bfloat16
    err = float(mx.max(mx.abs(out.astype(mx.float32) - io["two.out"])))
    assert err < 0.05 * float(mx.max(mx.abs(io["two.out"])))  # bf16's few significant bits, not a wrong adapter


def test_hub_file_from_the_cache_offline(tmp_path):
    """`org/name/file.safetensors` through hf_hub_download with HF_HUB_OFFLINE=1 and a pre-populated cache."""
    import os
    import subprocess
    import sys

    from test_hub import cache_snapshot

    cache = tmp_path / "cache"
    cache_snapshot(cache, "someone/tiny-lora", {"style.safetensors": fixture_path("flux_lora", "xlabs.safetensors").read_bytes()})
    root = str(fixture_path("flux_lora").parents[2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": root}
    code = ("from tiny_imagegen.checkpoints.flux import load_flux_transformer\n"
            "from tiny_imagegen.checkpoints.lora import apply_loras\n"
            "from tiny_imagegen.registry.hub import resolve_file\n"
            f"m = load_flux_transformer({str(fixture_path('flux_pipeline', 'dev_like', 'transformer'))!r})\n"
            "print(apply_loras(m, [('someone/tiny-lora/style.safetensors', 0.5)], resolve=resolve_file)[0])\n"
            "apply_loras(m, [('someone/tiny-lora/missing.safetensors', 1.0)], resolve=resolve_file)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=root)
    assert "'format': 'xlabs'" in r.stdout and "'weight': 0.5" in r.stdout, r.stdout + r.stderr
    assert "hf download someone/tiny-lora missing.safetensors" in r.stderr
