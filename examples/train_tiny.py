"""Train tiny-shapes from scratch (the same program as `tiny-imagegen train`).

    python examples/train_tiny.py                      # the shipped weights (see README)
    python examples/train_tiny.py --resume             # continue an interrupted run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tiny_imagegen.commands import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
