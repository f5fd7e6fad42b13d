"""The `generate` command: prompt in, PNG out (examples/generate.py calls `main`).

Every check that can fail is made before any model is loaded: sizes, the output path, the init
image. The PNG is written to a temporary file beside the target and renamed into place, so an
interrupted run never leaves a half-written image, and an existing file is never overwritten
unless --overwrite says so.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from . import __version__

DEFAULT_MODEL = "tiny-shapes"  # shipped in weights/: works offline, straight after install
DEFAULT_PROMPTS = {"tiny-shapes": "a red circle"}  # the README's first example, a combination seen in training


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="generate.py", description="Generate images from a text prompt with a FLUX-style model in MLX.")
    p.add_argument("--prompt", help="what to draw (default: a demo prompt for the shipped model)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (classifier-free guidance)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="flux1-schnell, flux1-dev, tiny-shapes, a hub repo id, a local folder laid out like the "
                        "hub repo, or a folder written by examples/convert.py (default: %(default)s)")
    p.add_argument("--steps", type=int, help="denoising steps (default per model: schnell 4, dev 28)")
    p.add_argument("--guidance", type=float,
                   help="FLUX.1-dev: the distilled guidance input (default 3.5); other models: the "
                        "classifier-free guidance scale, > 1 runs a second pass with --negative-prompt")
    p.add_argument("--true-cfg", type=float, default=1.0,
                   help="guidance-distilled models: real classifier-free guidance on top (default off)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16 (default per model)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16 (default per model)")
    p.add_argument("--seed", type=int, help="the same seed gives the same image (default: random)")
    p.add_argument("--n-images", type=int, default=1, help="images per prompt; image i uses seed + i")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the transformer and T5 on load")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="compute dtype; auto: bfloat16 on GPUs, float32 on the CPU")
    p.add_argument("--image", help="init image for image-to-image")
    p.add_argument("--strength", type=float, default=0.75,
                   help="image-to-image: how much of the schedule to run, 0 < s <= 1 (default %(default)s)")
    p.add_argument("--output", default="out.png",
                   help="PNG path; with several images a pattern with {i} (index) and/or {seed} "
                        "(default: %(default)s, numbered out-0.png ... when several)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--vae-tiling", choices=("auto", "on", "off"), default="auto",
                   help="decode in overlapping tiles to bound memory; auto: above 768x768 pixels")
    p.add_argument("--keep-text-encoders", action="store_true", help="do not free T5/CLIP after encoding")
    p.add_argument("--verbose", "-v", action="store_true", help="print device, dtype, timings and peak memory")
    return p.parse_args(argv)


def output_paths(pattern: str, seeds: list[int], overwrite: bool) -> list[Path]:
    n = len(seeds)
    if n > 1 and "{" not in pattern:
        stem, suffix = os.path.splitext(pattern)
        pattern = f"{stem}-{{i}}{suffix or '.png'}"
    try:
        paths = [Path(pattern.format(i=i, seed=s)) for i, s in enumerate(seeds)]
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--output pattern {pattern!r}: only {{i}} and {{seed}} may be used ({e})") from None
    if len(set(paths)) != n:
        raise UsageError(f"--output {pattern!r} names the same file for several images: add {{i}} or {{seed}}")
    for path in paths:
        if path.suffix.lower() != ".png":
            raise UsageError(f"--output {path}: images are written as PNG, use a .png name")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} exists: choose another --output or pass --overwrite")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise UsageError(f"cannot write {path}: folder {folder} does not exist")
        try:  # really create a file there: permissions, read-only mounts, quotas
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UsageError(f"cannot write {path}: folder {folder} is not writable ({e.strerror})") from None
    return paths


def check_image(path: str | None):
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        return Image.open(path)
    except FileNotFoundError:
        raise UsageError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--image {path}: not a readable image ({e})") from None


def save_png(image, path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, then rename: never a partial PNG."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, str(value))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ProgressBar:
    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width

    def __call__(self, step: int, total: int, elapsed: float) -> None:
        """A bar redrawn in place on a terminal; a line per step in a log."""
        filled = self.width * step // total
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"denoising [{bar}] {step}/{total}  {elapsed / step:.2f} s/step, {elapsed:.1f} s"
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if step == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def run(args: argparse.Namespace) -> list[Path]:
    from .checkpoints.mapping import CheckpointError
    from .hub import ModelNotAvailable
    from .pipeline import MAX_SIDE, Pipeline

    prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPTS.get(args.model)
    if prompt is None or not prompt.strip():
        raise UsageError("--prompt is empty: say what to draw")
    if args.n_images < 1:
        raise UsageError(f"--n-images must be at least 1, got {args.n_images}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if not 0.0 < args.strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    for side in ("width", "height"):
        value = getattr(args, side)
        if value is not None and (value % 16 or not 16 <= value <= MAX_SIDE):
            raise UsageError(f"--{side} {value}: must be a multiple of 16 between 16 and {MAX_SIDE} "
                             f"(not rounded, so that the image is the size asked for)")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    seeds = [seed + i for i in range(args.n_images)]
    paths = output_paths(args.output, seeds, args.overwrite)
    init_image = check_image(args.image)
    dtype = None if args.dtype == "auto" else getattr(mx, args.dtype)

    start = time.perf_counter()
    try:
        pipe = Pipeline.from_pretrained(args.model, dtype=dtype, quantize=args.quantize,
                                        keep_text_encoders=args.keep_text_encoders)
    except (ValueError, FileNotFoundError, ModelNotAvailable) as e:  # CheckpointError is a ValueError
        raise UsageError(str(e)) from None
    width, height = args.width or pipe.defaults.width, args.height or pipe.defaults.height
    steps = args.steps or pipe.defaults.steps
    guidance = pipe.defaults.guidance if args.guidance is None else args.guidance
    try:
        pipe.check_size(width, height)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.verbose:
        print(f"model {pipe.name}: device {mx.default_device()}, dtype {pipe.dtype}, "
              f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    start = time.perf_counter()
    images = pipe.generate(prompt, width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                           n_images=args.n_images, negative_prompt=args.negative_prompt, true_cfg=args.true_cfg,
                           image=init_image, strength=args.strength, progress=ProgressBar(),
                           vae_tiling={"auto": None, "on": True, "off": False}[args.vae_tiling])
    metadata = {
        "prompt": prompt, "negative_prompt": args.negative_prompt, "steps": steps, "guidance": guidance,
        "true_cfg": args.true_cfg, "width": width, "height": height, "model": pipe.name,
        "quantization": f"{args.quantize}-bit" if args.quantize else "none", "dtype": str(pipe.dtype).split(".")[-1],
        "software": f"tiny_imagegen {__version__}",
    }
    if init_image is not None:
        metadata.update(image=args.image, strength=args.strength)
    for image, path, s in zip(images, paths, seeds):
        save_png(image, path, {**metadata, "seed": s})
        print(f"wrote {path}")
    if args.verbose:
        print(f"generated {len(images)} image(s) in {time.perf_counter() - start:.2f} s, "
              f"peak memory {mx.get_peak_memory() / 2**30:.2f} GiB", file=sys.stderr)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    return 0
