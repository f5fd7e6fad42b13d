"""Z-Image's guidance options at their edges against ZImagePipeline (fixtures:
tests/reference/zimage_guidance.py): `cfg_truncation` equal to a step's model time (that step is
still guided: the pipeline skips CFG only where t > truncation) and `cfg_normalization` at 1.0, in
one forward ([pos; neg]) and in two (`batch_cfg=False`)."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, load_fixture
from test_zimage_pipeline import conditioning, hub_folder
from tiny_imagegen.pipelines.pipeline import Pipeline
from tiny_imagegen.diffusion.flow_matching import zimage_model_time, zimage_sigmas

STEPS, GUIDANCE = 4, 1.5


@pytest.fixture(scope="module")
def io():
    return load_fixture("zimage_guidance", "io.safetensors")


def test_the_boundary_is_a_step_time(io):
    """The truncation is exactly step 2's model time as we compute it, so `>` and `>=` differ there."""
    ours = [zimage_model_time(s) for s in zimage_sigmas(STEPS, 3.0)[:STEPS]]
    assert np.array_equal(np.array(ours, np.float32), np.array(io["model_t"]))
    assert ours[2] == float(io["boundary.truncation"][0])


@pytest.mark.parametrize("batch_cfg", [True, False])
@pytest.mark.parametrize("run, options", [("boundary", {}), ("boundary_norm", {"cfg_normalization": 1.0})])
def test_truncation_on_the_boundary_matches_diffusers(tmp_path, io, run, options, batch_cfg):
    base = load_fixture("zimage", "pipeline", "io.safetensors")
    pipe = Pipeline.from_pretrained(str(hub_folder(tmp_path)), dtype=mx.float32)
    truncation = float(io["boundary.truncation"][0])
    pipe.generate(conditioning=conditioning(base, True), width=48, height=32, steps=STEPS, guidance=GUIDANCE,
                  latents=base["noise"].transpose(0, 2, 3, 1), cfg_truncation=truncation, batch_cfg=batch_cfg,
                  **options)
    ours = pipe.last_latents.transpose(0, 3, 1, 2)
    # 4 steps, 3 of them guided (x1.5): measured 8.2e-6; a step guided or not moves them by > 5e-3
    assert_close(f"zimage {run} (batch_cfg={batch_cfg}): final latents", ours, io[f"{run}.latents"], atol=5e-5)
    for other in ("boundary", "boundary_norm", "untruncated"):  # the three references are far apart
        if other != run:
            assert float(mx.max(mx.abs(ours - io[f"{other}.latents"]))) > 100 * 5e-5
