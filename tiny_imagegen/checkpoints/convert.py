"""Our own weights format, optionally quantized: a folder that loads without the original files.

    weights/<name>/
      model.json               configs, quantization, provenance, size + sha256 of every file
      transformer.safetensors  one file per component, in our parameter names
      t5.safetensors  clip.safetensors  vae.safetensors
      tokenizer/  tokenizer_2/  scheduler/     copied from the source as they are (and model_index.json)

A component is built from its config alone (MLX initialises lazily, so that costs nothing),
quantized with the recorded layer list when the folder is quantized, then filled with
`load_weights(strict=True)`. Loading checks every file's size first (a truncated download fails
with the file's name, not deep in MLX); `verify=True` also checks the sha256. Which components
exist: checkpoints/components.py; which of their layers are quantized: checkpoints/quantize.py.

Writing streams one tensor at a time into a temporary folder beside the target, then renames it:
peak memory stays one tensor (mx.save_safetensors would hold the whole component), and no
half-written folder is ever left under the target's name. Output is deterministic: no timestamps,
tensors in sorted order, so the same input gives byte-identical files.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .components import COMPONENTS, import_ref
from .manifest import ManifestError, check_manifest, inside  # noqa: F401 (ManifestError: re-exported)
from .mapping import CheckpointError, check_dtype
from .quantize import check_quantization, layer_bits, quantizable_layers, quantize_layers
from .safetensors_io import file_sha256, write_safetensors

FORMAT, FORMAT_VERSION, MODEL_JSON = "tiny_imagegen", 1, "model.json"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
COPIED_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
COPIED_FILES = ("model_index.json",)  # the pipeline's own config (DiT: the class names, id2label)


class ConvertedModelError(CheckpointError):
    """A converted folder is incomplete, corrupt or does not fit the model its model.json names."""


# ---- saving ---------------------------------------------------------------------------------------


def save_converted(
    output: str | Path,
    components: dict[str, nn.Module | Callable[[], nn.Module]],
    *,
    copy: dict[str, Path] | None = None,
    source: dict | None = None,
    bits: int | None = None,
    group_size: int = 64,
    dtype: mx.Dtype | str | None = None,
    force: bool = False,
    pipeline: dict | None = None,
    modulation_bits: int | None = None,
) -> Path:
    """Write `components` (name -> model, or a function returning one: called one at a time, so a
    full-size model is released before the next is read) into the folder `output`.

    copy: folder (or file) name -> source folder (or file) copied in as it is (tokenizers, scheduler).
    source: provenance written to model.json. bits/group_size: quantize by the rule, or None;
    modulation_bits: the adaLN modulation layers at these bits instead (see the module docstring).
    dtype: cast floating-point weights before quantizing (None keeps them). The models passed in
    are not modified. Refuses an existing `output` unless `force`. pipeline: how the model is
    sampled, for models the code does not know by name (name, text encoding, SamplingDefaults)."""
    output = Path(output)
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists: choose another --output or pass --force to replace it")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}: known are {sorted(COMPONENTS)}")
    if bits is not None:
        check_quantization(bits, group_size, modulation_bits)
    elif modulation_bits is not None:
        raise ValueError("modulation_bits needs bits: it is a mixed 4/8-bit mode of a quantized model")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    from .. import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": f"tiny_imagegen {__version__}",
        "source": source or {},
        "dtype": _dtype_name(dtype) if dtype is not None else None,
        "quantization": {"bits": bits, "group_size": group_size, "mode": "affine",
                         **({"modulation_bits": modulation_bits} if modulation_bits else {})} if bits else None,
        "components": {},
        "files": {},
    }
    if pipeline:
        manifest["pipeline"] = pipeline
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, model_or_fn in components.items():
            entry, files = _write_component(tmp, name, model_or_fn, bits, group_size, dtype, modulation_bits)
            manifest["components"][name] = entry
            manifest["files"].update(files)
        for folder, src in (copy or {}).items():
            src = Path(src)
            for f in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()):
                rel = Path(folder) / f.relative_to(src) if f != src else Path(folder)
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, tmp / rel)
                manifest["files"][rel.as_posix()] = _file_record(tmp / rel)
        (tmp / MODEL_JSON).write_text(json.dumps(manifest, indent=1) + "\n")
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _write_component(folder: Path, name, model_or_fn, bits, group_size, dtype, modulation_bits) -> tuple[dict, dict]:
    model = model_or_fn if isinstance(model_or_fn, nn.Module) else model_or_fn()
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"{name}: the model has no dataclass .config to rebuild it from")
    n_parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    tensors, layers = stored_tensors(name, model, bits, group_size, dtype, modulation_bits)
    del model  # from here on only `tensors` holds the (lazy) weights, and each is dropped once written
    filename = f"{name}.safetensors"
    record = write_safetensors(folder / filename, tensors, metadata=file_metadata(name))
    entry = {
        "model": COMPONENTS[name].model.split(":")[1],
        "file": filename,
        "parameters": n_parameters,
        "config": dataclasses.asdict(config),
        "quantized_layers": layers,
    }
    if bits and layer_bits(name, layers, bits, modulation_bits):
        entry["layer_bits"] = layer_bits(name, layers, bits, modulation_bits)  # where they differ from bits
    return entry, {filename: record}


def stored_tensors(name: str, model: nn.Module, bits, group_size, dtype,
                   modulation_bits: int | None = None) -> tuple[dict[str, mx.array], list[str]]:
    """What is written for one component, still lazy: its parameters cast to `dtype`, each
    quantized layer's weight replaced by (weight, scales, biases) exactly as
    nn.QuantizedLinear.from_linear computes them. The model itself is not modified."""
    if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules()):
        raise ValueError(f"{name}: the model is already quantized; save it from unquantized weights")
    check_dtype(model, dtype)
    layers = quantizable_layers(name, model, group_size) if bits else []
    per_layer = layer_bits(name, layers, bits, modulation_bits) if bits else {}
    tensors = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        tensors = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in tensors.items()}
    for layer in layers:
        w = tensors.pop(f"{layer}.weight")
        tensors[f"{layer}.weight"], tensors[f"{layer}.scales"], tensors[f"{layer}.biases"] = mx.quantize(
            w, group_size, per_layer.get(layer, bits), mode="affine"
        )
    return tensors, layers


def file_metadata(name: str) -> dict[str, str]:
    return {"format": "mlx", "component": name}


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _replace(tmp: Path, output: Path):
    """Move the finished folder into place; an existing one (force) is swapped out, then removed."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old)


