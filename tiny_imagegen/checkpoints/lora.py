"""LoRA files as they are shared for FLUX.1 (and SD3.5), mapped onto our transformer (and its CLIP encoder).

| format | a key of it | scale s |
|---|---|---|
| diffusers / PEFT | `transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight` | lora_alpha / r (file metadata or `.alpha`), else 1 |
| kohya (sd-scripts) | `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up`, `.alpha` | alpha / rank |
| ComfyUI | `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` (kohya on dotted names) | alpha / rank |
| BFL names | `double_blocks.0.img_attn.qkv.lora_A.weight` | alpha / rank, else 1 |
| XLabs | `double_blocks.0.processor.qkv_lora1.down.weight` | 1 |

Every format names the layers of one base checkpoint layout, so its key table is that layout's
table (checkpoints/flux.py, text_encoders.py) read forwards: diffusers/PEFT in the DIFFUSERS names,
kohya/ComfyUI/BFL in the original BFL names (kohya with dots as underscores), XLabs in the names of
its attention processors (XLABS below). A LoRA on one piece of our fused projections (diffusers'
to_q, to_k, to_v, proj_mlp) updates only those rows of the fused weight: a block-structured LoRA.
A LoRA on diffusers' norm_out.linear has its B rows swapped as the base weight's (scale, shift)
halves are. The update of one layer is W' = W + s · w · B A, with w the user's weight.

SD3.5 (an SD3Transformer): diffusers/PEFT in its diffusers names, kohya (sd-scripts), ComfyUI and
lora_A/B files in the names of Stability's single file (`lora_unet_joint_blocks_0_x_block_attn_qkv`),
through checkpoints/sd3.py's tables; their text-encoder parts are skipped.
Qwen-Image: diffusers / PEFT files (`transformer.transformer_blocks.0.attn.to_q.lora_A.weight`,
as QwenImagePipeline.save_lora_weights writes them), read through its diffusers key table
(checkpoints/qwen_image.py); its other community formats are not read.

T5 parts (`lora_te2_`, `text_encoders.t5xxl.`, `text_encoder_2.`) are skipped with a warning, as
diffusers does; anything else that is not a LoRA tensor of a layer we have is named in one error.
"""

import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..layers.lora import LoRALinear, Update, apply_updates, get_layer, linear_shape
from .flux import BFL, DIFFUSERS
from .qwen_image import DIFFUSERS as QWEN_IMAGE_DIFFUSERS
from .lora_specs import lora_metadata, parse_lora_spec  # noqa: F401  (the names callers import from here)
from .mapping import CheckpointError, source_keys, swap_halves
from .safetensors_io import file_sha256
from .text_encoders import CLIP_HUB, CLIP_TRANSFORMERS5

FORMATS = ("diffusers", "kohya", "bfl", "xlabs")
# the tensor names of one layer's adapter in each format: (A, B, alpha)
SUFFIXES = {
    "diffusers": ("lora_A.weight", "lora_B.weight", "alpha"),
    "kohya": ("lora_down.weight", "lora_up.weight", "alpha"),
    "bfl": ("lora_A.weight", "lora_B.weight", "alpha"),
    "xlabs": ("down.weight", "up.weight", None),
}
# XLabs' LoRA attention processors (x-flux) on our modules, as diffusers' converter reads them
XLABS = {
    "double_blocks.{i}.processor.qkv_lora1": "double_blocks.{i}.img_attn.qkv",
    "double_blocks.{i}.processor.qkv_lora2": "double_blocks.{i}.txt_attn.qkv",
    "double_blocks.{i}.processor.proj_lora1": "double_blocks.{i}.img_attn.proj",
    "double_blocks.{i}.processor.proj_lora2": "double_blocks.{i}.txt_attn.proj",
    "single_blocks.{i}.processor.qkv_lora": "single_blocks.{i}.linear1",  # q, k, v rows only
    "single_blocks.{i}.processor.proj_lora": "single_blocks.{i}.linear2",
}
T5_PREFIXES = ("lora_te2_", "text_encoders.t5xxl.", "text_encoder_2.")
CLIP_PREFIXES = ("lora_te1_", "lora_te_", "text_encoders.clip_l.", "text_encoder.")


class LoRAMismatch(CheckpointError):
    """A LoRA file that does not fit the model: one line (the count and the first keys), and
    `details`, every key and problem, for whoever wants them all (generate --verbose)."""

    def __init__(self, message: str, details: list[str]):
        super().__init__(message)
        self.details = details


@dataclass(frozen=True)
class Target:
    """Where one adapter of the file goes: rows [start, stop) of our layer `module` of `component`."""

    component: str  # "transformer" or "clip"
    module: str
    start: int
    stop: int
    swap: bool = False  # B's row halves swapped (diffusers' norm_out: (scale, shift))


