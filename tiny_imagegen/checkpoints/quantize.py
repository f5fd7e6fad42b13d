"""Which layers of a component are quantized, and at how many bits.

Quantization (MLX affine, `nn.quantize`): each row of a Linear weight is cut into groups of
`group_size` values; a group stores `bits`-bit integers q and one scale s and bias b in the
model dtype, w ~ s * q + b. The rule for which layers (the predicate `quantizable`):

  - only nn.Linear layers whose input width is a multiple of the group size;
  - never embeddings (token, position, T5's relative-position bias) or norms: they are no Linears;
  - never the VAE: mostly convolutions, 0.5% of the parameters, and it decodes straight to pixels;
  - never the MM-DiT's boundary layers, the patch projections `img_in` and `final_layer` (whose
    errors land directly on the predicted velocity), nor the small conditioning embedders
    `time_in`, `vector_in`, `guidance_in` (their output modulates every block): together
    0.4% of FLUX's parameters. FLUX.2 keeps the same, and its shared modulation Linears
    (computed once per forward, they modulate every block): 3.65% of klein 4B, 4.4% kept in all;
  - the SD U-Net's convolutions are no Linears and stay in the model dtype, and so does its
    timestep MLP `time_embedding` (as FLUX's `time_in`).

Optionally (`modulation_bits=8` with `bits=4`) the MM-DiT's adaLN modulation Linears
(`*.img_mod.lin`, `*.txt_mod.lin`, `*.modulation.lin`: 27% of FLUX's parameters) keep 8 bits while
the rest has 4: their (shift, scale, gate) multiply every block's residual branch. Measured on a
seeded FLUX-proportioned model (tests/test_quantization.py) it removes 24% of the 4-bit error
(relative L2 0.130 -> 0.099); model.json records the bits of every layer that differs.
"""

from dataclasses import dataclass
from fnmatch import fnmatch

import mlx.nn as nn

from .components import COMPONENTS

BITS, GROUP_SIZES = (4, 8), (32, 64, 128)


def quantizable(component: str, path: str, module: nn.Module, group_size: int) -> bool:
    """The rule in the module docstring, for one layer of one component (the class_predicate of nn.quantize)."""
    spec = COMPONENTS[component]
    return (
        spec.quantize
        and isinstance(module, nn.Linear)
        and module.weight.shape[1] % group_size == 0
        and not any(fnmatch(path, p) for p in spec.keep)
    )


def quantizable_layers(component: str, model: nn.Module, group_size: int) -> list[str]:
    return sorted(p for p, m in model.named_modules() if quantizable(component, p, m, group_size))


def layer_bits(component: str, layers: list[str], bits: int, modulation_bits: int | None = None) -> dict[str, int]:
    """The layers whose bits differ from `bits`: the adaLN modulation at `modulation_bits`."""
    if modulation_bits is None or modulation_bits == bits:
        return {}
    patterns = COMPONENTS[component].modulation
    return {p: modulation_bits for p in layers if any(fnmatch(p, pattern) for pattern in patterns)}


@dataclass(frozen=True)
class Quantization:
    """How to quantize on load (`--quantize 4 --modulation-bits 8`): what `quantize=` of the
    pipelines takes, besides a plain number of bits."""

    bits: int
    group_size: int = 64
    modulation_bits: int | None = None  # the adaLN modulation's own bits; None: `bits`

    def __post_init__(self):
        check_quantization(self.bits, self.group_size, self.modulation_bits)

    def __str__(self) -> str:
        mod = f", adaLN modulation {self.modulation_bits}-bit" if self.modulation_bits not in (None, self.bits) else ""
        return f"{self.bits}-bit{mod}"


def quantize_component(component: str, model: nn.Module, bits: "int | Quantization", group_size: int = 64,
                       modulation_bits: int | None = None) -> list[str]:
    """Quantize `model` in place by the rule (e.g. hub weights at load time); returns the layers.
    `bits` may be a Quantization, which then carries the group size and modulation bits."""
    if isinstance(bits, Quantization):
        bits, group_size, modulation_bits = bits.bits, bits.group_size, bits.modulation_bits
    check_quantization(bits, group_size, modulation_bits)
    layers = quantizable_layers(component, model, group_size)
    quantize_layers(model, layers, layer_bits(component, layers, bits, modulation_bits), bits, group_size)
    return layers


def quantize_layers(model: nn.Module, layers, per_layer: dict[str, int], bits: int, group_size: int):
    chosen = set(layers)
    nn.quantize(model, group_size, bits, class_predicate=lambda p, m: p in chosen and dict(
        group_size=group_size, bits=per_layer.get(p, bits), mode="affine"))


def check_quantization(bits, group_size, modulation_bits=None):
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {BITS}, got {bits}")
    if modulation_bits is not None and modulation_bits not in BITS:
        raise ValueError(f"modulation bits must be one of {BITS}, got {modulation_bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
