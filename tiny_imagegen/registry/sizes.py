"""Bytes of a registered model's weights in bf16, 8-bit and 4-bit, computed from its published
configs (catalog.py) without allocating them.

MLX initialises parameters lazily: each component is built from its config and quantized by the
converter's own rule (`stored_tensors`) as a graph that is never evaluated, so every array's
nbytes is known from its shape and dtype. These are the bytes of our converted files (less their
small headers) and of the loaded weights; activations are not included.
"""

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoints.components import COMPONENTS, import_ref
from ..checkpoints.convert import stored_tensors
from .catalog import ModelSpec

SETTINGS = (("bf16", None), ("8-bit", 8), ("4-bit", 4))


def component_bytes(name: str, config, bits: int | None, group_size: int = 64) -> tuple[int, int]:
    """-> (bytes stored, parameters) of one component built from `config`."""
    model = import_ref(COMPONENTS[name].model)(config)
    tensors, _ = stored_tensors(name, model, bits, group_size, mx.bfloat16)
    return sum(v.nbytes for v in tensors.values()), sum(v.size for _, v in tree_flatten(model.parameters()))


def model_bytes(spec: ModelSpec, group_size: int = 64) -> dict[str, dict[str, int]]:
    """setting ("bf16", "8-bit", "4-bit") -> component -> bytes; {} for a model without configs."""
    return {label: {name: component_bytes(name, config, bits, group_size)[0] for name, config in spec.configs.items()}
            for label, bits in SETTINGS} if spec.configs else {}
