"""Z-Image's sampling against diffusers' ZImagePipeline + FlowMatchEulerDiscreteScheduler(shift=3)
(fixtures from tests/reference/zimage.py)."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, load_fixture
from tiny_imagegen.sampling import (
    torch_linspace_f32, zimage_guidance, zimage_model_time, zimage_sigmas,
)

STEPS = (1, 2, 4, 8, 9, 28, 50)


@pytest.mark.parametrize("steps", STEPS)
def test_schedule_is_bit_identical(steps):
    ref = load_fixture("zimage", "schedules.safetensors")
    sigmas = zimage_sigmas(steps)
    assert_close(f"zimage sigmas n={steps}", np.array(sigmas, np.float32), ref[f"sigmas.{steps}"], atol=0)
    times = np.array([zimage_model_time(s) for s in sigmas[:-1]], np.float32)
    assert_close(f"zimage model times n={steps}", times, ref[f"model_t.{steps}"], atol=0)


def test_turbo_schedule():
    # the notes' [verified] Turbo schedule, and the step-2 time the model sees
    assert np.array(zimage_sigmas(8), np.float32).tolist() == np.array(
        [1.0, 0.95454544, 0.9, 0.8333333, 0.75, 0.64285713, 0.5, 0.3, 0.0], np.float32).tolist()
    assert np.float32(zimage_model_time(zimage_sigmas(8)[1])) * np.float32(1000) == np.float32(45.45458984)
    with pytest.raises(ValueError, match="at least one"):
        zimage_sigmas(0)


def test_numpy_linspace_would_not_do():
    """At n = 50 np.linspace's float32 values differ from torch's in the last bit (the notes: 9
    entries), and so would the schedule: the bit-identical test above sees the difference."""
    ours, numpy = torch_linspace_f32(1.0, 1 / 50, 50), np.linspace(1.0, 1 / 50, 50).astype(np.float32)
    assert (ours != numpy).sum() > 0
    shifted = np.float32(3) * numpy / (np.float32(1) + np.float32(2) * numpy)
    assert not np.array_equal(shifted, np.array(load_fixture("zimage", "schedules.safetensors")["sigmas.50"])[:-1])


def test_guidance_formula():
    pos, neg = mx.array([1.0, 2.0]), mx.array([0.5, 3.0])
    assert zimage_guidance(pos, neg, 0.0).tolist() == [1.0, 2.0]
    assert zimage_guidance(pos, neg, 1.0).tolist() == [1.5, 1.0]  # 2 pos - neg: g = 1 is not "off"
