"""The bad-input battery of docs/bad-input.md: every command-line case of test_bad_input.py, run as
a user runs it against the code in the folder given and classified by the generic property only:
exit 2, one line, no traceback, within 40 s and 12 GB of address space.

    python tests/bad_input_battery.py /path/to/a/checkout
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_bad_input as T  # noqa: E402  (its tables of cases)


def run(code: str, argv: list, cwd: Path) -> str:
    """How `tiny-imagegen generate ARGV` with the code in `code` ends: "clean" or what went wrong."""
    env = {**os.environ, "PYTHONPATH": code}
    command = [sys.executable, "-m", "tiny_imagegen", "generate", *map(str, argv)]
    try:
        r = subprocess.run(["bash", "-c", 'ulimit -v 12000000; exec "$@"', "bash", *command],
                           capture_output=True, text=True, env=env, cwd=cwd, timeout=40)
    except subprocess.TimeoutExpired:
        return "timeout (allocates / runs on)"
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("denoising")]
    if "Traceback" in r.stderr:
        return "traceback: " + lines[-1][:90]
    if r.returncode == 0:
        return "exit 0 (silent wrong result)"
    if r.returncode != 2:
        return f"exit {r.returncode}: " + (lines[-1][:90] if lines else "")
    return "clean" if len(lines) == 1 else f"{len(lines)} lines"


def cases():
    """(kind, case, argv, folder) for every command-line case."""
    for case, (extra, _) in T.ARGUMENTS.items():
        tmp = Path(tempfile.mkdtemp())
        prompt = [] if "--class-label" in extra else ["--prompt", "a red circle"]
        yield "argument", case, [*prompt, "--steps", 1, "--output", tmp / "o.png", *extra], tmp
    for case, (text, _) in T.PROMPT_FILES.items():
        tmp = Path(tempfile.mkdtemp())
        (tmp / "p.txt").write_text(text + "\n")
        yield "prompt file", case, ["--prompt-file", tmp / "p.txt", "--steps", 1, "--output", tmp / "o.png"], tmp
    tmp = Path(tempfile.mkdtemp())
    (tmp / "p.txt").write_bytes("a\nune île\n".encode("latin-1"))
    yield "prompt file", "not UTF-8", ["--prompt-file", tmp / "p.txt", "--output", tmp / "o.png"], tmp
    tmp = Path(tempfile.mkdtemp())
    (tmp / "d.png").mkdir()
    yield "files", "--output an existing folder", ["--prompt", "x", "--steps", 1, "--output", tmp / "d.png",
                                                    "--overwrite"], tmp
    tmp = Path(tempfile.mkdtemp())
    (tmp / "f").write_text("x")
    yield "files", "--stepwise-output a file", ["--prompt", "x", "--steps", 1, "--stepwise-output", tmp / "f",
                                                 "--output", tmp / "o.png"], tmp
    for case, (text, _) in T.REPLAYED.items():
        tmp = Path(tempfile.mkdtemp())
        info = PngInfo()
        for key, value in {"prompt": "a red circle", "software": "tiny_imagegen 0", **text}.items():
            info.add_itxt(key, value)
        Image.new("RGB", (8, 8)).save(tmp / "m.png", pnginfo=info)
        yield "metadata", case, ["--config-from-metadata", tmp / "m.png", "--steps", 1, "--output", tmp / "o.png"], tmp
    for case, (change, _) in T.FOLDERS.items():
        tmp = Path(tempfile.mkdtemp())
        folder = T._folder(tmp, change)
        yield "folder", case, ["--model", folder, "--prompt", "a red circle", "--steps", 1, "--width", 64,
                               "--height", 64, "--output", tmp / "o.png"], tmp


if __name__ == "__main__":
    results = [(kind, case, run(sys.argv[1], argv, tmp)) for kind, case, argv, tmp in cases()]
    for kind, case, result in results:
        print(f"{kind:12s} {case:40s} {result}")
    print(f"{sum(r == 'clean' for *_, r in results)} / {len(results)} clean")
