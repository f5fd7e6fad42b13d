"""A converted folder's model.json, checked before anything is built from it: the folder is a sandbox.

A converted folder may come from anyone, so nothing in its model.json is trusted:

  - every file it names (a component's weights, a copied tokenizer file) resolves *inside* the
    folder, symbolic links followed: no `../x`, no absolute path, no link out of it;
  - every value has the type its reader expects (an int is an int, not "64" or 64.0 or true);
  - every config value lies within bounds, checked before any array is allocated, so that a head
    dimension, vocabulary, text length or step count of 10^9 is one line, not gigabytes and a
    MemoryError.

The bounds (CONFIG_BOUNDS, RECIPE_BOUNDS) are derived from the largest published model of each
family this code runs, with room to spare (about 4x, often more) so that a larger sibling still
loads: the largest value we know of is in the comment beside each. Components and their config
classes come from checkpoints/components.py; a field's type from its dataclass annotation.

Every problem is a `ManifestError` (a CheckpointError) of one line naming model.json and the field.
"""

import math
import typing
from functools import lru_cache
from pathlib import Path

from .components import COMPONENTS, import_ref
from .mapping import CheckpointError
from .quantize import BITS, GROUP_SIZES

MODEL_JSON = "model.json"
MAX_FILE_SIZE = 2**40  # 1 TiB: the largest single component we know of (FLUX.2 dev's 32 B transformer) is 64 GB

# field name -> (lowest, highest) for every int (and per element of a tuple of ints) in a component
# config; the largest published value beside each
CONFIG_BOUNDS = {
    "vocab_size": (1, 2**18),  # Qwen3 151,936; CLIP 49,408; T5 32,128
    "eos_token_id": (0, 2**18),
    "hidden_size": (1, 16384),  # Qwen3-8B 4096; CLIP-L 768
    "d_model": (1, 16384),  # T5-XXL 4096
    "dim": (1, 16384),  # Z-Image 3840
    "intermediate_size": (1, 65536),  # Qwen3-8B 12,288; CLIP-L 3072
    "d_ff": (1, 65536),  # T5-XXL 10,240
    "cap_feat_dim": (1, 65536),  # Z-Image 2560
    "context_dim": (1, 65536),  # FLUX.2 dev 15,360 (3 x Mistral 5120); FLUX.1 4096
    "vec_dim": (1, 16384),  # FLUX.1 768
    "cross_attention_dim": (1, 16384),  # SD 1.5 768; SDXL 2048
    "text_dim": (1, 65536),
    "num_hidden_layers": (0, 256),  # Qwen3-8B 36
    "num_layers": (0, 256),  # T5-XXL 24
    "depth": (0, 256),  # DiT-XL/2 28
    "depth_double": (0, 256),  # FLUX.1 19
    "depth_single": (0, 256),  # FLUX.2 dev 48; FLUX.1 38
    "n_layers": (0, 256),  # Z-Image 30
    "n_refiner_layers": (0, 256),  # Z-Image 2
    "num_heads": (1, 512),  # T5-XXL 64; FLUX.2 dev 48
    "num_attention_heads": (1, 512),  # Qwen3-8B 32
    "num_key_value_heads": (1, 512),  # Qwen3 8
    "n_heads": (1, 512),  # Z-Image 30
    "head_dim": (1, 1024),  # 128 everywhere we know; DiT-XL/2 72
    "d_kv": (1, 1024),  # T5 64
    "attention_heads": (1, 512),  # SD 1.5 8 per level
    "axes_dim": (0, 1024),  # FLUX.1 (16, 56, 56)
    "axes_dims": (0, 1024),  # Z-Image (32, 48, 48)
    "axes_lens": (1, 65536),  # Z-Image (1024, 512, 512): RoPE table rows
    "in_channels": (1, 4096),  # FLUX.2 128 (32 x 2 x 2)
    "out_channels": (1, 4096),
    "latent_channels": (1, 1024),  # FLUX.2 VAE 32
    "block_out_channels": (1, 16384),  # SD 1.5 U-Net 1280
    "layers_per_block": (0, 64),  # 2
    "transformer_layers_per_block": (0, 64),  # SDXL 10
    "norm_num_groups": (1, 1024),  # 32
    "max_position_embeddings": (1, 4096),  # CLIP 77
    "relative_attention_num_buckets": (1, 1024),  # T5 32
    "relative_attention_max_distance": (1, 65536),  # T5 128
    "patch_size": (1, 64),  # 2
    "sample_size": (1, 4096),  # SD 1.5 64 latents; DiT-XL/2-512 64
    "num_classes": (1, 2**20),  # ImageNet-1k 1000 (ImageNet-21k 21,841)
}
DEFAULT_INT_BOUNDS = (0, 65536)  # an int field not listed above (none today): still bounded
MAX_FLOAT = 1e9  # every float finite and at most this large (theta 10,000; t_scale 1000)
MAX_TUPLE = 64  # elements of a tuple field: block_out_channels 4, axes_dim 4; SD3.5's dual_attention_layers
# may name every one of its 38 blocks (Medium: 13, Large: none)
# how a converted model is sampled (model.json "pipeline"); registry.SamplingDefaults' fields
RECIPE_BOUNDS = {
    "steps": (1, 10_000),  # DiT 250, SD 1.5 50
    "text_length": (1, 4096),  # FLUX.1-dev, Z-Image, FLUX.2: 512 tokens (DiT, class labels: 0, see below)
    "width": (16, 4096),  # pipeline.MAX_SIDE
    "height": (16, 4096),
    "mag_ratios": (0.0, 100.0),  # float bounds are checked too: ratios of magnitudes, positive (~1)
    "mag_retention": (0.0, 1.0),  # the share of a run's first steps MagCache always computes
}
RECIPE_KEYS = {"family": str, "name": str, "text": str, "is_distilled": bool, "defaults": dict}
DEFAULTS_KEYS = {"steps": int, "guidance": float, "shift": (bool, float), "text_length": int, "width": int,
                 "height": int, "mag_ratios": tuple[float, ...] | None, "mag_retention": float}