# ---- reading a file ------------------------------------------------------------------------------


def read_lora(path: str | Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such LoRA file: {path}")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read the LoRA file {path}: {e}") from None
    return tensors, metadata or {}


def detect_format(keys) -> str:
    keys = list(keys)
    if any(".processor." in k for k in keys):
        return "xlabs"
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya"
    if any(k.endswith(".lora_A.weight") for k in keys):
        bfl = ("double_blocks.", "single_blocks.", "joint_blocks.", "diffusion_model.", "final_layer.", "img_in.", "txt_in.")
        return "bfl" if any(k.startswith(bfl) for k in keys) else "diffusers"
    raise CheckpointError(f"not a LoRA file of a known format ({', '.join(FORMATS)}): keys such as {keys[:3]}")


def _normalise(fmt: str, key: str) -> str:
    """ComfyUI's dotted kohya names -> kohya's; its `diffusion_model.` prefix off BFL names."""
    if fmt == "kohya":
        for prefix, kohya in (("diffusion_model.", "lora_unet_"), ("text_encoders.clip_l.transformer.", "lora_te1_")):
            if key.startswith(prefix):
                module, suffix = _split_suffix(key, SUFFIXES["kohya"])
                return kohya + module[len(prefix):].replace(".", "_") + "." + suffix if module else key
        return key.replace("lora_te_", "lora_te1_", 1) if key.startswith("lora_te_") else key
    if fmt in ("bfl", "xlabs"):
        return key.removeprefix("diffusion_model.")
    return key


def _split_suffix(key: str, suffixes) -> tuple[str | None, str | None]:
    for suffix in suffixes:
        if suffix and key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None, None


# ---- the key tables: their layer name -> Target ----------------------------------------------------


def _linears(model: nn.Module):
    for path, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            yield path, layer.base
        elif isinstance(layer, (nn.Linear, nn.QuantizedLinear)) and not path.endswith(".base"):
            yield path, layer


def _slot_rows(j: int, n: int, out_features: int, in_features: int) -> tuple[int, int]:
    """Rows of piece j of a fused projection of n pieces. In FLUX's fused layers (qkv; linear1 =
    [q; k; v; mlp_in]) every piece but the last is q, k or v: `hidden` = in_features rows each."""
    start = j * in_features
    return start, (out_features if j == n - 1 else start + in_features)


def key_tables(transformer: nn.Module):
    """(the diffusers table, the original layout's table) of a transformer: FLUX's, SD3's, or
    Qwen-Image's (whose community formats are not read: no original table)."""
    if type(transformer).__name__ == "SD3Transformer":
        from . import sd3

        return sd3.DIFFUSERS, sd3.STABILITY_BARE
    if type(transformer).__name__ == "QwenImageTransformer":
        return QWEN_IMAGE_DIFFUSERS, None
    return DIFFUSERS, BFL


def layer_names(fmt: str, components: dict[str, nn.Module]) -> dict[str, Target]:
    """The layer names a file of format `fmt` uses, for the layers of our `components`."""
    names = {}
    transformer, clip = components.get("transformer"), components.get("clip")
    diffusers_table, original_table = key_tables(transformer)
    if original_table is None and fmt != "diffusers":  # Qwen-Image
        raise CheckpointError(f"a {fmt}-format LoRA for Qwen-Image: only the diffusers / PEFT format is read "
                              "(transformer.transformer_blocks.N.attn.to_q.lora_A.weight, ...)")
    for path, layer in _linears(transformer) if transformer is not None else ():
        out_features, in_features = linear_shape(layer)
        if fmt == "xlabs":
            continue
        keys, transform = source_keys(diffusers_table if fmt == "diffusers" else original_table, path + ".weight")
        for j, key in enumerate(keys):
            their = key.removesuffix(".weight")
            their = {"diffusers": "transformer." + their, "kohya": "lora_unet_" + their.replace(".", "_")}.get(fmt, their)
            names[their] = Target("transformer", path, *_slot_rows(j, len(keys), out_features, in_features),
                                  swap=transform is swap_halves)
    if fmt == "xlabs" and hasattr(transformer, "single_blocks"):
        D = transformer.config.hidden_size
        for n, blocks in (("double", transformer.double_blocks), ("single", transformer.single_blocks)):
            for i in range(len(blocks)):
                for their, ours in XLABS.items():
                    if their.startswith(n):
                        module = ours.format(i=i)
                        out_features = linear_shape(get_layer(transformer, module))[0]
                        stop = 3 * D if module.endswith("linear1") else out_features
                        names[their.format(i=i)] = Target("transformer", module, 0, stop)
    for path, layer in _linears(clip) if clip is not None and fmt in ("diffusers", "kohya") else ():
        out_features, _ = linear_shape(layer)
        for table in (CLIP_HUB, CLIP_TRANSFORMERS5):  # with or without transformers' text_model. level
            (key,), _ = source_keys(table, path + ".weight")
            their = key.removesuffix(".weight")
            their = "text_encoder." + their if fmt == "diffusers" else "lora_te1_" + their.replace(".", "_")
            names[their] = Target("clip", path, 0, out_features)
    return names


