"""tiny_imagegen: a small, readable FLUX-style text-to-image implementation in MLX.

    from tiny_imagegen.models.mmdit import MMDiT, preset
    from tiny_imagegen.checkpoints.flux import load_flux_transformer
"""

from . import blas as _blas

_blas.preload()  # before anything imports MLX: on Linux, a system OpenBLAS instead of the bundled reference BLAS

__version__ = "0.1.0"
