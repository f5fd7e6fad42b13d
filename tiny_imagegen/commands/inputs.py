"""The run's inputs, read and checked before any model is loaded (the `generate` command).

The prompts with their seeds (--prompt, --prompt-file, --class-label), the image sizes, the output
paths (a pattern per image, never an existing file without --overwrite, the folder really
writable) and the input images: the init image (--image), the mask (--mask), the references
(--ref), and whether the model's family takes them (asked of its pipeline class, no weights read). Each problem is one `UsageError` naming the flag and the value, so
the command can print one line and exit 2 instead of failing after minutes of loading.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
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


def check_output_folder(folder: Path, flag: str = "--stepwise-output") -> None:
    """--stepwise-output / --attention-maps DIR: created if missing; a file of that name is refused,
    not overwritten."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file: name a folder for the images it writes")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot create the folder ({e.strerror})") from None
    check_writable(folder, f"{flag} {folder}")


def check_writable(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise UsageError(f"{what}: folder {folder} does not exist")
    try:  # really create a file there: permissions, read-only mounts, quotas
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"{what}: folder {folder} is not writable ({e.strerror})") from None


def check_image(path: str | None, flag: str = "--image"):
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{flag} {path}: not a readable image ({e})") from None


@dataclass
class EditInputs:
    """The run's input images, read and checked: PIL images (None / [] when not given)."""

    image: object = None
    mask: object = None
    references: list = field(default_factory=list)
    notices: list = field(default_factory=list)


def read_edit_inputs(args, pipeline_class) -> EditInputs:
    """--image, --mask and --ref: readable, the mask greyscale, of the image's size, painting
    something, and taken by the model's family (`pipeline_class`: None when it is only known
    after download; the pipeline then refuses in the same words)."""
    from ..editing.images import MAX_REFERENCE_AREA, check_reference

    image, mask = check_image(args.image), check_image(args.mask, "--mask")
    refs = [check_image(r, "--ref") for r in args.ref or []]
    notices = []
    if pipeline_class is not None:
        problem = pipeline_class.refusal(image is not None, mask is not None, len(refs), args.model)
        if problem:
            raise UsageError(problem)
    if mask is not None:
        from ..editing import masks  # numpy: a prompt alone never loads it (0.075 s of the first image)

        if image is not None and mask.size != image.size:
            raise UsageError(f"--mask {args.mask} is {mask.size[0]}x{mask.size[1]} but --image {args.image} is "
                             f"{image.size[0]}x{image.size[1]}: draw the mask on the image, at its size")
        try:
            masks.check_mask(mask, f"--mask {args.mask}")
        except ValueError as e:
            raise UsageError(str(e)) from None
        painted = masks.pixel_mask(mask, *mask.size)
        if not painted.any():
            raise UsageError(f"--mask {args.mask} is all black: nothing to repaint (white = repaint, black = keep)")
        if painted.all():
            notices.append(f"--mask {args.mask} is all white: everything is repainted, as image-to-image at "
                           f"--strength {args.strength}")
    for path, ref in zip(args.ref or [], refs):
        try:
            check_reference(ref, f"--ref {path}")
        except ValueError as e:
            raise UsageError(str(e)) from None
        if ref.size[0] * ref.size[1] > MAX_REFERENCE_AREA:
            notices.append(f"--ref {path} is {ref.size[0]}x{ref.size[1]}: resized to about 1024x1024 pixels "
                           "(same aspect) before encoding, as the reference pipeline does")
    return EditInputs(image, mask, refs, notices)


def input_hashes(args) -> dict:
    """PNG metadata for the input images: their paths and sha256 (so a replay can check them)."""
    from ..checkpoints.safetensors_io import file_sha256

    out = {}
    if args.image:
        out.update(image=args.image, image_sha256=file_sha256(args.image))
    if args.mask:
        out.update(mask=args.mask, mask_sha256=file_sha256(args.mask))
    if args.ref:
        out.update(references=json.dumps(list(args.ref)),
                   references_sha256=json.dumps([file_sha256(r) for r in args.ref]))
    return out