# ---- a file -> updates per layer -------------------------------------------------------------------


def lora_updates(tensors: dict[str, mx.array], metadata: dict[str, str], components: dict[str, nn.Module],
                 weight: float = 1.0, name: str = "LoRA", skip_clip: bool = False):
    """-> (format, {(component, our layer): [Update]}, {our parameter: tensor it is replaced by}).
    Checks every key first; one error names every unknown, incomplete or mis-shaped one.

    Replaced parameters: BFL's control LoRAs also carry the QK-norm scales, which replace ours
    (diffusers does the same); the user's weight does not apply to them. `skip_clip`: leave out
    the CLIP parts (e.g. to adapt a transformer alone); otherwise they need a "clip" component."""
    fmt = detect_format(tensors)
    a_suffix, b_suffix, alpha_suffix = SUFFIXES[fmt]
    groups, unknown, skipped, replaced, orphans = defaultdict(dict), [], [], {}, 0
    ours = dict(tree_flatten(components["transformer"].parameters())) if "transformer" in components else {}
    for key, value in tensors.items():
        if key.startswith(T5_PREFIXES) or (skip_clip and key.startswith(CLIP_PREFIXES)):
            skipped.append(key)
            continue
        if "clip" not in components and key.startswith(CLIP_PREFIXES):
            orphans += 1
            continue
        key = _normalise(fmt, key)
        if fmt == "bfl" and key.endswith(("query_norm.scale", "key_norm.scale")) and key in ours:
            if value.shape != ours[key].shape:
                unknown.append(f"{key} {tuple(value.shape)} (ours {tuple(ours[key].shape)})")
            replaced[key] = value
            continue
        module, suffix = _split_suffix(key, SUFFIXES[fmt])
        if module is None:
            unknown.append(f"{key} {tuple(value.shape)}")
        else:
            groups[module][suffix] = value
    if skipped:
        print(f"{name}: skipping {len(skipped)} text-encoder tensors ({', '.join(sorted({k.split('.')[0][:16] for k in skipped}))}; "
              "T5 parts are not supported, as in diffusers)", file=sys.stderr)
    names = layer_names(fmt, components)
    scales = _metadata_scales(metadata, name) if fmt == "diffusers" else None
    updates, problems = defaultdict(list), []
    for module, parts in groups.items():
        target = names.get(module)
        if target is None:
            unknown += [f"{module}.{s}" for s in parts]
            continue
        if a_suffix not in parts or b_suffix not in parts:
            problems.append(f"{module}: needs both {a_suffix} and {b_suffix}, has {sorted(parts)}")
            continue
        a, b = parts[a_suffix], parts[b_suffix]
        layer = get_layer(components[target.component], target.module)
        in_features = linear_shape(layer)[1]
        rank = a.shape[0] if a.ndim else 0
        if rank < 1:
            problems.append(f"{module}: rank 0 (A has shape {tuple(a.shape)})")
            continue
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape != (target.stop - target.start, rank):
            problems.append(f"{module}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit rows {target.start}:"
                            f"{target.stop} of our {target.module} ({in_features} inputs)")
            continue
        if alpha_suffix in parts:
            alpha = parts[alpha_suffix]
            if alpha.size != 1 or not math.isfinite(alpha.item()):
                problems.append(f"{module}.{alpha_suffix}: not one finite number (shape {tuple(alpha.shape)})")
                continue
            scale = alpha.item() / rank
        elif scales is not None:
            scale = scales(target.component, module.split(".", 1)[1], rank)
        else:
            scale = 1.0
        if target.swap:
            b = swap_halves([b])
        updates[(target.component, target.module)].append(Update(a, b, target.start, scale * weight))
    if orphans:
        problems.append(f"{orphans} CLIP text-encoder tensors, but no CLIP model was given "
                        "(pass skip_clip=True to adapt the transformer alone)")
    if unknown or problems:  # one line: the counts and the first few; `details` holds them all
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown key(s): {', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}")
        if problems:
            parts.append(f"{len(problems)} problem(s): {'; '.join(problems[:2])}{'; ...' if len(problems) > 2 else ''}")
        details = [f"{name}: unknown key {k}" for k in unknown] + [f"{name}: {p}" for p in problems]
        raise LoRAMismatch(f"{name} ({fmt} format) does not fit this model: {'; '.join(parts)}"
                           f"{' (--verbose lists them all)' if len(details) > 4 else ''}", details)
    return fmt, dict(updates), replaced


def _metadata_scales(metadata: dict[str, str], name: str = "LoRA"):
    """diffusers' `lora_adapter_metadata` (the PEFT LoraConfig per component): lora_alpha / r, with
    PEFT's per-module rank_pattern / alpha_pattern (a pattern matches a name's dotted tail) and
    rsLoRA's alpha / sqrt(r). None when the file has none (PEFT's convention then: s = 1).
    Metadata that is not a JSON object, a rank that is not a positive integer or an alpha that is
    not a finite number is a CheckpointError naming the file `name`."""
    if "lora_adapter_metadata" not in metadata:
        return None
    try:
        meta = json.loads(metadata["lora_adapter_metadata"])
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{name}: its lora_adapter_metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{name}: its lora_adapter_metadata is not a JSON object")

    def number(key: str, value, rank: bool):
        ok = isinstance(value, int) and value >= 1 if rank else (
            isinstance(value, (int, float)) and math.isfinite(value))
        if isinstance(value, bool) or not ok:
            raise CheckpointError(f"{name}: lora_adapter_metadata {key} is {value!r}, not "
                                  f"{'a positive integer' if rank else 'a finite number'}")
        return value

    def scale(component: str, module: str, rank: int) -> float:
        prefix = {"transformer": "transformer.", "clip": "text_encoder."}[component]
        cfg = {k.removeprefix(prefix): v for k, v in meta.items() if k.startswith(prefix)}
        if "lora_alpha" not in cfg:
            return 1.0
        patterns = [cfg.get(k) or {} for k in ("rank_pattern", "alpha_pattern")]
        if not all(isinstance(p, dict) for p in patterns):
            raise CheckpointError(f"{name}: lora_adapter_metadata rank_pattern / alpha_pattern is not an object")
        r = number(f"{prefix}r", _pattern(patterns[0], module, cfg.get("r", rank)), rank=True)
        alpha = number(f"{prefix}lora_alpha", _pattern(patterns[1], module, cfg["lora_alpha"]), rank=False)
        return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)

    return scale


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        try:
            if re.fullmatch(rf"(.*\.)?({key})", module):
                return value
        except re.error as e:
            raise CheckpointError(f"lora_adapter_metadata pattern {key!r} is not a regular expression ({e})") from None
    return default


