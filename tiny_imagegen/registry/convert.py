"""Converting a published model's folder (laid out like its hub repo) into our format.

The family decides which component folders are read (catalog.py's FAMILIES, recognised from
model_index.json by hub.py); checkpoints/convert.py writes them (one file per component, optionally
4/8-bit) and records where they came from.

    convert("~/hf/FLUX.1-schnell", "weights/schnell-q4", bits=4)
    convert("weights/schnell", "weights/schnell-q8", bits=8)     # re-save an unquantized converted folder
"""

import json
from pathlib import Path

import mlx.core as mx

from ..checkpoints.components import COMPONENTS, import_ref
from ..checkpoints.convert import COPIED_FILES, COPIED_FOLDERS, MODEL_JSON, load_component, read_manifest, save_converted
from ..checkpoints.mapping import CheckpointError
from .hub import family_of_folder, hub_source


def convert(
    source: str | Path,
    output: str | Path,
    *,
    bits: int | None = None,
    group_size: int = 64,
    dtype: mx.Dtype | str | None = mx.bfloat16,
    force: bool = False,
    provenance: dict | None = None,
    modulation_bits: int | None = None,
) -> Path:
    """Convert a folder laid out like a hub repo (the components its family reads, catalog.py),
    or re-save an unquantized converted folder (e.g. to quantize it), into our format at `output`."""
    source = Path(source)
    provenance = {**hub_source(source), **(provenance or {})}
    if (source / MODEL_JSON).is_file():
        manifest = read_manifest(source)
        if manifest["quantization"]:
            raise ValueError(f"{source} is already quantized: convert from the original weights instead")
        models = {name: (lambda n=name: load_component(source, n)) for name in manifest["components"]}
        provenance = {**manifest["source"], "converted_from": str(source.resolve())}
        pipeline = manifest.get("pipeline")
    else:
        family = family_of_folder(source)
        specs = {name: COMPONENTS[name] for name in family.components + family.optional_components}
        models = {
            name: (lambda spec=spec: import_ref(spec.loader)(source / spec.source_folder))
            for name, spec in specs.items()
            if (source / spec.source_folder).is_dir()
        }
        pipeline = {"family": family.name, **_pipeline_options(source)}
        if not models:
            folders = ", ".join(c.source_folder for c in specs.values())
            raise CheckpointError(f"{source}: no component folders ({folders}) and no {MODEL_JSON}: nothing to convert")
    copy = {f: source / f for f in COPIED_FOLDERS if (source / f).is_dir()}
    copy.update({f: source / f for f in COPIED_FILES if (source / f).is_file()})
    return save_converted(output, models, copy=copy, source=provenance, bits=bits, group_size=group_size,
                          dtype=dtype, force=force, pipeline=pipeline,
                          modulation_bits=modulation_bits)


def _pipeline_options(source: Path) -> dict:
    """What model_index.json says about sampling beyond the components (FLUX.2 klein's
    `is_distilled`: one pass per step, or classifier-free guidance), kept in model.json."""
    index = source / "model_index.json"
    config = json.loads(index.read_text()) if index.is_file() else {}
    return {k: config[k] for k in ("is_distilled",) if k in config}
