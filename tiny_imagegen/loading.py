"""Where a model's weights are, and the loading steps every family shares.

`--model` may name:
  - a registered model (registry.py) or one of its aliases: shipped with the package
    (tiny-shapes) or downloaded from its hub repo into the Hugging Face cache (hub.py),
  - a model converted into `weights/<name>/` (our format, checkpoints/convert.py),
  - a folder in our format anywhere, or a local folder laid out like the hub repo,
  - any hub repo id org/name (its model_index.json says which family it is).

The shipped weights sit in the checkout's `weights/` folder, and inside the installed package
(`tiny_imagegen/weights/`, package data of the wheel), so the default model works after a plain
`pip install` from any folder.
"""

from pathlib import Path

import mlx.core as mx

from . import registry
from .checkpoints.convert import load_component, read_manifest
from .checkpoints.quantize import quantize_component
from .hub import ModelNotAvailable, is_converted, resolve_model
from .registry import ModelSpec

_PACKAGE = Path(__file__).resolve().parent
WEIGHTS_FOLDERS = (_PACKAGE.parent / "weights", _PACKAGE / "weights")  # checkout, installed package


def shipped(name: str) -> Path | None:
    """weights/<name> of the checkout or of the installed package, if it holds a converted model."""
    return next((w / name for w in WEIGHTS_FOLDERS if is_converted(w / name)), None)


def locate(model: str) -> tuple[Path, ModelSpec | None]:
    """A local folder for `model` (see the module docstring; downloads if it must) and its
    registry entry (None for a folder or a repo id the registry does not know)."""
    spec = registry.find(model)
    local = shipped(spec.name if spec else model) if "/" not in model else None
    if local is not None:
        return local, spec
    if spec is not None and spec.shipped:
        raise ModelNotAvailable(f"{model}: the shipped weights are missing from {' and '.join(map(str, WEIGHTS_FOLDERS))} "
                                "(a broken install? reinstall the package)")
    if spec is None and "/" not in model and not Path(model).expanduser().is_dir():
        ours = sorted({p.name for w in WEIGHTS_FOLDERS if w.is_dir() for p in w.iterdir() if is_converted(p)})
        known = list(dict.fromkeys(registry.names() + ours))
        raise ModelNotAvailable(f"unknown model {model!r}: known names are {', '.join(known)}; or pass a local "
                                "folder (hub layout or converted) or a hub repo id org/name (`--model list` shows them)")
    folder = resolve_model(model)
    if spec is None and is_converted(folder):  # a converted copy of a registered model keeps its defaults
        source = read_manifest(folder).get("source", {})
        spec = registry.find(source.get("model", "")) or registry.by_repo(source.get("repo_id"))
    return folder, spec


def load_converted_parts(folder: Path, dtype: mx.Dtype, quantize: int | None, verify: bool,
                         quantized_on_load: tuple[str, ...]) -> tuple[dict, dict]:
    """All components of a converted folder, lazily loaded, -> (name -> model, model.json).
    `quantize` quantizes `quantized_on_load` (those present); a folder already quantized refuses it."""
    manifest = read_manifest(folder)
    if quantize and manifest["quantization"]:
        q = manifest["quantization"]
        raise ValueError(f"{folder} is already quantized ({q['bits']}-bit, group {q['group_size']}): "
                         "drop --quantize, or convert again from the original weights")
    parts = {n: load_component(folder, n, dtype=dtype, verify=verify) for n in manifest["components"]}
    if quantize:
        for n in quantized_on_load:
            if n in parts:
                quantize_component(n, parts[n], quantize)
    return parts, manifest


def reloading(parts: dict, folder: Path, dtype: mx.Dtype, quantize: int | None, quantized_on_load: tuple[str, ...]):
    """name -> that component of a converted folder: first the one `load_converted_parts` loaded
    (handed over once, so that releasing a text encoder after encoding frees it), then re-read from
    the folder and quantized as on the first load, each time a pipeline asks for it again."""
    def component(name: str):
        if name in parts:
            return parts.pop(name)
        model = load_component(folder, name, dtype=dtype)
        if quantize and name in quantized_on_load:
            quantize_component(name, model, quantize)
        return model

    return component
