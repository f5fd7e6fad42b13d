"""`tiny-imagegen serve`: the resident server (tiny_imagegen/serve/), an optional extra.

Its dependencies (Starlette, uvicorn) are not among the package's runtime dependencies, so this
entry point only checks that they are installed and says in one line how to install them if not.
"""

import importlib.util
import sys

INSTALL = 'tiny-imagegen serve needs the serve extra: pip install "tiny_imagegen[serve]" (from a checkout: pip install ".[serve]")'


def main(argv=None) -> int:
    missing = [m for m in ("starlette", "uvicorn", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: {INSTALL} ({', '.join(missing)} missing)", file=sys.stderr)
        return 2
    from ..serve.cli import main as serve_main

    return serve_main(argv)
