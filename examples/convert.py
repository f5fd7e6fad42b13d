"""Convert a model to our format, optionally quantized (the same program as `tiny-imagegen convert`).

    python examples/convert.py --model flux1-schnell --output weights/schnell-q4 --quantize 4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tiny_imagegen.commands import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("convert", sys.argv[1:]))
