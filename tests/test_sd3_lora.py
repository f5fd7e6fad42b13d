"""SD3.5 LoRA files (diffusers/PEFT, kohya) against diffusers' StableDiffusion3Pipeline.load_lora_weights +
fuse_lora (tests/reference/sd3_lora.py)."""

import mlx.core as mx
import pytest

from conftest import assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.lora import apply_loras
from tiny_imagegen.checkpoints.mapping import CheckpointError
from tiny_imagegen.checkpoints.sd3 import load_sd3_transformer
from tiny_imagegen.pipelines.pipeline import Pipeline

MODEL_ATOL = 2e-5  # one call of the tiny fp32 transformer, as test_sd3


def run(model, io):
    out = model(io["x"].transpose(0, 2, 3, 1), io["txt"], io["timesteps"], io["pooled"])
    return out.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui"])
def test_transformer_output_matches_diffusers(fmt, tmp_path):
    io = load_fixture("sd3_lora", "io.safetensors")
    model = load_sd3_transformer(fixture_path("sd3_pipeline", "repo", "transformer"))
    assert_close("sd3 lora: base transformer", run(model, io), io["base.out"], atol=MODEL_ATOL)
    path = fixture_path("sd3_lora", f"{'kohya' if fmt == 'comfyui' else fmt}.safetensors")
    if fmt == "comfyui":  # ComfyUI's dotted kohya names: diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight
        tensors = mx.load(str(path))
        renamed = {}
        for k, v in tensors.items():
            module, suffix = k.split(".", 1)
            name = module.removeprefix("lora_unet_")
            for part in ("joint_blocks_", "x_block_", "context_block_", "attn_", "attn2_", "mlp_", "adaLN_modulation_",
                         "final_layer_", "t_embedder_", "y_embedder_"):
                name = name.replace(part, part[:-1] + ".")
            renamed[f"diffusion_model.{name}.{suffix}"] = v
        path = tmp_path / "comfyui.safetensors"
        mx.save_safetensors(str(path), renamed)
    records = apply_loras(model, [(path, 0.7)])
    assert records[0]["format"] == ("diffusers" if fmt == "diffusers" else "kohya") and records[0]["applied"] == "merged"
    assert_close(f"sd3 lora {fmt}: transformer output", run(model, io), io["lora.out"], atol=MODEL_ATOL)
    assert float(mx.max(mx.abs(io["lora.out"] - io["base.out"]))) > 1e-2


def test_lora_beside_a_quantized_model_and_through_the_pipeline():
    pipe = Pipeline.from_pretrained(str(fixture_path("sd3_pipeline", "repo")), dtype=mx.float32, quantize=8,
                                    loras=[(str(fixture_path("sd3_lora", "kohya.safetensors")), 0.7)])
    # a branch beside the quantized layers; merged into the full-precision ones (x_embedder, t_embedder, ...)
    assert pipe.loras[0]["applied"] == "mixed" and pipe.loras[0]["format"] == "kohya"
    images = pipe.generate("a cat", width=32, height=32, steps=2, guidance=4.0)
    assert images[0].size == (32, 32)


def test_a_flux_lora_on_sd3_names_the_keys():
    model = load_sd3_transformer(fixture_path("sd3_pipeline", "repo", "transformer"))
    with pytest.raises(CheckpointError, match=r"(?s)kohya format\) does not fit.*unknown key.*lora_unet_(double|single)_blocks"):
        apply_loras(model, [(fixture_path("flux_lora", "kohya.safetensors"), 1.0)], skip_clip=True)
