"""LoRA scales as PEFT computes them (tests/reference/flux_lora_peft.py): adapters added by peft
itself, with rsLoRA (alpha / sqrt(r)) and per-module rank_pattern / alpha_pattern, saved by
diffusers with the LoraConfig in the file's metadata; ours merged (and as branches) against PEFT's
forward with the adapters active."""

import mlx.core as mx
import pytest

from conftest import assert_close, fixture_path, load_fixture
from test_lora import MODEL_ATOL, run, transformer
from tiny_imagegen.checkpoints.lora import apply_loras


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("case", ["rslora", "patterns"])
def test_peft_scales_match(case, merge):
    io = load_fixture("flux_lora_peft", "io.safetensors")
    model = transformer()
    assert_close("lora peft: base transformer", run(model, io), io["base.out"], atol=MODEL_ATOL)
    records = apply_loras(model, [(fixture_path("flux_lora_peft", f"{case}.safetensors"), 1.0)], merge=merge,
                          skip_clip=True)
    # one call of the tiny transformer, as test_lora; the adapters (scales up to 8 / sqrt 2) lift the
    # output to |5|, so also 1e-5 of it (measured 4.9e-5 merged, rsLoRA)
    assert all(r["applied"] == ("merged" if merge else "branch") for r in records)
    assert_close(f"lora peft {case} (merge={merge}): transformer output", run(model, io), io[f"{case}.out"],
                 atol=MODEL_ATOL, rtol=1e-5)
    # each case is far from the base and from the other (rsLoRA's sqrt(r) against r), beyond the tolerance
    other = {"rslora": "patterns", "patterns": "rslora"}[case]
    for ref in ("base", other):
        assert float(mx.max(mx.abs(io[f"{case}.out"] - io[f"{ref}.out"]))) > 1e-2
