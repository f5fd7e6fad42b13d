"""A request's fields -> the `generate` command's arguments, checked before anything is queued.

The arguments start as the command's own defaults (its argparse parser with no flags), the
request's fields are typed and copied onto them, then `validate` runs the command's checks
(commands/rendering.py `check_inputs`: prompts, seeds, sizes, output paths). The server adds its
bounds (`Limits`: prompt length, images per request, side, steps) and what a remote caller must
not reach: a model is a registered name whose weights are already here (no download, no local
path), a LoRA a file name inside the server's --lora-dir, the output a name the server chooses
inside its output folder.

Every problem is a `RequestError` naming the field: a 400 with the OpenAI error shape.
"""

import math
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..commands.generate import build_parser
from ..commands.rendering import check_inputs
from ..commands.inputs import UsageError


class RequestError(Exception):
    """A bad request: `message` for the caller, `param` the field, `status` the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's flags set them)."""

    body_bytes: int = 1 << 20  # a JSON request body
    upload_bytes: int = 16 << 20  # a multipart body of POST /v1/images/edits (its image and mask)
    prompt_chars: int = 2000
    images: int = 4  # per request (OpenAI's n)
    side: int = 1024  # pixels, width and height
    steps: int = 100
    queue: int = 16  # jobs waiting (the running one not counted): more is a 429


# field -> (type, the generate argument it sets); the fields of POST /api/jobs
FIELDS = {
    "prompt": (str, "prompt"), "negative_prompt": (str, "negative_prompt"), "model": (str, "model"),
    "width": (int, "width"), "height": (int, "height"), "steps": (int, "steps"), "guidance": (float, "guidance"),
    "seed": (int, "seed"), "n": (int, "n_images"), "true_cfg": (float, "true_cfg"), "sampler": (str, "sampler"),
    "karras": (bool, "karras"), "cfg_channels": (int, "cfg_channels"), "shift": (float, "shift"),
    "cfg_normalization": (float, "cfg_normalization"), "cfg_truncation": (float, "cfg_truncation"),
    "dtype": (str, "dtype"), "quantize": (int, "quantize"), "modulation_bits": (int, "modulation_bits"),
    "batch_size": (int, "batch_size"), "vae_tiling": (str, "vae_tiling"), "lora": (list, "lora"),
}
CHOICES = {"sampler": ("ddim", "euler"), "dtype": ("auto", "float32", "bfloat16", "float16"),
           "quantize": (4, 8), "modulation_bits": (4, 8), "vae_tiling": ("auto", "on", "off")}
LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors$")


def typed(field: str, value, kind: type):
    """JSON value -> the field's type; a bool is not a number, a float with a fraction not an int."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # JSON parsers accept NaN and Infinity
                raise RequestError(f"{field}: {value} is not a finite number", field)
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            try:
                value.encode("utf-8")  # a lone surrogate ("\\ud800") cannot go into the PNG's text
            except UnicodeEncodeError:
                raise RequestError(f"{field}: not valid Unicode text", field) from None
            return value
    elif kind is list:
        if isinstance(value, list):
            return value
    raise RequestError(f"{field}: expected {kind.__name__}, got {type(value).__name__} {value!r:.40}", field)


def parse_size(value) -> tuple[int | None, int | None]:
    """OpenAI's size "WxH" (or "auto": the model's default)."""
    if value is None or value == "auto":
        return None, None
    m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
    if not m:
        raise RequestError(f"size: expected \"WIDTHxHEIGHT\" such as \"512x512\" or \"auto\", got {value!r:.40}", "size")
    return int(m.group(1)), int(m.group(2))


def lora_specs(value: list, lora_dir: Path | None) -> list[str]:
    """[{"name": file, "weight": w}] or ["file[:weight]"] -> generate's --lora values, files in lora_dir."""
    specs = []
    for item in value:
        name, weight = (item.get("name"), item.get("weight", 1.0)) if isinstance(item, dict) else (item, 1.0)
        if isinstance(name, str) and ":" in name and not isinstance(item, dict):
            name, _, w = name.rpartition(":")
            try:
                weight = float(w)
            except ValueError:
                raise RequestError(f"lora: weight {w!r} is not a number", "lora") from None
        if lora_dir is None:
            raise RequestError("lora: this server has no LoRA folder (start it with --lora-dir)", "lora")
        if not isinstance(name, str) or not LORA_NAME.match(name):
            raise RequestError(f"lora: {name!r:.60} is not a file name *.safetensors in the server's LoRA folder", "lora")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise RequestError(f"lora: weight {weight!r:.20} is not a number", "lora")
        path = lora_dir / name
        if not path.is_file():
            raise RequestError(f"lora: no {name} in the server's LoRA folder", "lora")
        specs.append(f"{path}:{float(weight):g}")
    return specs