# ---- the entry point ---------------------------------------------------------------------------------


def apply_loras(components: dict[str, nn.Module] | nn.Module, loras, merge: bool | None = None,
                skip_clip: bool = False, only: tuple[str, ...] | None = None, resolve=Path) -> list[dict]:
    """Apply LoRA files to a transformer (or {"transformer": ..., "clip": ...}) in place.

    loras: [(path, weight), ...]; `resolve` turns a name into a local file (the pipeline passes
    registry.hub.resolve_file, so a name may be a hub file `org/name/file.safetensors`). All files are read and checked before any layer changes. Returns one record
    per file (name, weight, format, sha256, how many layers merged / branched) for the metadata.
    `only`: change these components alone (e.g. ("clip",) for a re-loaded text encoder)."""
    if isinstance(components, nn.Module):
        components = {"transformer": components}
    components = {k: v for k, v in components.items() if v is not None}
    records, all_updates, all_replaced = [], defaultdict(list), {}
    for source, weight in loras:
        path = resolve(str(source))
        tensors, metadata = read_lora(path)
        fmt, updates, replaced = lora_updates(tensors, metadata, components, weight, str(source), skip_clip)
        for layer, ups in updates.items():
            all_updates[layer] += ups
        all_replaced.update(replaced)
        records.append({"name": str(source), "weight": weight, "format": fmt, "sha256": file_sha256(path),
                        "layers": len(updates)})
    if only is not None:
        all_updates = {k: v for k, v in all_updates.items() if k[0] in only}
        all_replaced = all_replaced if "transformer" in only else {}
    counts = apply_updates(components, dict(all_updates), merge)
    if all_replaced:
        dtype = {k: v.dtype for k, v in tree_flatten(components["transformer"].parameters())}
        components["transformer"].update(tree_unflatten([(k, v.astype(dtype[k])) for k, v in all_replaced.items()]))
    for record in records:
        record["applied"] = "merged" if not counts["branch"] else ("branch" if not counts["merged"] else "mixed")
    return records
