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
from dataclasses import dataclass

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
        out_features, in_features = linear_shape(base)
        if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features or lora_b.shape[1] != lora_a.shape[0]:
            raise ValueError(f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit a "
                             f"linear layer {in_features} -> {out_features}")
        self.base, self.lora_a, self.lora_b, self.scale = base, lora_a, lora_b, scale

    @classmethod
    def for_training(cls, base: nn.Module, rank: int, alpha: float | None = None) -> "LoRALinear":
        """A fresh adapter as PEFT initialises one: A Kaiming-uniform (bound 1/sqrt(in)), B = 0,
        so training starts from the base model exactly; scale = alpha / rank (alpha defaults to rank)."""
        out_features, in_features = linear_shape(base)
        bound = 1.0 / math.sqrt(in_features)
        a = mx.random.uniform(-bound, bound, (rank, in_features))
        return cls(base, a, mx.zeros((out_features, rank)), (alpha or rank) / rank)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def __call__(self, x: mx.array) -> mx.array:
        a, b = self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype)
        return self.base(x) + self.scale * ((x @ a.T) @ b.T)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or nn.QuantizedLinear (whose packed weight hides `in`)."""
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[0], layer.weight.shape[1] * 32 // layer.bits
    if isinstance(layer, nn.Linear):
        return tuple(layer.weight.shape)
    raise TypeError(f"LoRA needs an nn.Linear or nn.QuantizedLinear, got {type(layer).__name__}")


@dataclass(frozen=True)
class Update:
    """s · B A on rows [start, start + B.shape[0]) of one layer."""

    a: mx.array  # (r, in)
    b: mx.array  # (rows, r)
    start: int
    scale: float


# ---- a model's layers by path: merge, or a branch beside a quantized layer ---------------------------


def get_layer(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def set_layer(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent, last = path.rsplit(".", 1) if "." in path else ("", path)
    parent = get_layer(model, parent) if parent else model
    if last.isdigit():
        parent[int(last)] = layer
    else:
        setattr(parent, last, layer)


def full_b(update: Update, out_features: int) -> mx.array:
    """B placed at its rows of the whole layer, zeros elsewhere: (out, r)."""
    rows, r = update.b.shape
    if rows == out_features:
        return update.b
    return mx.concatenate([mx.zeros((update.start, r), update.b.dtype), update.b,
                           mx.zeros((out_features - update.start - rows, r), update.b.dtype)])


def apply_updates(components: dict[str, nn.Module], updates: dict[tuple[str, str], list[Update]],
                  merge: bool | None = None) -> dict[str, int]:
    """Apply updates in place. merge None: merged into nn.Linear weights, a branch (LoRALinear)
    beside nn.QuantizedLinear; True / False force one (merging into a quantized layer is refused).
    Returns how many layers took each path."""
    counts = {"merged": 0, "branch": 0}
    for (component, path), ups in updates.items():
        model = components[component]
        layer = get_layer(model, path)
        base = layer.base if isinstance(layer, LoRALinear) else layer
        out_features = linear_shape(base)[0]
        quantized = isinstance(base, nn.QuantizedLinear)
        if merge and quantized:
            raise ValueError(f"{component}.{path} is quantized: a LoRA cannot be merged into it (use merge=None)")
        if (merge is None and not quantized and not isinstance(layer, LoRALinear)) or merge:
            for u in ups:
                merge_lora(base, u.a, full_b(u, out_features), u.scale)
            counts["merged"] += 1
            continue
        a = mx.concatenate([u.a for u in ups])  # (Σr, in): the adapters side by side along the rank
        b = mx.concatenate([u.scale * full_b(u, out_features) for u in ups], axis=1)  # (out, Σr)
        if isinstance(layer, LoRALinear):  # adapters already there: one branch for all
            a = mx.concatenate([layer.lora_a, a])
            b = mx.concatenate([layer.scale * layer.lora_b, b], axis=1)
        dtype = base.scales.dtype if quantized else base.weight.dtype
        set_layer(model, path, LoRALinear(base, a.astype(dtype), b.astype(dtype), 1.0))
        counts["branch"] += 1
    return counts
