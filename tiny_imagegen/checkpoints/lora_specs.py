"""How a LoRA is named and recorded: the `PATH[:WEIGHT]` of `--lora`, the file's SHA-256, and the
PNG text of an image made with LoRAs. Apart from lora.py (the file formats, their key tables and
the merge) so that a command naming no LoRA imports none of those tables."""

import math
from pathlib import Path


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """'PATH[:WEIGHT]' -> (PATH, WEIGHT); the weight defaults to 1."""
    path, sep, tail = spec.rpartition(":")
    if sep and not Path(spec).expanduser().is_file():
        try:
            weight = float(tail)
        except ValueError:
            raise ValueError(f"--lora {spec!r}: the weight {tail!r} after ':' is not a number") from None
        if not math.isfinite(weight):  # NaN or inf: every merged weight, and so the image, would be NaN
            raise ValueError(f"--lora {spec!r}: the weight {tail!r} after ':' is not a finite number")
        return path, weight
    return spec, 1.0


def lora_metadata(records: list[dict]) -> dict[str, list[str]]:
    """PNG text for the LoRAs an image was made with: `loras` as the --lora values that remake it,
    `lora_sha256` the first 12 hex digits of each file."""
    return {"loras": [f"{r['name']}:{r['weight']:g}" for r in records],
            "lora_sha256": [r["sha256"][:12] for r in records]}
