"""The run's inputs, read and checked before any model is loaded (the `generate` command).

The prompts with their seeds (--prompt, --prompt-file, --class-label), the image sizes, the output
paths (a pattern per image, never an existing file without --overwrite, the folder really
writable) and the init image. Each problem is one `UsageError` naming the flag and the value, so
the command can print one line and exit 2 instead of failing after minutes of loading.
"""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .validation import check_prompt_entry

DEFAULT_MODEL = "tiny-shapes"  # shipped with the package: works offline, straight after install
DEFAULT_PROMPTS = {DEFAULT_MODEL: "a red circle"}  # the README's first example, a combination seen in training
MAX_PROMPT_FILE = 64 * 2**20  # bytes: a million prompts of 64 characters


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


@dataclass
class Job:
    """One prompt of the run: its images' seeds and size."""

    prompt: str
    seeds: list[int]
    negative_prompt: str
    width: int | None
    height: int | None
    steps: int | None
    guidance: float | None


def read_jobs(args) -> list[Job]:
    """The prompts of the run (--prompt or --prompt-file) with their seeds, checked."""
    if args.n_images < 1:
        raise UsageError(f"--n-images must be at least 1, got {args.n_images}")
    if args.seed and len(args.seed) > 1 and args.n_images not in (1, len(args.seed)):
        raise UsageError(f"{len(args.seed)} --seed values and --n-images {args.n_images}: give one or the other")
    first = args.seed[0] if args.seed else int.from_bytes(os.urandom(4), "little") % 2**31
    seeds = list(args.seed) if args.seed and len(args.seed) > 1 else [first + i for i in range(args.n_images)]
    base = dict(negative_prompt=args.negative_prompt, width=args.width, height=args.height, steps=args.steps,
                guidance=args.guidance)
    if args.class_label:
        if args.prompt is not None or args.prompt_file is not None:
            raise UsageError("give --class-label or --prompt / --prompt-file, not both")
        return [Job(str(label), seeds, **base) for label in args.class_label]
    if args.prompt_file is None:
        prompt = args.prompt if args.prompt is not None else DEFAULT_PROMPTS.get(args.model)
        if prompt is None or not prompt.strip():
            raise UsageError("--prompt is empty: say what to draw")
        return [Job(prompt, seeds, **base)]
    if args.prompt is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    try:
        if args.prompt_file.is_dir():
            raise UsageError(f"--prompt-file {args.prompt_file} is a folder, not a file of prompts")
        data = args.prompt_file.read_bytes()
    except OSError as e:
        raise UsageError(f"--prompt-file {args.prompt_file}: {e.strerror}") from None
    if len(data) > MAX_PROMPT_FILE:
        raise UsageError(f"--prompt-file {args.prompt_file} is {len(data):,} bytes, more than {MAX_PROMPT_FILE:,}")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsageError(f"--prompt-file {args.prompt_file} line {line}: not UTF-8 text "
                         f"(byte {data[e.start]:#04x}); save it as UTF-8") from None
    jobs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            jobs.append(Job(line.strip(), seeds, **base))
            continue
        try:
            entry = check_prompt_entry(json.loads(line), args.n_images)
        except (ValueError, RecursionError) as e:  # json's errors and ValidationError are ValueErrors
            raise UsageError(f"--prompt-file {args.prompt_file} line {n}: {str(e).splitlines()[0]}") from None
        s = entry.get("seed")
        job_seeds = seeds if s is None else [s + i for i in range(args.n_images)]
        jobs.append(Job(entry["prompt"], job_seeds, **{k: entry.get(k, v) for k, v in base.items()}))
    if not jobs:
        raise UsageError(f"--prompt-file {args.prompt_file} holds no prompt")
    return jobs


def check_size(side: str, value: int | None, max_side: int, where: str = "") -> None:
    if value is not None and (value % 16 or not 16 <= value <= max_side):
        raise UsageError(f"{where}--{side} {value}: must be a multiple of 16 between 16 and {max_side} "
                         f"(not rounded, so that the image is the size asked for)")


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
        if path.is_dir():
            raise UsageError(f"--output {path} is a folder: name a .png file (in it, e.g. {path / 'out.png'})")
        if path.exists() and not overwrite:
            raise UsageError(f"{path} exists: choose another --output or pass --overwrite")
        check_writable(path.parent if str(path.parent) else Path("."), f"cannot write {path}")
    return paths


def check_stepwise_folder(folder: Path) -> None:
    """--stepwise-output DIR: created if missing; a file of that name is refused, not overwritten."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--stepwise-output {folder} is a file: name a folder for the per-step images")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--stepwise-output {folder}: cannot create the folder ({e.strerror})") from None
    check_writable(folder, f"--stepwise-output {folder}")


def check_writable(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise UsageError(f"{what}: folder {folder} does not exist")
    try:  # really create a file there: permissions, read-only mounts, quotas
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"{what}: folder {folder} is not writable ({e.strerror})") from None


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
