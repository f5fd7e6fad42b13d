"""The first image never imports numpy (0.075 s of the 0.5 s a first `generate` may take, issue 32),
and what replaced numpy on that path gives numpy's bits: the timestep frequencies and the uint8
rounding of the decoded image. (The position ids are integers; the pipelines' parity tests cover them.)"""

import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from tiny_imagegen.layers.embeddings import sinusoid_frequencies
from tiny_imagegen.models.pixels import to_pil

ROOT = Path(__file__).resolve().parents[1]

# the command as a user runs it, in this process, then which numpy modules it loaded
RUN = """
import runpy, sys
sys.argv = ["tiny-imagegen", "generate", "--model", "tiny-shapes", "--prompt", "a red circle",
            "--output", sys.argv[1], "--overwrite"]
try:
    runpy.run_module("tiny_imagegen", run_name="__main__")
except SystemExit as e:
    assert not e.code, f"generate exited with {e.code}"
print("numpy modules:", sorted(m for m in sys.modules if m == "numpy" or m.startswith("numpy.")))
"""


def test_generate_with_the_tiny_model_never_imports_numpy(tmp_path):
    out = tmp_path / "x.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", RUN, str(out)], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file() and out.stat().st_size > 0
    assert "numpy modules: []" in r.stdout, r.stdout[-2000:]


def _numpy_frequencies(half: int, max_period: float, shift: float) -> np.ndarray:
    """The formula layers/embeddings.py computed with numpy before: float32 exponent, float64 exp."""
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - shift)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def test_sinusoid_frequencies_are_numpys_bit_for_bit():
    # the models' sizes (FLUX, SD3, DiT, Z-Image, Qwen-Image: 256; SD 1.5: 320; the tiny configs' 32,
    # 64, ...) and every other half size up to 1024, DDPM's shift of 1 and other periods
    cases = [(half, period, shift) for half in range(2, 513) for period in (10_000.0, 10_000) for shift in (0.0, 1.0)]
    cases += [(half, period, 0.0) for half in (128, 160, 513, 777, 1024) for period in (100.0, 1_000.0, 1e5)]
    bad = [(h, p, s) for h, p, s in cases
           if not np.array_equal(np.asarray(sinusoid_frequencies(h, p, s)).view(np.uint32),
                                 _numpy_frequencies(h, p, s).view(np.uint32))]
    assert not bad, f"{len(bad)} of {len(cases)} frequency tables differ from numpy's, e.g. {bad[:5]}"


def _half_way_inputs() -> np.ndarray:
    """Decoder outputs x whose pixel value (x/2 + 1/2) · 255 is exactly k + 0.5 in float32, where
    round-half-to-even and round-half-up disagree for even k."""
    targets = (2 * (np.arange(255) + 0.5) / 255 - 1).astype(np.float32)
    candidates = [targets]
    for direction in (-1, 1):
        x = targets
        for _ in range(64):  # a few dozen ulps either side
            x = np.nextafter(x, np.float32(direction)).astype(np.float32)
            candidates.append(x)
    x = np.concatenate(candidates)
    pixels = np.clip(x * np.float32(0.5) + np.float32(0.5), 0, 1) * np.float32(255)
    return x[pixels - np.floor(pixels) == 0.5]


def test_to_pil_rounds_as_numpy_did_including_exact_halves():
    halves = _half_way_inputs()
    k = np.floor(np.clip(halves * np.float32(0.5) + np.float32(0.5), 0, 1) * np.float32(255))
    assert (k % 2 == 0).sum() >= 20 and (k % 2 == 1).sum() >= 20, "too few exact .5 cases to tell the roundings apart"
    rng = np.random.default_rng(0)
    values = np.concatenate([halves, rng.uniform(-1.3, 1.3, 3 * 40 * 56 * 3 - halves.size - 6),
                             [-1.0, 1.0, 0.0, -2.0, 2.0, -0.0]]).astype(np.float32)
    x = values[: 3 * 40 * 56 * 3].reshape(3, 40, 56, 3)  # (B, H, W, 3), not square: W and H kept apart
    numpy_way = (np.array(mx.clip(mx.array(x) * 0.5 + 0.5, 0.0, 1.0)) * 255).round().astype(np.uint8)
    images = to_pil(mx.array(x))
    assert [im.size for im in images] == [(56, 40)] * 3 and {im.mode for im in images} == {"RGB"}
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), numpy_way)
    assert images[0].tobytes() == numpy_way[0].tobytes()