def _dtype_name(dtype: mx.Dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ---- loading --------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MODEL_JSON
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertedModelError(f"{folder} is not a converted model folder: no {MODEL_JSON}") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ConvertedModelError(f"{path} is unreadable: {e}") from None
    if not isinstance(manifest, dict):
        raise ConvertedModelError(f"{path}: not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ConvertedModelError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return check_manifest(folder, manifest)  # a sandbox: files inside the folder, configs within bounds


def check_files(folder: str | Path, names: list[str] | None = None, verify: bool = False):
    """Every file model.json lists (or only `names`) is present with its recorded size, and with
    `verify` its recorded sha256. Raises ConvertedModelError naming the file."""
    folder = Path(folder)
    files = read_manifest(folder)["files"]
    for name in names if names is not None else sorted(files):
        if name not in files:
            raise ConvertedModelError(f"{folder / MODEL_JSON} does not list {name!r}")
        path, want = inside(folder, name), files[name]
        if not path.is_file():
            raise ConvertedModelError(f"{path} is missing (listed in {MODEL_JSON}): convert again")
        size = path.stat().st_size
        if size != want["size"]:
            raise ConvertedModelError(
                f"{path} is {size:,} bytes, {MODEL_JSON} records {want['size']:,}: "
                f"the file is {'truncated' if size < want['size'] else 'damaged'}; convert again"
            )
        if verify and file_sha256(path) != want["sha256"]:
            raise ConvertedModelError(f"{path} does not match its sha256 in {MODEL_JSON}: the file is corrupt; convert again")


def load_component(folder: str | Path, name: str, *, dtype: mx.Dtype | None = None, verify: bool = False) -> nn.Module:
    """One component of a converted folder, built from its config and lazily loaded (weights are
    read when first evaluated). `dtype` casts the floating-point weights (e.g. float32 on CPU)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if name not in manifest["components"]:
        raise ConvertedModelError(f"{folder} has no component {name!r}; it has {sorted(manifest['components'])}")
    entry, spec = manifest["components"][name], COMPONENTS[name]
    check_files(folder, [entry["file"]], verify=verify)

    config_cls = import_ref(spec.config)
    config = _config_from_dict(config_cls, entry["config"])
    try:  # values within bounds that still do not fit together (e.g. axes_dim not summing to head_dim)
        model = import_ref(spec.model)(config)
    except (AssertionError, TypeError, ValueError, ZeroDivisionError) as e:  # the models assert their invariants
        raise ConvertedModelError(f"{folder / MODEL_JSON}: {name}'s config does not build a model: {e}") from None
    check_dtype(model, dtype or DTYPES.get(manifest.get("dtype") or ""))
    quant = manifest["quantization"]
    if entry["quantized_layers"]:
        quantize_layers(model, entry["quantized_layers"], entry.get("layer_bits", {}), quant["bits"], quant["group_size"])
    path = inside(folder, entry["file"])
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ConvertedModelError(f"cannot read {path}: {e}") from None
    _check_keys(path, dict(tree_flatten(model.parameters())), weights)
    model.load_weights(list(weights.items()), strict=True)
    if dtype is not None:
        model.set_dtype(dtype)
    return model


def load_converted(folder: str | Path, names=None, *, dtype=None, verify: bool = False) -> dict[str, nn.Module]:
    """All components (or `names`) of a converted folder: name -> model. Every file the folder
    lists is checked first, tokenizers included."""
    check_files(folder, verify=verify)
    names = names or list(read_manifest(folder)["components"])
    return {n: load_component(folder, n, dtype=dtype) for n in names}


def _config_from_dict(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(values) - known)
    if extra:
        raise ConvertedModelError(f"{cls.__name__} has no field(s) {extra}: written by another version of this code?")
    try:  # a required field missing, or values its own checks refuse (e.g. heads not a multiple)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise ConvertedModelError(f"{cls.__name__} config in {MODEL_JSON}: {e}") from None


def _check_keys(path: Path, expected: dict[str, mx.array], found: dict[str, mx.array]):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if expected[k].shape != found[k].shape
    ]
    problems = [(f"{len(v)} {kind}", v) for kind, v in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if v]
    if problems:
        detail = "; ".join(f"{head} key(s): {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}" for head, v in problems)
        raise ConvertedModelError(f"{path} does not fit its config in {MODEL_JSON}: {detail}")
