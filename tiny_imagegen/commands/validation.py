"""The types, ranges and choices of generate's values, stated once, and checked at every edge.

A value reaches `generate` by three roads: a flag, a line of a JSON prompt file, or a PNG's
metadata replayed with --config-from-metadata. The same table (FIELDS) checks all three before
any model is loaded, so that a seed MLX cannot take, 10^9 steps, a string where a number belongs or
a NaN guidance (an all-black image, exit 0) is one line naming the flag, the file and line, or the
PNG key, and exit status 2.

Why the bounds: a seed is a key of `mx.random.key`, an unsigned 64-bit integer (image i of a run
uses seed + i, so that must fit too); steps beyond 10,000 (DiT's DDPM has 1000 timesteps, FLUX
uses 1 to 50) only allocate; guidance-like scales are finite (NaN or inf gives black images) and
at most 1000; sizes are pipeline.MAX_SIDE (inputs.check_size).
"""

import argparse
import math
from dataclasses import dataclass

MAX_SEED = 2**64 - 1  # mx.random.key takes an unsigned 64-bit integer
MAX_STEPS = 10_000
MAX_IMAGES = 10_000  # images per prompt (--n-images) and per pass (--batch-size)
MAX_SCALE = 1000.0  # guidance, true CFG, the LoRA weights, Z-Image's shift and norm cap
MAX_TEXT = 100_000  # characters of one prompt (the tokenizers cut at 77 to 512 tokens anyway)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors (an unknown flag, 'abc' for an int, a choice not offered) in one
    line and exit status 2, as every other bad input: no usage block above it."""

    def error(self, message: str):
        self.exit(2, f"error: {message.splitlines()[0] if message else message} (--help lists the flags)\n")


class ValidationError(ValueError):
    """One value out of its type, range or choices: a message of one line without its source."""


@dataclass(frozen=True)
class Field:
    """A value's type and its allowed range (lo..hi, lo excluded if `open_lo`) or choices."""

    kind: type  # int, float or str
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.lo is None:
            return {int: "an integer", float: "a finite number", str: "text"}[self.kind]
        lo, hi = (f"{x:g}" if isinstance(x, float) else str(x) for x in (self.lo, self.hi))
        return f"in {'(' if self.open_lo else '['}{lo}, {hi}]"

    def check(self, value, name: str):
        """`value` (already of Python type, e.g. from JSON or argparse) -> itself, or ValidationError."""
        if self.kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValidationError(f"{name} must be an integer, got {value!r}")
        if self.kind is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValidationError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValidationError(f"{name} must be a finite number, got {value!r}")
            value = float(value)
        if self.kind is str:
            if not isinstance(value, str):
                raise ValidationError(f"{name} must be text, got {value!r}")
            if len(value) > MAX_TEXT:
                raise ValidationError(f"{name} is {len(value):,} characters long, more than {MAX_TEXT:,}")
        if self.choices and value not in self.choices:
            raise ValidationError(f"{name} must be {self.describe()}, got {value!r}")
        if self.lo is not None and not ((self.lo < value) if self.open_lo else (self.lo <= value)) or \
                self.hi is not None and not value <= self.hi:
            raise ValidationError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def parse(self, text: str, name: str):
        """The same from text (a PNG text chunk): int('7'), float('3.5'); then `check`."""
        try:
            value = self.kind(text) if self.kind is not float else float(text)
        except (TypeError, ValueError):
            raise ValidationError(f"{name} must be {self.describe()}, got {text!r}") from None
        return self.check(value, name)


