"""Convert a model to our own format in weights/<name>/, optionally quantized to 4 or 8 bits.

    python examples/convert.py --model flux1-schnell --output weights/schnell-q4 --quantize 4
    python examples/convert.py --model /data/FLUX.1-dev --output weights/dev-bf16
    python examples/convert.py --model weights/dev-bf16 --output weights/dev-q8 --quantize 8
    python examples/convert.py --model flux1-dev --output weights/dev-q4m8 --quantize 4 --modulation-bits 8

--model takes a known name (downloaded into the Hugging Face cache, only the files needed), a hub
repo id, a local folder laid out like the hub repo, or an unquantized converted folder. The result
loads without the original files: `python examples/generate.py --model weights/schnell-q4`.
"""

import argparse
import sys
import time
from pathlib import Path

from ..registry.convert import convert
from ..checkpoints.convert import DTYPES, read_manifest
from ..checkpoints.quantize import GROUP_SIZES
from ..checkpoints.mapping import CheckpointError
from .. import registry
from ..registry.hub import ModelNotAvailable, resolve_model
from .validation import OneLineParser


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="convert.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help=f"{', '.join(m.name for m in registry.MODELS if not m.shipped)}, a hub repo id, a local folder laid out like the hub repo, "
                        "or an unquantized converted folder")
    p.add_argument("--output", required=True, type=Path, help="the folder to write, e.g. weights/schnell-q4")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="bits per weight of the quantized layers")
    p.add_argument("--modulation-bits", type=int, choices=(4, 8),
                   help="with --quantize 4: keep the MM-DiT's adaLN modulation Linears at 8 bits (docs/quantization-and-memory.md: "
                        "FLUX.1: 8.37 instead of 6.75 GB, error 0.099 vs 0.130)")
    p.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES,
                   help="weights sharing one scale and bias (default %(default)s)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                   help="stored dtype of the weights, scales and biases (default %(default)s)")
    p.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="replace an existing --output folder")
    return p.parse_args(argv)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.output.exists() and not args.force:  # before any download
        print(f"error: {args.output} exists: choose another --output or pass --force to replace it", file=sys.stderr)
        return 2
    try:
        source = resolve_model(args.model, revision=args.revision)
        spec = registry.find(args.model)
        provenance = {"model": spec.name} if spec else {}
        start = time.perf_counter()
        out = convert(source, args.output, bits=args.quantize, group_size=args.group_size, dtype=args.dtype,
                      force=args.force, provenance=provenance, modulation_bits=args.modulation_bits)
    except (ModelNotAvailable, CheckpointError, OSError, ValueError) as e:  # one line, status 2, not a traceback
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    manifest = read_manifest(out)
    for name, entry in manifest["components"].items():
        size = manifest["files"][entry["file"]]["size"]
        quantized = f", {len(entry['quantized_layers'])} layers quantized" if entry["quantized_layers"] else ""
        print(f"{name:12s} {entry['parameters'] / 1e6:10.1f} M parameters {_size(size):>10s}{quantized}")
    total = sum(f["size"] for f in manifest["files"].values())
    print(f"wrote {out} ({_size(total)}) in {time.perf_counter() - start:.1f} s")
    return 0

