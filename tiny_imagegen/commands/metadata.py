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

# PNG key -> (generate flag, type): the parameters `--config-from-metadata` takes back
REPLAYED = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "model": ("model", str),
    "seed": ("seed", int), "steps": ("steps", int), "guidance": ("guidance", float),
    "true_cfg": ("true_cfg", float), "width": ("width", int), "height": ("height", int),
    "quantization": ("quantize", lambda v: None if v == "none" else int(v.split("-")[0])),
    "modulation_bits": ("modulation_bits", int),
    "dtype": ("dtype", str), "strength": ("strength", float), "image": ("image", str),
    "loras": ("lora", json.loads), "cache": ("cache", str),
}


def save_png(image, path: Path, metadata: dict) -> None:
    """Write to a temporary file in the same folder, then rename: never a partial PNG."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value) if isinstance(value, list) else str(value))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
    """generate's arguments stored in an image: flag name -> typed value."""
    out = {}
    for key, value in read_parameters(path).items():
        if key in REPLAYED:
            flag, parse = REPLAYED[key]
            out[flag] = parse(value)
    return out


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
