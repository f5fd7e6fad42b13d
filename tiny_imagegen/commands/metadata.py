"""Generation parameters in a PNG: written with every image, read back by `info` and
`--config-from-metadata`, so an image says how to make it again.

The parameters are PNG text chunks (iTXt), one per parameter, values as text. The image is written
to a temporary file beside the target and renamed into place, so an interrupted run never leaves
a half-written image.
"""

import json
import os
import tempfile
from pathlib import Path

# input images: generate flag -> (PNG key of the path(s), PNG key of the sha256(s))
INPUT_FILES = {"image": ("image", "image_sha256"), "mask": ("mask", "mask_sha256"),
               "ref": ("references", "references_sha256")}


def save_png(image, path: Path, metadata: dict, overwrite: bool = True) -> None:
    """Write to a temporary file in the same folder, then move it into place: never a partial PNG.

    Without `overwrite` the move is exclusive (a hard link, which fails if `path` exists): two runs
    that both found `path` free cannot replace one another's image; the second gets
    FileExistsError. The temporary file is removed on any failure, an interrupt or SIGTERM included
    (generate turns SIGTERM into an exception for this)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value) if isinstance(value, list) else str(value))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_exclusive(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _link_exclusive(tmp: str, path: Path) -> None:
    """Put `tmp` at `path` only if nothing is there, atomically (a file system without hard links:
    an exclusive create, then the rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # claim the name, then fill it
        os.replace(tmp, path)


def read_parameters(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG written by `generate`. Raises ValueError with one line if the
    file is not a readable PNG or carries no generation parameters."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if "prompt" not in text or "software" not in text:
        raise ValueError(f"{path} carries no generation parameters (not written by tiny_imagegen generate)")
    return text


def replay_arguments(path: str | Path) -> dict:
    """generate's arguments stored in an image: flag name -> typed value, each checked as the flag
    would be (validation.py); ValueError with one line naming the image and the key."""
    from .validation import ValidationError, replay_values

    try:
        return replay_values(read_parameters(path))
    except ValidationError as e:
        raise ValueError(f"{path}: {e}") from None


def check_inputs_unchanged(path: str | Path, skip: set[str] = frozenset()) -> None:
    """The input images a PNG was made from are still there, byte for byte (sha256): else one
    ValueError line, so that a replay never silently edits a different picture. `skip`: flags
    given anew on the command line (their files are not the stored ones)."""
    from ..checkpoints.safetensors_io import file_sha256

    params = read_parameters(path)
    for flag, (key, hash_key) in INPUT_FILES.items():
        if flag in skip or key not in params:
            continue
        files = json.loads(params[key]) if flag == "ref" else [params[key]]
        hashes = json.loads(params[hash_key]) if flag == "ref" else [params.get(hash_key)]
        for file, stored in zip(files, hashes):
            if not Path(file).is_file():
                raise ValueError(f"{path}: its --{flag} {file} is missing (sha256 {stored}): restore it or give "
                                 f"--{flag} anew")
            if stored is None:
                raise ValueError(f"{path}: no sha256 stored for its --{flag} {file}: give --{flag} anew to replay")
            if file_sha256(file) != stored:
                raise ValueError(f"{path}: its --{flag} {file} has changed since (sha256 {stored[:12]}... stored, "
                                 f"{file_sha256(file)[:12]}... now): give --{flag} anew to use it as it is")


def info_main(argv=None) -> int:
    """`tiny-imagegen info IMAGE.png...`: print the stored parameters."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Print the generation parameters stored in PNGs written by generate.")
    p.add_argument("images", nargs="*", help="PNG files")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--system", action="store_true", help="print this machine's MLX, device, BLAS and compile setting")
    args = p.parse_args(argv)
    if not args.images and not args.system:
        p.error("give PNG files, or --system")
    try:
        return _print_parameters(args)
    except BrokenPipeError:  # `info ... | head`: the reader has gone, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 0


def _print_parameters(args) -> int:
    import sys

    if args.system:
        from .system import system_lines

        print("\n".join(system_lines()))
    status = 0
    for path in args.images:
        try:
            params = read_parameters(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        if args.json:
            print(json.dumps({"file": path, **params}, ensure_ascii=False))
            continue
        print(path)
        for key, value in params.items():
            print(f"  {key:16s} {value}")
    return status
