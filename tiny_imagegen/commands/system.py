"""`tiny-imagegen info --system`: what this machine runs the models with — MLX's version and
device, the BLAS behind CPU matmuls (blas.py) and whether the denoiser's forward is compiled."""

import platform


def system_lines() -> list[str]:
    import mlx.core as mx

    from .. import __version__
    from ..device import blas
    from ..device.compilation import compile_reason

    device = mx.default_device()
    return [
        f"tiny_imagegen {__version__}, MLX {mx.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}",
        f"device   {device}",
        f"BLAS     {blas.describe()}",
        f"compile  {compile_reason(device)}",
    ]
