"""The command line: `tiny-imagegen generate | convert | train | evaluate | ablate | info | models | serve`.

Each subcommand is one module here with a `main(argv)`; examples/*.py are thin entry points that
call the same functions, so `python examples/generate.py ...` and `tiny-imagegen generate ...`
are one program.
"""

import importlib
import sys

from .. import __version__

COMMANDS = {
    "generate": ("generate", "text to image (PNG with its parameters)"),
    "convert": ("convert", "convert a model to our format, optionally 4/8-bit"),
    "train": ("train", "train the tiny-shapes model from scratch"),
    "evaluate": ("evaluate", "score tiny-shapes with the scene parser"),
    "ablate": ("ablate", "the tiny-shapes ablation table (docs/ablations.md)"),
    "info": ("metadata:info_main", "print the parameters stored in generated PNGs"),
    "models": ("models", "list the registered models, their licences, sizes and whether they are here"),
    "serve": ("serve", "keep models loaded behind an OpenAI-compatible images API and a web page (extra: [serve])"),
}


def run_command(name: str, argv: list[str]) -> int:
    module, _, function = COMMANDS[name][0].partition(":")
    sys.argv[0] = f"tiny-imagegen {name}"  # what argparse shows as the program name
    return getattr(importlib.import_module(f"{__name__}.{module}"), function or "main")(argv) or 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tiny-imagegen {" + ",".join(COMMANDS) + "} ... | --version\n")
        for name, (_, what) in COMMANDS.items():
            print(f"  {name:10s} {what}")
        print("\n`tiny-imagegen COMMAND --help` lists a command's flags.")
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"tiny_imagegen {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}: choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(argv[0], argv[1:])
