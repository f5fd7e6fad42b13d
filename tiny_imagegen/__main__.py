"""`python -m tiny_imagegen ...`: the same as the `tiny-imagegen` command."""

import sys

from .commands import main

sys.exit(main())
