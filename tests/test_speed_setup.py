"""Speed set-up that users never see: the BLAS chosen before MLX loads (blas.py) and whether
compiling pays (compilation.py). The choices are pure functions, tested alone; then a fresh
process shows what they do, with and without an OpenBLAS on the machine."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tiny_imagegen.device import blas, compilation

ROOT = Path(__file__).resolve().parents[1]


# ---- BLAS ----------------------------------------------------------------------------------------

def test_blas_plan_loads_openblas_only_on_linux_with_the_bundled_reference_blas():
    auto = blas.plan("linux", None, bundled_reference=True, mlx_imported=False)
    assert auto.load == blas.CANDIDATES and all("64" not in name for name in auto.load)
    assert blas.plan("linux", "auto", True, False).load == blas.CANDIDATES
    assert blas.plan("darwin", None, True, False).load == ()  # Accelerate
    assert blas.plan("linux", None, False, False).load == ()  # CUDA or source build: nothing changes
    assert "too late" in blas.plan("linux", None, True, True).reason  # MLX already bound its BLAS
    for off in ("off", "0", "reference", "OFF"):
        p = blas.plan("linux", off, True, False)
        assert p.load == () and blas.ENV in p.reason
    assert blas.plan("linux", "/opt/ob/libopenblas.so.0", True, False).load == ("/opt/ob/libopenblas.so.0",)
    assert blas.plan("darwin", "/opt/ob/libopenblas.so.0", True, False).load == ()


def test_openblas_kernels_are_named_from_the_cpu_flags():
    """OpenBLAS 0.3.21 falls back to its SSE3 kernels on CPUs it does not know (4x slower here)."""
    avx512 = {"sse3", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd"}
    assert blas.kernel_for(avx512) == "SKYLAKEX"
    assert blas.kernel_for(avx512 - {"avx512bw"}) == "HASWELL"  # Knights Landing: AVX-512 without BW
    assert blas.kernel_for({"sse3", "avx", "avx2", "fma"}) == "HASWELL"
    assert blas.kernel_for({"sse3", "avx", "avx2"}) is None  # no FMA: OpenBLAS decides
    assert blas.kernel_for(set()) is None  # not x86 (or no /proc/cpuinfo)


def _fresh(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                          env=full, capture_output=True, text=True, timeout=120)


MATMUL = ("import tiny_imagegen, mlx.core as mx; from tiny_imagegen.device import blas; a = mx.ones((64, 64)); "
          "print(float((a @ a)[0, 0])); print(blas.describe())")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS choice is Linux-only")
def test_blas_off_and_a_missing_file_keep_mlx_working_and_say_so():
    r = _fresh(MATMUL, TINY_IMAGEGEN_BLAS="off")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "64.0" and "TINY_IMAGEGEN_BLAS=off" in r.stdout
    assert "openblas" not in r.stdout.lower()
    r = _fresh(MATMUL, TINY_IMAGEGEN_BLAS="/nonexistent/libopenblas.so.0")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "64.0"
    assert r.stderr.count("\n") == 1 and "cannot load it" in r.stderr  # one line, no traceback


def _system_openblas() -> str | None:
    r = _fresh("import ctypes; ctypes.CDLL('libopenblas.so.0'); print('yes')")
    return "auto" if r.returncode == 0 else os.environ.get("TINY_IMAGEGEN_TEST_OPENBLAS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS choice is Linux-only")
def test_openblas_when_installed_is_what_mlx_uses():
    """CI installs libopenblas0-pthread (.ci/run); elsewhere TINY_IMAGEGEN_TEST_OPENBLAS may name one."""
    setting = _system_openblas()
    if setting is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but no OpenBLAS is installed: .ci/run installs libopenblas0-pthread")
        pytest.skip("no OpenBLAS on this machine (apt-get install libopenblas0-pthread)")
    r = _fresh(MATMUL + "; import numpy as np; b = mx.random.normal((96, 80), key=mx.random.key(0)); "
               "c = np.array(b @ b.T, dtype=np.float64); d = np.array(b, dtype=np.float64); "
               "print(abs(c - d @ d.T).max())", TINY_IMAGEGEN_BLAS=setting)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "64.0" and lines[1].startswith("OpenBLAS ") and "loaded before MLX" in lines[1]
    assert float(lines[2]) < 1e-4  # the same product as float64 numpy
    kernel = blas.kernel_for(blas._cpu_flags())
    if kernel and "OPENBLAS_CORETYPE" not in os.environ:  # the kernels chosen from the flags are the ones running
        assert f", {kernel.lower()} kernels" in lines[1].lower(), lines[1]
    forced = _fresh(MATMUL, TINY_IMAGEGEN_BLAS=setting, OPENBLAS_CORETYPE="Prescott")  # the user's choice wins
    assert ", prescott kernels" in forced.stdout.lower(), forced.stdout
    if "OPENBLAS_CORETYPE" not in os.environ:  # the environment is left as it was
        env = _fresh("import tiny_imagegen, os; print(sorted(os.environ))", TINY_IMAGEGEN_BLAS=setting)
        assert env.returncode == 0 and "OPENBLAS_CORETYPE" not in env.stdout
    late = _fresh("import mlx.core; " + MATMUL, TINY_IMAGEGEN_BLAS=setting)  # MLX first: too late, and said
    assert "too late" in late.stdout and "OpenBLAS " not in late.stdout


def test_info_system_names_the_blas_and_the_compile_setting():
    r = subprocess.run([sys.executable, "-m", "tiny_imagegen", "info", "--system"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "BLAS " in r.stdout and "compile " in r.stdout and f"MLX {mx.__version__}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tiny_imagegen", "info"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 2 and "--system" in r.stderr


# ---- compile ---------------------------------------------------------------------------------------

def test_compile_pays_on_gpu_and_for_large_models_only(monkeypatch):
    monkeypatch.delenv(compilation.ENV, raising=False)
    assert compilation.compile_pays(10**6, mx.gpu) and compilation.compile_pays(10**10, mx.gpu)
    assert not compilation.compile_pays(1_818_768, mx.cpu)  # the tiny model
    assert compilation.compile_pays(340_000_000, mx.cpu)  # one full-width FLUX.1 double block
    monkeypatch.setenv(compilation.ENV, "off")
    assert not compilation.compile_pays(10**10, mx.gpu)
    monkeypatch.setenv(compilation.ENV, "on")
    assert compilation.compile_pays(1, mx.cpu)


def test_helpers_fuse_on_large_tensors_only_and_compute_the_same_either_way(monkeypatch):
    from tiny_imagegen.layers.activations import gelu_tanh

    monkeypatch.delenv(compilation.ENV, raising=False)
    small, large = mx.zeros((256, 64)), mx.zeros((512, 3072))  # tiny model's MLP; a full-width one's
    if mx.default_device().type == mx.cpu:
        assert not compilation.fusing_pays(small) and compilation.fusing_pays(large)
        assert compilation.fusing_pays(small, large)  # the largest argument decides
    else:
        assert compilation.fusing_pays(small)  # a GPU builds kernels in milliseconds
    monkeypatch.setenv(compilation.ENV, "on")
    assert compilation.fusing_pays(small)
    x = mx.random.normal((4, 1000), key=mx.random.key(1)) * 4
    plain = np.array(gelu_tanh.__wrapped__(x))
    assert np.abs(plain - np.array(gelu_tanh.fused(x))).max() < 1e-6


def test_tiny_model_generates_the_same_image_compiled_or_not(monkeypatch):
    """The tiny model runs uncompiled on a CPU by default; forcing compilation gives the same bytes."""
    from tiny_imagegen.pipelines.pipeline import Pipeline

    images = {}
    for setting in ("auto", "on"):
        monkeypatch.setenv(compilation.ENV, setting)
        pipe = Pipeline.from_pretrained("tiny-shapes", dtype=mx.float32)
        images[setting] = np.asarray(pipe.generate("a red circle", steps=3, seed=5)[0])
    assert np.array_equal(images["auto"], images["on"])


# ---- matmuls across the cores with the single-threaded reference BLAS (layers/linear.py) ----------

def test_row_split_linear_computes_what_nn_linear_computes():
    """In this process (whichever BLAS): the pieces joined, from the column-major weight, == one
    nn.Linear call, to float32 rounding; below the row threshold it is one call; a quantized layer
    is left alone."""
    from tiny_imagegen.device.streams import cpu_streams
    from tiny_imagegen.layers.linear import MIN_ROWS_PER_CORE, RowSplitLinear, split_rows_across_cores

    model = nn.Sequential(nn.Linear(48, 80), nn.Linear(80, 32, bias=False), nn.QuantizedLinear(64, 64))
    x = mx.random.normal((2, 37, 48), key=mx.random.key(3))  # 74 rows: pieces of unequal length
    few = x[:1, : MIN_ROWS_PER_CORE * len(cpu_streams()) - 1]  # below the threshold: one matmul
    h = model.layers[0](x)
    expected = (np.array(h), np.array(model.layers[1](h)), np.array(model.layers[0](few)))
    split_rows_across_cores(model)
    assert [type(m).__name__ for m in model.layers] == ["RowSplitLinear", "RowSplitLinear", "QuantizedLinear"]
    got = (np.array(model.layers[0](x)), np.array(model.layers[1](model.layers[0](x))), np.array(model.layers[0](few)))
    for e, g in zip(expected, got):
        assert g.shape == e.shape and np.abs(g - e).max() <= 1e-5 * np.abs(e).max(), np.abs(g - e).max()
    if blas.single_threaded():  # where pipelines use it: bit-identical (sgemm's two forms, bias after)
        assert all(np.array_equal(e, g) for e, g in zip(expected, got))
    assert isinstance(model.layers[0], nn.Linear) and isinstance(model.layers[0], RowSplitLinear)


SPLIT_IMAGE = """
import numpy as np, mlx.core as mx, mlx.nn as nn
from tiny_imagegen.device import blas
from tiny_imagegen.pipelines.pipeline import Pipeline
pipe = Pipeline.from_pretrained("tiny-shapes", dtype=mx.float32)
kinds = sorted({type(m).__name__ for _, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)})
split = np.asarray(pipe.generate("a red circle", steps=3, seed=5)[0])
for _, m in pipe.transformer.named_modules():
    if type(m).__name__ == "RowSplitLinear":  # back to nn.Linear, its weight row-major again
        m.__class__, m.weight = nn.Linear, mx.contiguous(m.weight)
plain = np.asarray(pipe.generate("a red circle", steps=3, seed=5)[0])
print(blas.single_threaded(), ",".join(kinds), np.array_equal(split, plain))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS choice is Linux-only")
def test_pipelines_split_matmuls_only_on_the_reference_blas_and_the_image_is_the_same():
    r = _fresh("import tiny_imagegen" + SPLIT_IMAGE, TINY_IMAGEGEN_BLAS="off")
    assert r.returncode == 0, r.stderr
    if (os.cpu_count() or 1) > 1:  # the same bytes, split across the cores or not
        assert r.stdout.split() == ["True", "RowSplitLinear", "True"], r.stdout
    setting = _system_openblas()
    if setting is not None:  # OpenBLAS threads its own matmuls: left as nn.Linear
        r = _fresh("import tiny_imagegen" + SPLIT_IMAGE, TINY_IMAGEGEN_BLAS=setting)
        assert r.returncode == 0 and r.stdout.split()[:2] == ["False", "Linear"], r.stdout + r.stderr
