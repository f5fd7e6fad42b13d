"""The loading steps every family shares: a converted folder's components, lazily loaded and
quantized as asked, and handed to the pipeline so that a released text encoder can be re-read;
which pipeline class a model needs, found before anything is read. Which folder to load is
registry/where.py's answer."""

import importlib
from pathlib import Path

import mlx.core as mx

from ..checkpoints.components import COMPONENTS, import_ref
from ..checkpoints.convert import load_component, read_manifest
from ..checkpoints.quantize import quantize_component


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


def load_parts(folder: Path, names: tuple[str, str, str], dtype: mx.Dtype, quantize: int | None, verify: bool,
               quantized_on_load: tuple[str, ...], **text_encoder_options):
    """A transformer, a VAE and a text encoder, named as in checkpoints/components.py, from a
    converted folder or a hub folder (each component from its subfolder by its loader), lazily,
    `quantize` applied to `quantized_on_load` -> (transformer, vae, text encoder loader, model.json
    or None). The text encoder is read when asked for, and again after a release."""
    from ..registry.hub import is_converted

    transformer, vae, text_encoder = names
    if is_converted(folder):
        parts, manifest = load_converted_parts(folder, dtype, quantize, verify, quantized_on_load)
        component = reloading(parts, folder, dtype, quantize, quantized_on_load)
        return parts[transformer], parts[vae], lambda: component(text_encoder), manifest

    def from_hub(name: str, **options):
        model = import_ref(COMPONENTS[name].loader)(folder / COMPONENTS[name].source_folder, dtype=dtype, **options)
        if quantize and name in quantized_on_load:
            quantize_component(name, model, quantize)
        return model

    return from_hub(transformer), from_hub(vae), lambda: from_hub(text_encoder, **text_encoder_options), None


def pipeline_class(model: str) -> type | None:
    """The pipeline class that would run `model`, found without reading weights or downloading:
    a registered name, a shipped model or a local folder; None for a hub repo id the registry
    does not know (its family is known only once its model_index.json is here)."""
    from ..registry import FAMILIES, find
    from ..registry.hub import family_of_folder
    from ..registry.where import shipped

    spec = find(model)
    if spec is not None:
        family = FAMILIES[spec.family]
    else:
        folder = shipped(model) if "/" not in model else None
        folder = folder or (Path(model).expanduser() if Path(model).expanduser().is_dir() else None)
        if folder is None:
            return None
        try:
            family = family_of_folder(folder)
        except Exception:  # an unknown pipeline: from_pretrained says so in its own words
            return None
    module, name = family.pipeline.split(":")
    return getattr(importlib.import_module(module), name)
