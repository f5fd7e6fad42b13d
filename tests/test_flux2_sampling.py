"""FLUX.2's schedule and Euler step against diffusers (fixtures: tests/reference/flux2.py
`make_schedules`): compute_empirical_mu, the scheduler's float32 exponential shift as
Flux2KleinPipeline sets it, and the scheduler step on a bf16 model output."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, load_fixture
from tiny_imagegen.diffusion.flow_matching import euler_step, euler_step_in_model_dtype, flux2_mu, flux2_schedule


@pytest.fixture(scope="module")
def ref():
    return load_fixture("flux2", "schedules.safetensors")


def _cases(ref, kind):
    return [tuple(int(n) for n in k.split(".")[1:]) for k in ref if k.startswith(kind + ".")]


def test_mu_matches_compute_empirical_mu(ref):
    cases = _cases(ref, "mu")
    assert len(cases) == 9
    for steps, seq_len in cases:
        assert flux2_mu(seq_len, steps) == pytest.approx(ref[f"mu.{steps}.{seq_len}"].item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_schedules_match_the_scheduler(ref, kind):
    for steps, seq_len in _cases(ref, kind):
        ours = np.array(flux2_schedule(steps, seq_len, dynamic_shift=kind == "dynamic", shift=3.0), np.float32)
        assert_close(f"flux2 schedule {kind} {steps} steps {seq_len} tokens", ours, ref[f"{kind}.{steps}.{seq_len}"], atol=0)


def test_klein_1024_example():
    """1024², 4 steps: 4096 tokens, mu 2.29118 (REFERENCE-NOTES-FAMILIES B3)."""
    assert flux2_mu(4096, 4) == pytest.approx(2.29117989, abs=1e-7)
    assert flux2_schedule(4, 4096) == pytest.approx([1.0, 0.96738404, 0.90814394, 0.76719993, 0.0], abs=1e-7)


def test_euler_step_in_bf16_rounds_like_the_scheduler(ref):
    s = np.array(ref["euler.sigmas"]).tolist()
    x, v = ref["euler.x"], ref["euler.v"]
    assert_close("flux2 euler step fp32", euler_step_in_model_dtype(x, v, s[0], s[1]), ref["euler.out"], atol=0)
    ours = euler_step_in_model_dtype(x.astype(mx.bfloat16), v.astype(mx.bfloat16), s[0], s[1])
    assert ours.dtype == mx.bfloat16
    assert_close("flux2 euler step bf16 (dt * v in bf16)", ours, ref["euler.out_bf16"], atol=0)
    # the float32 update differs from it: the trap is real
    plain = euler_step(x.astype(mx.bfloat16), v.astype(mx.bfloat16), s[0], s[1])
    assert not mx.array_equal(plain, ours)
