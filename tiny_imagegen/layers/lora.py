"""Low-rank adaptation (LoRA, Hu et al. 2021): W' = W + s · B A, with A (r, in), B (out, r), r small.

Two ways to use an adapter:

    merged:    W ← W + s B A once, before quantization: no cost per step, the model is as fast as
               before (`merge_lora`);
    a branch:  y = base(x) + s (x Aᵀ) Bᵀ beside a layer that cannot be changed in place, e.g. an
               `nn.QuantizedLinear` (its 4-bit weights cannot absorb a small update) or a frozen
               layer being trained (`LoRALinear`).

Both take the same (A, B, s). Several adapters on one layer are one branch: their A's stacked along
the rank, B's side by side with each adapter's scale folded in, so the branch is still two matmuls.
"""

import math

import mlx.core as mx
import mlx.nn as nn


def lora_delta(a: mx.array, b: mx.array, scale: float) -> mx.array:
    """s · B A: the (out, in) update of one adapter, computed in float32."""
    return scale * (b.astype(mx.float32) @ a.astype(mx.float32))


def merge_lora(linear: nn.Linear, a: mx.array, b: mx.array, scale: float = 1.0) -> None:
    """W ← W + s B A in place, in float32 then back to W's dtype (so a bf16 model rounds once)."""
    w = linear.weight
    linear.weight = (w.astype(mx.float32) + lora_delta(a, b, scale)).astype(w.dtype)


class LoRALinear(nn.Module):
    """y = base(x) + scale · (x Aᵀ) Bᵀ, next to an `nn.Linear` or `nn.QuantizedLinear` `base`.

    `lora_a` (r, in) and `lora_b` (out, r) are the module's only trainable parameters when
    `base` is frozen (training), and are computed in the input's dtype."""

    def __init__(self, base: nn.Module, lora_a: mx.array, lora_b: mx.array, scale: float = 1.0):
        super().__init__()
        out_features, in_features = _linear_shape(base)
        if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit a "
                             f"linear layer {in_features} -> {out_features}")
        self.base, self.lora_a, self.lora_b, self.scale = base, lora_a, lora_b, scale

    @classmethod
    def for_training(cls, base: nn.Module, rank: int, alpha: float | None = None) -> "LoRALinear":
        """A fresh adapter as PEFT initialises one: A Kaiming-uniform (bound 1/sqrt(in)), B = 0,
        so training starts from the base model exactly; scale = alpha / rank (alpha defaults to rank)."""
        out_features, in_features = _linear_shape(base)
        bound = 1.0 / math.sqrt(in_features)
        a = mx.random.uniform(-bound, bound, (rank, in_features))
        return cls(base, a, mx.zeros((out_features, rank)), (alpha or rank) / rank)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        a, b = self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype)
        return self.base(x) + self.scale * ((x @ a.T) @ b.T)


def _linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or nn.QuantizedLinear (whose packed weight hides `in`)."""
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[0], layer.weight.shape[1] * 32 // layer.bits
    if isinstance(layer, nn.Linear):
        return tuple(layer.weight.shape)
    raise TypeError(f"LoRA needs an nn.Linear or nn.QuantizedLinear, got {type(layer).__name__}")
