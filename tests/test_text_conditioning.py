"""The single call, prompts -> (T5 sequence, T5 mask, CLIP pooled), equals diffusers' FluxPipeline.encode_prompt
on a tiny FLUX-style folder (fixtures: tests/reference/text_encoders.py)."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from conftest import assert_close, fixture_path, load_fixture
from tiny_imagegen.models.clip import CLIP_VIT_L14_TEXT, CLIPTextModel
from tiny_imagegen.models.t5 import T5_V1_1_XXL, T5Encoder
from tiny_imagegen.conditioning.t5_clip import FluxTextEncoders, TextConditioning, encode_prompts

# fp32, relative to the largest output: the T5 and CLIP parity tests' bound
RTOL = 5e-6


def flux_folder():
    return fixture_path("text_encoders", "flux")


def reference():
    settings = json.loads(fixture_path("text_encoders", "flux_conditioning.json").read_text(encoding="utf-8"))
    return settings["prompts"], settings["max_sequence_length"], load_fixture("text_encoders", "flux_conditioning.safetensors")


def test_encode_prompts_equals_flux_pipeline():
    prompts, length, ref = reference()
    result = encode_prompts(flux_folder(), prompts, max_sequence_length=length, dtype=mx.float32)
    assert isinstance(result, TextConditioning)
    t5_sequence, t5_mask, clip_pooled = result
    assert t5_sequence.shape == (3, length, 64) and clip_pooled.shape == (3, 64)
    assert t5_mask.tolist() == ref["t5_mask"].tolist()
    assert_close("FLUX conditioning: T5 sequence vs FluxPipeline.encode_prompt", t5_sequence, ref["t5_sequence"], atol=0.0, rtol=RTOL)
    assert_close("FLUX conditioning: CLIP pooled vs FluxPipeline.encode_prompt", clip_pooled, ref["clip_pooled"], atol=0.0, rtol=RTOL)


def test_encoders_can_be_reused_and_released():
    prompts, length, ref = reference()
    encoders = FluxTextEncoders.from_folder(flux_folder(), max_sequence_length=length, dtype=mx.float32)
    first = encoders(prompts[0])
    assert_close("FLUX conditioning: one prompt alone", first.t5_sequence, ref["t5_sequence"][:1], atol=0.0, rtol=RTOL)
    encoders.release()
    assert encoders.t5 is None and encoders.clip is None
    with pytest.raises(RuntimeError, match="T5 encoder was released"):
        encoders.encode_t5(prompts)


def test_bf16_and_quantized_t5_run():
    prompts, length, ref = reference()
    result = encode_prompts(flux_folder(), prompts, max_sequence_length=length, dtype=mx.bfloat16, t5_bits=8)
    assert result.t5_sequence.dtype == mx.bfloat16 and result.clip_pooled.dtype == mx.bfloat16
    cosine = (result.t5_sequence * ref["t5_sequence"]).sum(-1) / (
        mx.linalg.norm(result.t5_sequence.astype(mx.float32), axis=-1) * mx.linalg.norm(ref["t5_sequence"], axis=-1))
    print(f"[bf16, 8-bit T5] cosine similarity of the T5 sequence to the fp32 reference: min {cosine.min().item():.4f}")
    # a smoke test of the bf16 + quantized path; the random tiny T5 amplifies rounding noise (see
    # test_t5.py's quantization test): 0.988 measured
    assert cosine.min().item() > 0.95


def test_full_size_memory():
    """Bytes of the full-size encoders' parameters, counted on lazy models (nothing allocated)."""

    def gigabytes(model):
        return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9

    sizes = {}
    for dtype in (mx.bfloat16, mx.float32):
        for name, make in (("T5-v1.1-XXL encoder", lambda: T5Encoder(T5_V1_1_XXL)), ("CLIP ViT-L/14 text", lambda: CLIPTextModel(CLIP_VIT_L14_TEXT))):
            model = make()
            model.set_dtype(dtype)
            sizes[f"{name}, {dtype}"] = gigabytes(model)
    for bits in (8, 4):
        model = T5Encoder(T5_V1_1_XXL)
        model.set_dtype(mx.bfloat16)
        sizes[f"T5-v1.1-XXL encoder, bf16 with {bits}-bit linears"] = gigabytes(model.quantize(bits=bits))
    for name, gb in sizes.items():
        print(f"[memory] {name}: {gb:.2f} GB")
    assert sizes["T5-v1.1-XXL encoder, mlx.core.bfloat16"] == pytest.approx(2 * 4_762_310_656 / 1e9)
    assert sizes["CLIP ViT-L/14 text, mlx.core.float32"] == pytest.approx(4 * 123_060_480 / 1e9)
    assert sizes["T5-v1.1-XXL encoder, bf16 with 4-bit linears"] < 3.0


def test_linears_only_are_quantized():
    model = T5Encoder(T5_V1_1_XXL).quantize(bits=4)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "QuantizedLinear" in kinds and "Linear" not in kinds and isinstance(model.embed_tokens, nn.Embedding)
