"""The tiny-shapes ablation table: conditioning, position encoding, architecture and objective.

    python examples/ablate.py                 # every run not yet in benchmarks/ablations/results.json
    python examples/ablate.py --only unet     # one row
    python examples/ablate.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tiny_imagegen.commands.ablate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
