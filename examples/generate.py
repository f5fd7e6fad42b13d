"""Generate images from a prompt (the same program as `tiny-imagegen generate`).

    python examples/generate.py                                   # the shipped tiny model, offline
    python examples/generate.py --prompt "a blue square above a yellow circle"
    python examples/generate.py --model flux1-schnell --prompt "a lighthouse at dusk" --quantize 4

`python examples/generate.py --help` lists every flag.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tiny_imagegen.commands import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("generate", sys.argv[1:]))
