"""Helpers shared by the fixture makers."""

import copy
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Seeded random weights for every parameter (std small enough to keep activations O(1));
    norm scales sit around 1 so that a wrong norm shows."""
    g = seeded(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            p.copy_((1.0 + noise) if _is_norm_scale(name, p) else noise)
    return module.eval()


def _is_norm_scale(name: str, p: torch.Tensor) -> bool:
    return p.ndim == 1 and "norm" in name and name.endswith(("weight", "scale"))


def save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().to(torch.float32 if v.is_floating_point() else v.dtype)
               for k, v in tensors.items()}, str(path))


def save_sharded(folder: Path, prefix: str, state: dict[str, torch.Tensor], shards: int) -> None:
    """Write a state dict the way the hub repos do: N shards plus `<prefix>.safetensors.index.json`."""
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"{prefix}-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s * per : (s + 1) * per]}
        save(folder / name, part)
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=1, sort_keys=True))


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def manifest(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Key -> shape of a state dict (meta tensors welcome)."""
    return {k: list(v.shape) for k, v in sorted(state.items())}


def np32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def bf16(module: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 copy of a module (the same weights, rounded), as users run it."""
    return copy.deepcopy(module).to(torch.bfloat16).eval()


@contextmanager
def recording(modules: dict[str, torch.nn.Module]):
    """Record each named module's output (a tensor or a tuple of tensors) while inside."""
    seen: dict[str, object] = {}
    handles = [m.register_forward_hook(lambda _m, _in, out, name=name: seen.__setitem__(name, out))
               for name, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
