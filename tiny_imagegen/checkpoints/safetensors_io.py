"""Reading checkpoints from disk: one .safetensors file, or a folder of shards with its index json;
and writing one, a tensor at a time; a file's sha256 (converted folders, LoRAs, edit inputs).

`mx.load` maps safetensors lazily: nothing is read until an array is evaluated, so a 24 GB
checkpoint can be opened, checked against a key table and converted tensor by tensor.
"""

import hashlib
import json
import struct
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


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read 16 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def read_diffusers_component(path: str | Path, subfolder: str, class_name: str, parse, config=None):
    """A diffusers component -> (tensors, config). `path` is its folder (config.json and
    diffusion_pytorch_model shards) or a repo folder holding `subfolder/`; the config is `config`
    if given, else `parse` of the config.json, which must name `class_name` if it names a class.
    Every problem is a CheckpointError naming the folder or file."""
    path = Path(path)
    if path.is_dir() and (path / subfolder).is_dir():
        path = path / subfolder
    if not path.is_dir():
        raise CheckpointError(f"{path}: a {class_name} loads from a diffusers {subfolder}/ folder")
    if config is None:
        file = path / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{path} has no config.json: not a diffusers {subfolder}/ folder")
        try:
            values = json.loads(file.read_text())
            if values.get("_class_name", class_name) != class_name:
                raise ValueError(f"it holds a {values['_class_name']}, not a {class_name}")
            config = parse(values)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{file}: {e}") from None
    return read_checkpoint(path, prefix="diffusion_pytorch_model"), config


# ---- writing ---------------------------------------------------------------------------------------


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
