"""tiny_imagegen: a small, readable text-to-image implementation in MLX, checked against PyTorch.

    from tiny_imagegen.pipelines import Pipeline
    images = Pipeline.from_pretrained("tiny-shapes").generate(["a red circle"], seed=0)

The folders are layers, lowest first: text/, layers/, diffusion/ -> models/ -> checkpoints/ ->
registry/ -> conditioning/ -> pipelines/ -> train/ -> commands/ (tests/test_layering.py).
"""

from .device import blas as _blas

_blas.preload()  # before anything imports MLX: on Linux, a system OpenBLAS instead of the bundled reference BLAS

__version__ = "0.1.0"
