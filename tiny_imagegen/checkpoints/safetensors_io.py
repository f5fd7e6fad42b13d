"""Reading checkpoints from disk: one .safetensors file, or a folder of shards with its index json.

`mx.load` maps safetensors lazily: nothing is read until an array is evaluated, so a 24 GB
checkpoint can be opened, checked against a key table and converted tensor by tensor.
"""

import json
from pathlib import Path

import mlx.core as mx

from .mapping import CheckpointError


def read_file(path: str | Path) -> dict[str, mx.array]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:  # truncated download, not a safetensors file, ...
        raise CheckpointError(f"cannot read {path}: {e}") from None


VARIANTS = ("fp16", "bf16", "fp32", "non_ema", "ema")


def is_variant(filename: str) -> bool:
    """`model.fp16.safetensors`, `diffusion_pytorch_model.non_ema.safetensors`: diffusers' variants."""
    parts = filename.split(".")
    return len(parts) > 2 and parts[-2] in VARIANTS


def read_checkpoint(path: str | Path, prefix: str = "") -> dict[str, mx.array]:
    """All tensors of a checkpoint: a file, or a folder holding shards (listed by a
    `*.safetensors.index.json` when there is one). With `prefix`, only the files whose
    name starts with it are read (e.g. 'diffusion_pytorch_model')."""
    path = Path(path)
    if path.is_file():
        return read_file(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    indexes = sorted(path.glob(f"{prefix}*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        # not the precision / EMA variants a repo may hold beside the weights (SD 1.5's
        # unet/diffusion_pytorch_model.fp16.safetensors, .non_ema.safetensors): same keys
        files = sorted(f for f in path.glob(f"{prefix}*.safetensors") if not is_variant(f.name))
    if not files:
        raise CheckpointError(f"no .safetensors files in {path}")
    tensors = {}
    for f in files:
        tensors.update(read_file(f))
    if indexes:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{indexes[0].name} lists tensors no shard holds: {absent[:8]}")
    return tensors
