"""Two whole-model changes to a model's nn.Linear layers, made once after it is built.

Bias-free models: FLUX.2 (and Qwen3's attention) have no bias in any Linear. Rather than a
bias-free copy of every shared layer, a model built from the shared layers drops the biases once:
an MLX Linear without a `bias` entry computes x W^T (nn.Linear checks `"bias" in self`), and its
quantized form is built without one.

Matmuls on every core with a single-threaded BLAS: MLX's Linux CPU wheel bundles the reference
BLAS, which computes a matmul on one thread. The rows of x W^T are independent, so `RowSplitLinear`
cuts them into one piece per core, each on its own CPU stream (device/streams.py), and joins the
results: every row is computed by the same loop as before, so the output is bit-identical. On 2
cores a tiny-model image (text, 20 guided steps, decode) took 1.59 s instead of 1.98 s (medians of 4,
interleaved, in one process). With OpenBLAS, which threads its own matmuls, the split did not help
(0.32 s against 0.29 s), so pipelines use it only without one (`device/blas.py`'s `single_threaded`).
"""

import mlx.core as mx
import mlx.nn as nn

from ..device.streams import cpu_streams, pieces


def without_biases(model: nn.Module) -> nn.Module:
    """Remove the bias of every nn.Linear inside `model` (in place); returns `model`."""
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear) and "bias" in module:
            module.pop("bias")
    return model


# fewer rows than this per core: one call (the modulation's (B, D) inputs, a batch of pooled vectors)
MIN_ROWS_PER_CORE = 16


class RowSplitLinear(nn.Linear):
    """nn.Linear whose rows are computed on one CPU stream per core (same weights, same output)."""

    def __call__(self, x: mx.array) -> mx.array:  # (..., in) -> (..., out)
        streams = cpu_streams()
        rows = x.size // x.shape[-1]
        if len(streams) < 2 or rows < MIN_ROWS_PER_CORE * len(streams):
            return super().__call__(x)
        flat = x.reshape(rows, x.shape[-1])
        outs = [mx.addmm(self.bias, flat[p], self.weight.T, stream=s) if "bias" in self
                else mx.matmul(flat[p], self.weight.T, stream=s)
                for p, s in zip(pieces(rows, len(streams)), streams)]
        return mx.concatenate(outs).reshape(*x.shape[:-1], -1)


def split_rows_across_cores(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear inside `model` a RowSplitLinear (in place; subclasses such as
    quantized or sharded layers keep their own kernels); returns `model`."""
    for _, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = RowSplitLinear  # same parameters, a different __call__
    return model