def generate_arguments(fields: dict, *, limits: Limits, output: Path, models: dict[str, str],
                       default_model: str, lora_dir: Path | None = None):
    """-> (name, the generate arguments, the command's jobs, output paths, the input images) for a
    job's fields. `models`: registered name or alias -> its name, for the models whose weights are
    here. Unknown fields are ignored (as OpenAI's API does); `name` is the job's id and file stem."""
    name, args = job_arguments(fields, limits=limits, output=output, models=models, default_model=default_model,
                               lora_dir=lora_dir)
    return (name, args, *validate(args))


def job_arguments(fields: dict, *, limits: Limits, output: Path, models: dict[str, str],
                  default_model: str, lora_dir: Path | None = None):
    """-> (name, the generate arguments): the fields typed, bounded and copied on, not yet validated."""
    if not isinstance(fields, dict):
        raise RequestError("the request body must be a JSON object")
    args = build_parser().parse_args([])
    args.model = default_model
    for field, (kind, dest) in FIELDS.items():
        value = fields.get(field)
        if value is None:
            continue
        value = typed(field, value, kind)
        if field in CHOICES and value not in CHOICES[field]:
            raise RequestError(f"{field}: {value!r} is not one of {', '.join(map(repr, CHOICES[field]))}", field)
        if field == "seed":
            if not 0 <= value < 2**63:
                raise RequestError(f"seed: {value} is outside 0..2**63-1", field)
            value = [value]
        if field == "lora":
            value = lora_specs(value, lora_dir)
        setattr(args, dest, value)
    if args.model not in models:
        raise RequestError(f"model: {args.model!r:.60} is not a model this server has (GET /api/models lists them)",
                           "model", status=404, kind="not_found_error")
    args.model = models[args.model]
    check_bounds(args, limits)
    name = uuid.uuid4().hex[:12]
    args.output = str(output / f"{name}-{{i}}.png")
    return name, args


def check_bounds(args, limits: Limits) -> None:
    if args.prompt is None or not args.prompt.strip():
        raise RequestError("prompt: empty, say what to draw", "prompt")
    for field in ("prompt", "negative_prompt"):
        if len(getattr(args, field)) > limits.prompt_chars:
            raise RequestError(f"{field}: {len(getattr(args, field))} characters, this server takes at most "
                               f"{limits.prompt_chars}", field)
    if not 1 <= args.n_images <= limits.images:
        raise RequestError(f"n: {args.n_images} images, this server makes 1 to {limits.images} per request", "n")
    for side in ("width", "height"):
        value = getattr(args, side)
        if value is not None and not 16 <= value <= limits.side:
            raise RequestError(f"{side}: {value} pixels, this server makes 16 to {limits.side}", side)
    if args.steps is not None and not 1 <= args.steps <= limits.steps:
        raise RequestError(f"steps: {args.steps}, this server runs 1 to {limits.steps}", "steps")


def validate(args):
    """The command's own checks (one place to switch to a shared validation layer): -> (jobs, paths,
    the input images: commands/inputs.py EditInputs)."""
    try:
        jobs, paths, edit = check_inputs(args)
    except UsageError as e:
        message = str(e)
        flag = re.match(r"--([a-z-]+)", message)
        raise RequestError(message, flag.group(1).replace("-", "_") if flag else None) from None
    return jobs, paths, edit
