"""LoRA files of every format against diffusers' load_lora_weights + fuse_lora (tests/reference/flux_lora.py),
and a LoRA beside a quantized model against the merged fp32 one."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import assert_close, fixture_path, load_fixture
from test_pipeline import PROMPTS, hub_folder
from tiny_imagegen.checkpoints.flux import load_flux_transformer
from tiny_imagegen.checkpoints.lora import apply_loras, parse_lora_spec
from tiny_imagegen.checkpoints.mapping import CheckpointError
from tiny_imagegen.layers.embeddings import pack_latents
from tiny_imagegen.layers.lora import LoRALinear
from tiny_imagegen.pipeline import Pipeline

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
    from tiny_imagegen.checkpoints.convert import quantize_component

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
    from tiny_imagegen.checkpoints.convert import quantize_component

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
    from tiny_imagegen.checkpoints.convert import quantize_component

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
