"""Bias-free models: FLUX.2 (and Qwen3's attention) have no bias in any Linear.

Rather than a bias-free copy of every shared layer, a model built from the shared layers drops
the biases once: an MLX Linear without a `bias` entry computes x W^T (nn.Linear checks
`"bias" in self`), and its quantized form is built without one.
"""

import mlx.nn as nn


def without_biases(model: nn.Module) -> nn.Module:
    """Remove the bias of every nn.Linear inside `model` (in place); returns `model`."""
    for _, module in model.named_modules():
        if isinstance(module, nn.Linear) and "bias" in module:
            module.pop("bias")
    return model