# generate's argument name (its argparse dest) -> Field; None-valued (unset) arguments are not checked
FIELDS = {
    "prompt": Field(str),
    "negative_prompt": Field(str),
    "model": Field(str),
    "image": Field(str),
    "mask": Field(str),
    "seed": Field(int, 0, MAX_SEED),
    "steps": Field(int, 1, MAX_STEPS),
    "n_images": Field(int, 1, MAX_IMAGES),
    "batch_size": Field(int, 1, MAX_IMAGES),
    "width": Field(int),  # its range and multiple: inputs.check_size (the pipeline's MAX_SIDE)
    "height": Field(int),
    "guidance": Field(float, -MAX_SCALE, MAX_SCALE),
    "true_cfg": Field(float, 0.0, MAX_SCALE),
    "strength": Field(float, 0.0, 1.0, open_lo=True),
    "shift": Field(float, 0.0, MAX_SCALE, open_lo=True),
    "cfg_normalization": Field(float, 0.0, MAX_SCALE),
    "cfg_truncation": Field(float, 0.0, 1.0),
    "cfg_channels": Field(int, 1, 4096),
    "slg": Field(str),  # block indices "7,8,9", parsed by generate's slg_layers
    "slg_scale": Field(float, -MAX_SCALE, MAX_SCALE),
    "clip_skip": Field(int, 0, 64),  # bigG has 32 layers
    "cache": Field(str),  # "fbc[:THRESHOLD]" / "mag[:THRESHOLD]", parsed by diffusion/step_cache.py's CacheConfig
    "quantize": Field(int, choices=(4, 8)),
    "modulation_bits": Field(int, choices=(4, 8)),
    "dtype": Field(str, choices=DTYPE_CHOICES),
    "lora_weight": Field(float, -MAX_SCALE, MAX_SCALE),
}
# the keys a JSON line of --prompt-file may hold (a subset of FIELDS)
PROMPT_FILE_KEYS = ("prompt", "seed", "negative_prompt", "width", "height", "steps", "guidance")


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_arguments(args) -> None:
    """Every argument generate was given (or replayed), against FIELDS; seed + n - 1 fits too."""
    for dest, field in FIELDS.items():
        value = getattr(args, dest, None)
        if dest == "lora_weight" or value is None:
            continue
        for v in value if dest == "seed" else [value]:
            field.check(v, flag(dest))
    if args.seed:
        last = max(args.seed) + args.n_images - 1
        if len(args.seed) == 1 and last > MAX_SEED:
            raise ValidationError(f"--seed {args.seed[0]} with --n-images {args.n_images}: image i uses seed + i, "
                                  f"and the last, {last}, is beyond {MAX_SEED} (2^64 - 1)")


def check_prompt_entry(entry, n_images: int) -> dict:
    """A JSON line of --prompt-file -> its values, each of its FIELDS type and range."""
    if not isinstance(entry, dict):
        raise ValidationError(f"a JSON line must be an object {{\"prompt\": ...}}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(PROMPT_FILE_KEYS))
    if unknown:
        raise ValidationError(f"unknown keys {unknown}: a line takes {', '.join(PROMPT_FILE_KEYS)}")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise ValidationError(f"needs a non-empty 'prompt' (text), got {entry.get('prompt')!r}")
    out = {k: FIELDS[k].check(v, repr(k)) for k, v in entry.items() if v is not None}
    if "seed" in out and out["seed"] + n_images - 1 > MAX_SEED:
        raise ValidationError(f"'seed' {out['seed']} + {n_images - 1} images is beyond {MAX_SEED} (2^64 - 1)")
    return out


# PNG text key -> generate's argument: what --config-from-metadata takes back, each parsed from its
# text and checked as the flag would be
REPLAYED = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "model": "model", "seed": "seed", "steps": "steps",
    "guidance": "guidance", "true_cfg": "true_cfg", "width": "width", "height": "height", "quantization": "quantize",
    "modulation_bits": "modulation_bits", "dtype": "dtype", "strength": "strength", "image": "image", "loras": "lora",
    "mask": "mask", "references": "ref", "slg": "slg", "slg_scale": "slg_scale", "clip_skip": "clip_skip",
    "t5": "no_t5", "cache": "cache",
}
QUANTIZATION_TEXT = {"none": None, "4-bit": 4, "8-bit": 8}


def replay_values(text: dict[str, str]) -> dict:
    """A PNG's parameters (key -> text) -> generate's arguments (dest -> typed value), each checked;
    a ValidationError names the PNG key."""
    import json

    out = {}
    for key, dest in REPLAYED.items():
        if key not in text:
            continue
        value, name = text[key], f"the stored {key!r}"
        if key == "quantization":
            if value not in QUANTIZATION_TEXT:
                raise ValidationError(f"{name} must be one of {', '.join(QUANTIZATION_TEXT)}, got {value!r}")
            out[dest] = QUANTIZATION_TEXT[value]
        elif key in ("loras", "references"):
            try:
                items = json.loads(value)
            except ValueError:
                items = None
            if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
                raise ValidationError(f"{name} must be a JSON list of file names, got {value!r}")
            out[dest] = items
        elif key == "slg":  # SD3.5's skipped blocks, stored as a JSON list of indices
            try:
                layers = json.loads(value)
            except ValueError:
                layers = None
            if not isinstance(layers, list) or not all(isinstance(x, int) and 0 <= x < 1000 for x in layers):
                raise ValidationError(f"{name} must be a JSON list of block indices, got {value!r}")
            out[dest] = ",".join(map(str, layers))
        elif key == "t5":  # stored as the option's value, given back as --no-t5
            if value not in ("True", "False"):
                raise ValidationError(f"{name} must be True or False, got {value!r}")
            out[dest] = value == "False"
        else:
            field = FIELDS[dest]
            out[dest] = field.check(value, name) if field.kind is str else field.parse(value, name)
    return out
