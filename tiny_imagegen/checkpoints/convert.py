"""Our own weights format, optionally quantized: a folder that loads without the original files.

    weights/<name>/
      model.json               configs, quantization, provenance, size + sha256 of every file
      transformer.safetensors  one file per component, in our parameter names
      t5.safetensors  clip.safetensors  vae.safetensors
      tokenizer/  tokenizer_2/  scheduler/     copied from the source as they are (and model_index.json)

A component is built from its config alone (MLX initialises lazily, so that costs nothing),
quantized with the recorded layer list when the folder is quantized, then filled with
`load_weights(strict=True)`. Loading checks every file's size first (a truncated download fails
with the file's name, not deep in MLX); `verify=True` also checks the sha256.

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

Writing streams one tensor at a time into a temporary folder beside the target, then renames it:
peak memory stays one tensor (mx.save_safetensors would hold the whole component), and no
half-written folder is ever left under the target's name. Output is deterministic: no timestamps,
tensors in sorted order, so the same input gives byte-identical files.
"""

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .mapping import CheckpointError, check_dtype

FORMAT, FORMAT_VERSION, MODEL_JSON = "tiny_imagegen", 1, "model.json"
BITS, GROUP_SIZES = (4, 8), (32, 64, 128)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
COPIED_FOLDERS = ("tokenizer", "tokenizer_2", "scheduler")
COPIED_FILES = ("model_index.json",)  # the pipeline's own config (DiT: the class names, id2label)


class ConvertedModelError(CheckpointError):
    """A converted folder is incomplete, corrupt or does not fit the model its model.json names."""


@dataclass(frozen=True)
class Component:
    """Where a component's classes live ("module:Name", imported only when used, so this file
    works with whatever models exist) and which of its layers stay in full precision."""

    model: str
    config: str
    source_folder: str  # its folder in a diffusers-layout repo
    loader: str  # source_folder -> model, lazily (weights read when first evaluated)
    keep: tuple[str, ...] = ()  # layer paths (fnmatch) never quantized
    quantize: bool = True
    modulation: tuple[str, ...] = ()  # layer paths (fnmatch) of the adaLN modulation, for modulation_bits


_M, _C = "tiny_imagegen.models", "tiny_imagegen.checkpoints"
COMPONENTS = {
    "transformer": Component(
        f"{_M}.mmdit:MMDiT", f"{_M}.mmdit:MMDiTConfig", "transformer", f"{_C}.flux:load_flux_transformer",
        keep=("img_in", "final_layer", "final_layer.*", "time_in.*", "vector_in.*", "guidance_in.*"),
        modulation=("*.img_mod.lin", "*.txt_mod.lin", "*.modulation.lin"),
    ),
    # FLUX.2: as FLUX.1, and the shared modulation (3 Linears, 3.65% of klein 4B, whose output
    # modulates every block) stays in full precision too
    "flux2_transformer": Component(
        f"{_M}.flux2:Flux2Transformer", f"{_M}.flux2:Flux2Config", "transformer", f"{_C}.flux2:load_flux2_transformer",
        keep=("img_in", "final_layer", "final_layer.*", "time_in.*", "guidance_in.*",
              "double_stream_modulation_img.*", "double_stream_modulation_txt.*", "single_stream_modulation.*"),
    ),
    "flux2_vae": Component(
        f"{_M}.vae_flux2:AutoencoderKLFlux2", f"{_M}.vae_flux2:Flux2VAEConfig", "vae", f"{_C}.flux2:load_flux2_vae",
        quantize=False,
    ),
    "t5": Component(f"{_M}.t5:T5Encoder", f"{_M}.t5:T5Config", "text_encoder_2", f"{_C}.text_encoders:load_t5_encoder"),
    "clip": Component(
        f"{_M}.clip:CLIPTextModel", f"{_M}.clip:CLIPTextConfig", "text_encoder", f"{_C}.text_encoders:load_clip_text_model"
    ),
    # Qwen3 (Z-Image, FLUX.2 klein): every Linear of the decoder layers; the token embedding (an
    # nn.Embedding, 10% of Qwen3-4B) and the RMSNorm scales stay as they are
    "qwen3": Component(
        f"{_M}.qwen3:Qwen3Model", f"{_M}.qwen3:Qwen3Config", "text_encoder", f"{_C}.qwen3:load_qwen3"
    ),
    "vae": Component(f"{_M}.vae:AutoencoderKL", f"{_M}.vae:VAEConfig", "vae", f"{_C}.vae:load_vae", quantize=False),
    # Z-Image's transformer: kept in full precision are the patch embedding and the final layer
    # (their errors land on the prediction directly), the timestep MLP (its output modulates every
    # block) and the caption embedder (every text token passes it): 12 M of 6.15 B parameters,
    # 0.2%. The learned pad tokens are no Linears, so never quantized.
    "zimage_transformer": Component(
        f"{_M}.zimage:ZImageTransformer", f"{_M}.zimage:ZImageConfig", "transformer",
        f"{_C}.zimage:load_zimage_transformer",
        keep=("x_embedder", "final_layer.*", "t_embedder.*", "cap_embedder.*"),
    ),
    # SD 1.5's U-Net: its Linears (attention, GEGLU, projections, per-resnet time projections) are
    # quantized; its convolutions are no Linears and stay, and so does the timestep MLP.
    "unet": Component(
        f"{_M}.unet:UNet2DConditionModel", f"{_M}.unet:UNetConfig", "unet", f"{_C}.unet:load_unet",
        keep=("time_embedding.*",),
    ),
    # DiT (facebook/DiT-XL-2-*): the patch embedding, the timestep/class embedders and the final
    # layer stay in full precision, as the MM-DiT's boundary layers do (0.9% of DiT-XL/2, biases included)
    "dit": Component(
        f"{_M}.dit:DiT", f"{_M}.dit:DiTConfig", "transformer", f"{_C}.dit:load_dit",
        keep=("x_embedder", "t_embedder.*", "y_embedder", "y_embedder.*", "txt_in", "final_layer.*"),
    ),
}


