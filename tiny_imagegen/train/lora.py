"""Training a LoRA: the base model frozen, low-rank branches (layers/lora.py) on chosen linears,
the flow-matching loss and the same Trainer as the base model; saved in the diffusers/PEFT format.

    denoiser = TinyDenoiser(pipe.text_encoder.t5, pipe.transformer)     # the shipped tiny-shapes
    add_lora(denoiser.transformer, rank=8)                              # everything else frozen
    Trainer(denoiser, denoiser_loss, batches, config, folder).train()
    save_lora(denoiser.transformer, "purple-circle.safetensors")        # read by apply_loras and by diffusers

The saved file names every layer as diffusers does (checkpoints/flux.py's DIFFUSERS table read
forwards): a LoRA on our fused qkv becomes LoRAs on to_q, to_k and to_v that share A and split B by
rows (exactly the same update), and lora_alpha / r goes into the `lora_adapter_metadata` header,
as diffusers' save_lora_weights writes it.

The concept data: scenes that contain the new (colour, shape) pair, mixed half and half with scenes
of the training split, so the adapter learns the pair without forgetting the rest.
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..checkpoints.flux import DIFFUSERS
from ..checkpoints.lora import _slot_rows
from ..layers.lora import get_layer, set_layer
from ..checkpoints.mapping import source_keys, swap_halves
from ..layers.lora import LoRALinear
from .shapes_dataset import is_held_out, sample_scene

# every attention and MLP projection of the blocks (not the modulations or embedders)
DEFAULT_TARGETS = (r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)", r"double_blocks\.\d+\.(img|txt)_mlp\.layers\.\d+",
                   r"single_blocks\.\d+\.linear[12]")


def add_lora(model: nn.Module, rank: int, targets=DEFAULT_TARGETS, alpha: float | None = None) -> list[str]:
    """Freeze `model` and put a fresh LoRA beside every nn.Linear whose path fully matches one of
    the `targets` regexes; returns their paths. Only the adapters' A and B are trainable."""
    model.freeze()
    paths = [p for p, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(re.fullmatch(t, p) for t in targets)]
    if not paths:
        raise ValueError(f"no linear layer matches the LoRA targets {targets}")
    for path in paths:
        set_layer(model, path, LoRALinear.for_training(get_layer(model, path), rank, alpha))
    return paths


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """The model's adapters as a diffusers/PEFT file (`transformer.<diffusers name>.lora_A.weight`)."""
    tensors, targets, scales = {}, [], set()
    for ours, layer in sorted(lora_layers(model).items()):
        keys, transform = source_keys(DIFFUSERS, ours + ".weight")
        out_features, in_features = layer.lora_b.shape[0], layer.lora_a.shape[1]
        for j, key in enumerate(keys):
            name = key.removesuffix(".weight")
            start, stop = _slot_rows(j, len(keys), out_features, in_features)
            b = layer.lora_b[start:stop]
            tensors[f"transformer.{name}.lora_A.weight"] = layer.lora_a
            tensors[f"transformer.{name}.lora_B.weight"] = swap_halves([b]) if transform is swap_halves else b
            targets.append(name)
        scales.add((layer.rank, layer.scale))
    if len(scales) != 1:
        raise ValueError(f"save_lora writes one rank and scale for all layers, found {sorted(scales)}")
    (rank, scale), = scales
    meta = {"transformer.r": rank, "transformer.lora_alpha": scale * rank, "transformer.target_modules": sorted(targets)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), {k: v.astype(mx.float32) for k, v in tensors.items()},
                        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)})
    return path


# ---- data -----------------------------------------------------------------------------------------


def concept_scenes(seed: int, n: int, colour: str, shape: str, split: str = "heldout"):
    """The first n scenes of stream `seed` of `split` that hold a (colour, shape) object and no
    other held-out pair (so one pair is taught)."""
    out, i = [], 0
    while len(out) < n:
        scene = sample_scene(seed, i, split)
        pairs = {(o.colour, o.shape) for o in scene.objects}
        if (colour, shape) in pairs and not any(is_held_out(*p) for p in pairs - {(colour, shape)}):
            out.append(scene)
        i += 1
        if i > 200 * n:
            raise ValueError(f"no {colour} {shape} in the {split} split")
    return out


def shard(batch: tuple, group) -> tuple:
    """This process's 1/N of a global batch (every array split along axis 0); the whole batch
    without a group. The global batch must divide evenly."""
    if group is None or group.size() == 1:
        return batch
    n, rank = group.size(), group.rank()
    B = batch[0].shape[0]
    if B % n:
        raise ValueError(f"global batch {B} does not split over {n} processes")
    return tuple(x[rank * (B // n) : (rank + 1) * (B // n)] for x in batch)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
