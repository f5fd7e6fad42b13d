"""Which BLAS MLX's CPU matmuls use on Linux, chosen before MLX is first imported.

The `mlx[cpu]` wheel for Linux links the reference BLAS it bundles (`mlx_cpu.libs/libblas-*.so`):
a 1024x1024 fp32 matmul runs at ~5 GFLOP/s, where OpenBLAS on the same two cores gives ~140.
The dynamic linker binds a symbol to the first library in the global scope that defines it, so an
OpenBLAS opened with RTLD_GLOBAL *before* `libmlx.so` is loaded supplies `cblas_sgemm` & co. in its
place — what `LD_PRELOAD` would do, without asking the user to set it. Opened after MLX, it has no
effect (MLX's symbols are already bound), which is why `tiny_imagegen/__init__.py` calls `preload()`
first and why `describe()` reports what is really mapped into the process, not what was intended.

OpenBLAS picks its kernels for the CPU it finds. Releases before 0.3.22 (Debian 12 ships 0.3.21)
do not know recent Xeons and fall back to the generic SSE3 kernel ("Prescott"): measured here, a
(128 x 128) @ (128 x 384) matmul took 0.25 ms with it and 0.09 ms with the AVX-512 kernel, a
1024^2 one 67 against 270 GFLOP/s. So the kernel family is named from the CPU's own flags
(`kernel_for`) through OpenBLAS's `OPENBLAS_CORETYPE`, for the moment the library is opened only;
a user's own `OPENBLAS_CORETYPE` wins.

Nothing happens on macOS (MLX uses Accelerate) or with a CUDA or source-built MLX (no bundled
reference BLAS). `TINY_IMAGEGEN_BLAS` chooses:

    unset / "auto"             load a system OpenBLAS if one is installed (apt-get install libopenblas0-pthread)
    "off" / "0" / "reference"  leave MLX's bundled BLAS
    /path/to/libopenblas.so.0  load that file
"""

import ctypes
import glob
import importlib.util
import os
import sys
from dataclasses import dataclass

ENV = "TINY_IMAGEGEN_BLAS"
OFF = ("off", "0", "no", "false", "reference", "none")
# sonames the dynamic linker finds through its cache (Debian/Ubuntu: libopenblas0-pthread or
# -openmp, via update-alternatives; Fedora: openblas); the LP64 interface only — the 64-bit-integer
# builds (libopenblas64_) take a different ABI
CANDIDATES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp.so.0", "libopenblaso.so.0")
INSTALL_HINT = "apt-get install libopenblas0-pthread (or your distribution's OpenBLAS) for ~25x faster fp32 matmuls"


@dataclass(frozen=True)
class Plan:
    """What `preload` should do: `load` these names/paths in order (the first that opens wins), or
    nothing, for `reason`."""

    load: tuple[str, ...]
    reason: str


def plan(platform: str, setting: str | None, bundled_reference: bool, mlx_imported: bool) -> Plan:
    """The decision, as a pure function of what `preload` reads from the process (tested alone).

    platform: sys.platform; setting: $TINY_IMAGEGEN_BLAS; bundled_reference: whether MLX is the
    `mlx[cpu]` wheel with its reference BLAS; mlx_imported: whether libmlx is already loaded."""
    setting = (setting or "").strip()
    if not platform.startswith("linux"):
        return Plan((), "not Linux: MLX uses the platform's BLAS")
    if setting.lower() in OFF:
        return Plan((), f"{ENV}={setting}")
    if not bundled_reference:
        return Plan((), "this MLX build does not bundle the reference BLAS (CUDA or source build)")
    if mlx_imported:
        return Plan((), "MLX was imported before tiny_imagegen: too late to choose its BLAS")
    if setting and setting.lower() != "auto":
        return Plan((setting,), f"{ENV}={setting}")
    return Plan(CANDIDATES, "system OpenBLAS")