NO_TEXT_FAMILIES = ("dit",)  # class-conditional: text_length 0, no text tokens at all
QUANTIZATION = {"bits": BITS, "group_size": GROUP_SIZES, "modulation_bits": BITS}
DTYPES = ("float32", "float16", "bfloat16")  # convert.DTYPES' names (convert.py imports this module)


class ManifestError(CheckpointError):
    """model.json is malformed, names a file outside its folder, or holds a value out of bounds."""


def inside(folder: str | Path, name) -> Path:
    """folder/name, refused unless it stays inside `folder` (symbolic links resolved)."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\0" in name:
        raise ManifestError(f"{folder / MODEL_JSON}: file name {name!r} is not a relative path inside the folder")
    path = Path(name)
    root = folder.resolve()
    if path.is_absolute() or ".." in path.parts or not (root / path).resolve().is_relative_to(root):
        raise ManifestError(f"{folder / MODEL_JSON}: file {name!r} is outside the model folder: refused")
    return folder / path


def check_manifest(folder: str | Path, manifest) -> dict:
    """Every field of a model.json read from `folder` (see the module docstring); returns it."""
    where = Path(folder) / MODEL_JSON
    fail = lambda field, what: ManifestError(f"{where}: {field} {what}")  # noqa: E731
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: not a JSON object")
    for key, kind in (("components", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise fail(f"'{key}'", "is missing or not an object")
    if not isinstance(manifest.get("source", {}), dict):
        raise fail("'source'", "is not an object")
    if manifest.get("dtype") is not None and manifest["dtype"] not in DTYPES:
        raise fail("'dtype'", f"{manifest['dtype']!r} is not one of {', '.join(DTYPES)}")
    _check_quantization(manifest.get("quantization"), fail)
    files = manifest["files"]
    for name, record in files.items():
        inside(folder, name)
        if not isinstance(record, dict):
            raise fail(f"files[{name!r}]", "is not an object")
        size = record.get("size")
        if not _is_int(size) or not 0 <= size <= MAX_FILE_SIZE:
            raise fail(f"files[{name!r}].size", f"{size!r} is not a size in bytes")
        if not isinstance(record.get("sha256"), str):
            raise fail(f"files[{name!r}].sha256", "is missing or not a string")
    if not manifest["components"]:
        raise fail("'components'", "is empty")
    for name, entry in manifest["components"].items():
        _check_component(folder, name, entry, files, fail)
    if "pipeline" in manifest:
        _check_recipe(manifest["pipeline"], fail)
    for copied in ("tokenizer", "tokenizer_2", "scheduler", "model_index.json"):
        if (Path(folder) / copied).exists() or (Path(folder) / copied).is_symlink():
            inside(folder, copied)
    return manifest


def _check_quantization(q, fail):
    if q is None:
        return
    if not isinstance(q, dict):
        raise fail("'quantization'", "is neither null nor an object")
    for key, allowed in QUANTIZATION.items():
        if (key in q or key != "modulation_bits") and q.get(key) not in allowed:
            raise fail(f"quantization.{key}", f"{q.get(key)!r} is not one of {allowed}")


def _check_component(folder, name, entry, files, fail):
    field = f"components[{name!r}]"
    if name not in COMPONENTS:
        raise fail(field, f"is not a component this code knows (known: {', '.join(sorted(COMPONENTS))})")
    if not isinstance(entry, dict):
        raise fail(field, "is not an object")
    file = entry.get("file")
    inside(folder, file)
    if file not in files:
        raise fail(f"{field}.file", f"{file!r} is not listed in 'files'")
    if not isinstance(entry.get("config"), dict):
        raise fail(f"{field}.config", "is missing or not an object")
    layers = entry.get("quantized_layers")
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise fail(f"{field}.quantized_layers", "is missing or not a list of layer names")
    bits = entry.get("layer_bits", {})
    if not isinstance(bits, dict) or not all(isinstance(k, str) and v in QUANTIZATION["bits"] for k, v in bits.items()):
        raise fail(f"{field}.layer_bits", "is not an object of layer -> 4 or 8")
    if "parameters" in entry and (not _is_int(entry["parameters"]) or entry["parameters"] < 0):
        raise fail(f"{field}.parameters", f"{entry['parameters']!r} is not a count")
    check_config(COMPONENTS[name].config, entry["config"], lambda f, what: fail(f"{field}.config.{f}", what))


def check_config(config_ref: str, values: dict, fail) -> None:
    """Each value of a component config: the type of its dataclass field, within CONFIG_BOUNDS."""
    hints = _hints(config_ref)
    for key, value in values.items():
        if key not in hints:
            continue  # an unknown field is named by the loader (convert.py _config_from_dict)
        _check_value(key, value, hints[key], CONFIG_BOUNDS.get(key, DEFAULT_INT_BOUNDS), fail)


@lru_cache(maxsize=None)
def _hints(config_ref: str) -> dict:
    return typing.get_type_hints(import_ref(config_ref))


def _check_value(key, value, hint, bounds, fail):
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not len(value) <= MAX_TUPLE:
            shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:40]}... ({len(value)} values)"
            raise fail(key, f"{shown} is not a list of at most {MAX_TUPLE} values")
        for v in value:
            _check_value(key, v, args[0], bounds, fail)
        return
    if hint is bool or (args and bool in args and isinstance(value, bool)):
        if not isinstance(value, bool):
            raise fail(key, f"{value!r} is not true or false")
    elif hint is int:
        lo, hi = bounds
        if not _is_int(value) or not lo <= value <= hi:
            raise fail(key, f"{value!r} is not an integer in {lo}..{hi}")
    elif hint is float or float in args:
        if not _is_number(value) or abs(value) > MAX_FLOAT:
            raise fail(key, f"{value!r} is not a finite number of at most {MAX_FLOAT:g}")
        lo, hi = bounds
        if isinstance(lo, float) and not lo <= value <= hi:  # bounds given as floats apply to floats
            raise fail(key, f"{value!r} is not a number in {lo:g}..{hi:g}")
    elif hint is str:
        if not isinstance(value, str) or len(value) > 256:
            raise fail(key, f"{value!r} is not a short string")


def _check_recipe(recipe, fail):
    if not isinstance(recipe, dict):
        raise fail("'pipeline'", "is not an object")
    for key, value in recipe.items():
        kind = RECIPE_KEYS.get(key)
        if kind is not None and (not isinstance(value, kind) or (kind is str and len(value) > 256)):
            raise fail(f"pipeline.{key}", f"{value!r} is not a {kind.__name__}")
    if "defaults" not in recipe:
        return
    defaults = recipe["defaults"]
    unknown = sorted(set(defaults) - set(DEFAULTS_KEYS))
    if unknown or "steps" not in defaults or "guidance" not in defaults:
        raise fail("pipeline.defaults", f"needs steps and guidance and takes only {', '.join(DEFAULTS_KEYS)}")
    for key, value in defaults.items():
        kind = DEFAULTS_KEYS[key]
        hint = bool | float if kind == (bool, float) else kind
        bounds = RECIPE_BOUNDS.get(key, DEFAULT_INT_BOUNDS)
        if key == "text_length" and recipe.get("family") in NO_TEXT_FAMILIES:
            bounds = (0, bounds[1])
        _check_value(key, value, hint, bounds,
                     lambda f, what: fail(f"pipeline.defaults.{f}", what))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
