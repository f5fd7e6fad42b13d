"""Two whole-model changes to a model's nn.Linear layers, made once after it is built.

Bias-free models: FLUX.2 (and Qwen3's attention) have no bias in any Linear. Rather than a
bias-free copy of every shared layer, a model built from the shared layers drops the biases once:
an MLX Linear without a `bias` entry computes x W^T (nn.Linear checks `"bias" in self`), and its
quantized form is built without one.

Matmuls on every core with a single-threaded BLAS: MLX's Linux CPU wheel bundles the reference
BLAS, which computes a matmul on one thread. The rows of x W^T are independent, so `RowSplitLinear`
cuts them into one piece per core, each on its own CPU stream (device/streams.py), and joins the
results. It also stores the weight column-major (W^T contiguous): nn.Linear's x W^T makes the
reference sgemm take its transposed form, a dot product per output whose sum the compiler may not
vectorise, whereas with W^T contiguous it runs its column form, an axpy per input feature: 1.6x faster
(2 vs 3 GFLOP/s at 160 x 128 x 512). Both forms add the products in the same order from 0; the bias is
added after, as sgemm adds it in its transposed form, so the output is bit-identical to nn.Linear's
(tests/test_speed_setup.py). On 2 cores a tiny-model image (text, 20 guided steps, decode) took
1.59 s split instead of 1.98 s (medians of 4, interleaved, in one process). With OpenBLAS, which
threads its own matmuls, the split did not help (0.32 s against 0.29 s), so pipelines use it only
without one (`device/blas.py`'s `single_threaded`).
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
    """nn.Linear whose rows are computed on one CPU stream per core, from a weight stored
    column-major (same values, same output)."""

    def __call__(self, x: mx.array) -> mx.array:  # (..., in) -> (..., out)
        streams = cpu_streams()
        rows = x.size // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1])
        w_t = self.weight.T  # (in, out): contiguous when stored column-major, sgemm's column form
        if len(streams) < 2 or rows < MIN_ROWS_PER_CORE * len(streams):
            y = flat @ w_t
        else:
            y = mx.concatenate([mx.matmul(flat[p], w_t, stream=s) for p, s in zip(pieces(rows, len(streams)), streams)])
        if "bias" in self:
            y = y + self.bias  # after the sum, as nn.Linear's addmm adds it in sgemm's transposed form
        return y.reshape(*x.shape[:-1], -1)


def column_major(w: mx.array) -> mx.array:
    """The same (out, in) matrix with its columns contiguous: w.T is then a plain row-major array."""
    return mx.contiguous(w.T).T


def split_rows_across_cores(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear inside `model` a RowSplitLinear with a column-major float32
    weight (in place; subclasses such as quantized or sharded layers keep their own kernels);
    returns `model`. A weight replaced later (a LoRA merged) is row-major again: still correct."""
    for _, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = RowSplitLinear  # same parameters, a different __call__
            if module.weight.dtype == mx.float32:  # sgemm's; MLX computes other dtypes itself
                module.weight = column_major(module.weight)
    return model
