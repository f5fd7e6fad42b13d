"""Score tiny-shapes with the scene parser (the same program as `tiny-imagegen evaluate`).

    python examples/evaluate_tiny.py --split train --n 100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tiny_imagegen.commands import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("evaluate", sys.argv[1:]))