def _import(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


# ---- which layers are quantized -------------------------------------------------------------------


def quantizable(component: str, path: str, module: nn.Module, group_size: int) -> bool:
    """The rule above, for one layer of one component (the class_predicate of nn.quantize)."""
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
        _check_quantization(self.bits, self.group_size, self.modulation_bits)

    def __str__(self) -> str:
        mod = f", adaLN modulation {self.modulation_bits}-bit" if self.modulation_bits not in (None, self.bits) else ""
        return f"{self.bits}-bit{mod}"


def quantize_component(component: str, model: nn.Module, bits: "int | Quantization", group_size: int = 64,
                       modulation_bits: int | None = None) -> list[str]:
    """Quantize `model` in place by the rule (e.g. hub weights at load time); returns the layers.
    `bits` may be a Quantization, which then carries the group size and modulation bits."""
    if isinstance(bits, Quantization):
        bits, group_size, modulation_bits = bits.bits, bits.group_size, bits.modulation_bits
    _check_quantization(bits, group_size, modulation_bits)
    layers = quantizable_layers(component, model, group_size)
    _quantize_layers(model, layers, layer_bits(component, layers, bits, modulation_bits), bits, group_size)
    return layers


def _quantize_layers(model: nn.Module, layers, per_layer: dict[str, int], bits: int, group_size: int):
    chosen = set(layers)
    nn.quantize(model, group_size, bits, class_predicate=lambda p, m: p in chosen and dict(
        group_size=group_size, bits=per_layer.get(p, bits), mode="affine"))


def _check_quantization(bits, group_size, modulation_bits=None):
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {BITS}, got {bits}")
    if modulation_bits is not None and modulation_bits not in BITS:
        raise ValueError(f"modulation bits must be one of {BITS}, got {modulation_bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")


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
        _check_quantization(bits, group_size, modulation_bits)
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


_SAFETENSORS_DTYPES = {
    mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.int32: "I32",
    mx.uint8: "U8", mx.int8: "I8", mx.int64: "I64", mx.uint16: "U16", mx.int16: "I16", mx.bool_: "BOOL",
}


def safetensors_header(tensors: dict[str, mx.array], metadata: dict[str, str] | None = None) -> bytes:
    """The header of a safetensors file holding `tensors` in sorted order: an 8-byte length, then
    json padded to 8 bytes. It needs only shapes and dtypes: a lazy model's file size is
    len(header) + the tensors' nbytes, known without computing anything."""
    header, offset = {}, 0
    for k in sorted(tensors):
        v = tensors[k]
        header[k] = {"dtype": _SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def write_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str] | None = None) -> dict:
    """Write a safetensors file one tensor at a time, emptying `tensors` as it goes: each lazy
    array is evaluated, written and dropped, so peak memory is one tensor (plus whatever the
    caller still holds). Returns the file's size and sha256."""
    head = safetensors_header(tensors, metadata)
    digest = hashlib.sha256(head)
    with open(path, "wb") as f:
        f.write(head)
        for k in sorted(tensors):
            v = mx.contiguous(tensors.pop(k))
            mx.eval(v)
            data = memoryview(v).cast("B")
            f.write(data)
            digest.update(data)
            del v, data
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _file_record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# ---- converting a diffusers-layout folder ---------------------------------------------------------


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
    """Convert a folder laid out like a hub repo (the components its family reads, registry.py),
    or re-save an unquantized converted folder (e.g. to quantize it), into our format at `output`."""
    from ..hub import family_of_folder, hub_source

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
            name: (lambda spec=spec: _import(spec.loader)(source / spec.source_folder))
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


# ---- loading --------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MODEL_JSON
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertedModelError(f"{folder} is not a converted model folder: no {MODEL_JSON}") from None
    except (OSError, ValueError) as e:
        raise ConvertedModelError(f"{path} is unreadable: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ConvertedModelError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return manifest


def check_files(folder: str | Path, names: list[str] | None = None, verify: bool = False):
    """Every file model.json lists (or only `names`) is present with its recorded size, and with
    `verify` its recorded sha256. Raises ConvertedModelError naming the file."""
    folder = Path(folder)
    files = read_manifest(folder)["files"]
    for name in names if names is not None else sorted(files):
        path, want = folder / name, files[name]
        if not path.is_file():
            raise ConvertedModelError(f"{path} is missing (listed in {MODEL_JSON}): convert again")
        size = path.stat().st_size
        if size != want["size"]:
            raise ConvertedModelError(
                f"{path} is {size:,} bytes, {MODEL_JSON} records {want['size']:,}: "
                f"the file is {'truncated' if size < want['size'] else 'damaged'}; convert again"
            )
        if verify and _sha256(path) != want["sha256"]:
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

    config_cls = _import(spec.config)
    model = _import(spec.model)(_config_from_dict(config_cls, entry["config"]))
    check_dtype(model, dtype or DTYPES.get(manifest.get("dtype") or ""))
    quant = manifest["quantization"]
    if entry["quantized_layers"]:
        _quantize_layers(model, entry["quantized_layers"], entry.get("layer_bits", {}), quant["bits"], quant["group_size"])
    path = folder / entry["file"]
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
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


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
