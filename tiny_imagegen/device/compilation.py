"""When `mx.compile` pays: decided per device and per size.

mx.compile fuses a graph's elementwise ops into generated kernels. On a GPU those are built in
milliseconds and compilation stays on. On the CPU MLX writes each fused kernel as C++ and builds
it with the system compiler (`$TMPDIR/mlx/<version>/cpu/`, once per machine until the temp folder
is cleared): measured here (docs/performance.md) the tiny model's first image after install took
10-40 s compiled against 0.6 s uncompiled, and warm the compiled forward was no faster. The
saving grows with the number of elements fused, the cost does not: so on the CPU a function is
compiled only when its tensors are large (a full-width FLUX block's MLP activations, where the
fused GELU is 3-4x faster than ~20 separate passes) and runs op by op when they are small (the
tiny model, whatever it is asked).

`TINY_IMAGEGEN_COMPILE` overrides: "on" compiles everything, "off" nothing, "auto" (default) as above.
"""

import os
from contextlib import contextmanager
from functools import wraps

import mlx.core as mx

ENV = "TINY_IMAGEGEN_COMPILE"
# CPU: compile a function when its largest input has at least this many elements. The tiny model's
# activations are ~1e4-1e5 elements (64-wide, 256 tokens, batch 2); a full-width FLUX block's MLP at
# 512 tokens holds 512 * 12288 = 6.3e6
CPU_MIN_ELEMENTS = 1 << 20
# CPU: compile a model's generation when its denoiser has at least this many parameters (the tiny
# model: 1.8 M; one full-width FLUX.1 double block: 340 M)
CPU_MIN_PARAMS = 100_000_000


def setting() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return "on"
    if value in ("0", "off", "false", "no"):
        return "off"
    return "auto"


def on_gpu(device=None) -> bool:
    device = device or mx.default_device()
    return getattr(device, "type", device) == mx.gpu  # a Device or a DeviceType (mx.gpu)


def compile_pays(n_params: int, device=None) -> bool:
    """Whether compiling a model of `n_params` denoiser parameters pays on `device`."""
    s = setting()
    if s != "auto":
        return s == "on"
    return on_gpu(device) or n_params >= CPU_MIN_PARAMS


@contextmanager
def compile_scope(n_params: int):
    """Within it, compilation is off where it does not pay for a model this size — MLX's own
    compiled helpers (nn.silu, nn.gelu, ...) included, which a per-function rule cannot reach."""
    if compile_pays(n_params):
        yield
        return
    mx.disable_compile()
    try:
        yield
    finally:
        if os.environ.get("MLX_DISABLE_COMPILE", "0") in ("", "0"):  # MLX's own switch stays as the user set it
            mx.enable_compile()


def compile_reason(device=None) -> str:
    """One line for `info --system` / `--verbose`."""
    s = setting()
    if s != "auto":
        return f"{s} ({ENV}={os.environ.get(ENV)})"
    if on_gpu(device):
        return "on (GPU: kernels build in milliseconds)"
    return (f"CPU: only where it pays (models >= {CPU_MIN_PARAMS / 1e6:.0f} M parameters; fused helpers on tensors >= "
            f"{CPU_MIN_ELEMENTS:,} elements); each fused kernel is built once per machine with the C++ compiler")


def fusing_pays(*args) -> bool:
    """Whether a small compiled helper should run fused for these arguments: always on a GPU, on
    the CPU when its largest array argument has >= CPU_MIN_ELEMENTS elements."""
    s = setting()
    if s != "auto":
        return s == "on"
    return on_gpu() or max((a.size for a in args if isinstance(a, mx.array)), default=0) >= CPU_MIN_ELEMENTS


def compiled_when_large(fn):
    """`fn`, compiled where `fusing_pays`; both paths compute the same ops."""
    fused = mx.compile(fn)

    @wraps(fn)
    def call(*args):
        return fused(*args) if fusing_pays(*args) else fn(*args)

    call.fused = fused
    return call