# OpenBLAS kernel families by the x86-64 flags their sgemm kernels need (/proc/cpuinfo names); the
# first whose flags the CPU has wins. SkylakeX's kernels serve every AVX-512 core (Cooperlake and
# Sapphire Rapids add bf16/AMX paths MLX does not call), Haswell's every AVX2 + FMA core (Zen 1-3).
KERNELS = (("SKYLAKEX", frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd"})),
           ("HASWELL", frozenset({"avx2", "fma"})))
CORETYPE = "OPENBLAS_CORETYPE"


def kernel_for(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family for a CPU with these flags, or None (leave OpenBLAS to choose)."""
    return next((name for name, needs in KERNELS if needs <= flags), None)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _open(name: str) -> ctypes.CDLL:
    """dlopen `name` into the global scope with the kernel family named for this CPU, unless the
    user named one; the environment is left as it was (numpy's own OpenBLAS reads it too)."""
    kernel = None if CORETYPE in os.environ else kernel_for(_cpu_flags())
    if kernel:
        os.environ[CORETYPE] = kernel  # read by OpenBLAS's constructor, once, when the file is opened
    try:
        return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    finally:
        if kernel:
            del os.environ[CORETYPE]


def _bundled_reference_blas() -> bool:
    """Whether the installed MLX is the Linux CPU wheel that links its own reference BLAS
    (found on disk, without importing MLX)."""
    spec = importlib.util.find_spec("mlx")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if glob.glob(os.path.join(os.path.dirname(folder), "mlx_cpu.libs", "libblas*.so*")):
            return True
    return False


_state = {"loaded": None, "note": "", "kernel": ""}


def preload() -> str | None:
    """Open an OpenBLAS with RTLD_GLOBAL if `plan` says so: the path loaded, or None. Once per
    process; never raises (a missing library leaves MLX's own BLAS, which is only slower)."""
    if _state["note"]:
        return _state["loaded"]
    setting = os.environ.get(ENV)
    p = plan(sys.platform, setting, sys.platform.startswith("linux") and _bundled_reference_blas(),
             "mlx.core" in sys.modules)
    _state["note"] = p.reason
    for name in p.load:
        try:
            library = _open(name)
        except OSError as e:
            if setting and setting.lower() != "auto":  # asked for this file explicitly: say why it failed
                print(f"warning: {ENV}={setting}: cannot load it ({e}); MLX keeps its bundled BLAS", file=sys.stderr)
            continue
        _state["loaded"] = name
        corename = getattr(library, "openblas_get_corename", None)
        if corename is not None:  # (absent from a library that only looks like OpenBLAS)
            corename.restype = ctypes.c_char_p
            _state["kernel"] = (corename() or b"").decode()
        break
    else:
        if p.load:
            _state["note"] = "no OpenBLAS found"
    return _state["loaded"]


def _mapped_blas() -> tuple[list[str], list[str]]:
    """(OpenBLAS files, MLX's bundled reference BLAS files) mapped into this process (Linux:
    /proc/self/maps). numpy's and torch's own OpenBLAS copies carry suffixed symbols and other
    names (libscipy_openblas64_, ...): they are not MLX's and are not counted."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "blas" in line.lower() and "/" in line})
    except OSError:
        return [], []
    openblas = [m for m in paths if os.path.basename(m).startswith("libopenblas") and "64" not in os.path.basename(m)]
    return openblas, [m for m in paths if "mlx_cpu.libs" in m]


def single_threaded() -> bool:
    """Whether MLX's CPU matmuls run on the bundled reference BLAS, one thread per matmul (then the
    pipelines cut them across the cores themselves: layers/linear.py)."""
    openblas, reference = _mapped_blas() if sys.platform.startswith("linux") else ([], [])
    return bool(reference) and not openblas


def describe() -> str:
    """One line for `--verbose` and `tiny-imagegen info --system`: the BLAS MLX's CPU matmuls use."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if not sys.platform.startswith("linux"):
        return f"as linked by MLX on {sys.platform}"
    openblas, reference = _mapped_blas()
    if openblas and (_state["loaded"] or os.environ.get("LD_PRELOAD")):
        how = "loaded before MLX" if _state["loaded"] else "LD_PRELOAD"
        kernel = f", {_state['kernel']} kernels" if _state["kernel"] else ""
        return f"OpenBLAS {openblas[0]} ({how}{kernel})"
    if reference or ("mlx.core" not in sys.modules and _bundled_reference_blas()):  # (before MLX is loaded)
        note = _state["note"] or "not chosen yet"
        return f"MLX's bundled reference BLAS, slow ({note}" + (f"; {INSTALL_HINT})" if note == "no OpenBLAS found" else ")")
    return f"as linked by MLX ({_state['note'] or 'no bundled reference BLAS'})"
