"""The bad-input battery of docs/bad-input.md: every CLI case of test_bad_input.py, classified by the
generic property only (exit 2, one line, no traceback, within 40 s and 12 GB of address space), run
against the code in the folder given:  python tests/bad_input_battery.py /path/to/a/checkout
"""
import json, os, subprocess, sys, tempfile, shutil
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_bad_input as T
code = sys.argv[1]
env = {**os.environ, "PYTHONPATH": code}
def run(argv, tmp):
    try:
        r = subprocess.run(["bash", "-c", 'ulimit -v 12000000; exec "$@"', "x", sys.executable, "-m", "tiny_imagegen", "generate", *map(str, argv)],
                           capture_output=True, text=True, env=env, cwd=tmp, timeout=40)
    except subprocess.TimeoutExpired:
        return "timeout (allocates / runs on)"
    lines = r.stderr.strip().splitlines()
    if "Traceback" in r.stderr: return "traceback: " + lines[-1][:90]
    if r.returncode == 0: return "exit 0 (silent wrong result)"
    if r.returncode != 2: return f"exit {r.returncode}: " + (lines[-1][:90] if lines else "")
    if len([l for l in lines if not l.startswith("denoising")]) != 1: return f"{len(lines)} lines"
    return "clean"
results = []
for case, (extra, _) in T.ARGUMENTS.items():
    tmp = tempfile.mkdtemp(); prompt = [] if "--class-label" in extra else ["--prompt", "a red circle"]
    results.append(("argument", case, run([*prompt, "--steps", 1, "--output", Path(tmp) / "o.png", *extra], tmp)))
for case, (text, _) in T.PROMPT_FILES.items():
    tmp = tempfile.mkdtemp(); p = Path(tmp) / "p.txt"; p.write_text(text + "\n")
    results.append(("prompt file", case, run(["--prompt-file", p, "--steps", 1, "--output", Path(tmp) / "o.png"], tmp)))
tmp = tempfile.mkdtemp(); p = Path(tmp) / "p.txt"; p.write_bytes("a\nune île\n".encode("latin-1"))
results.append(("prompt file", "not UTF-8", run(["--prompt-file", p, "--output", Path(tmp) / "o.png"], tmp)))
tmp = tempfile.mkdtemp(); (Path(tmp) / "d.png").mkdir()
results.append(("files", "--output an existing folder", run(["--prompt", "x", "--steps", 1, "--output", Path(tmp) / "d.png", "--overwrite"], tmp)))
tmp = tempfile.mkdtemp(); (Path(tmp) / "f").write_text("x")
results.append(("files", "--stepwise-output a file", run(["--prompt", "x", "--steps", 1, "--stepwise-output", Path(tmp) / "f", "--output", Path(tmp) / "o.png"], tmp)))
from PIL import Image
for case, (text, _) in T.REPLAYED.items():
    tmp = tempfile.mkdtemp(); png = Path(tmp) / "m.png"
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    for k, v in {"prompt": "a red circle", "software": "tiny_imagegen 0", **text}.items(): info.add_itxt(k, v)
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    results.append(("metadata", case, run(["--config-from-metadata", png, "--steps", 1, "--output", Path(tmp) / "o.png"], tmp)))
for case, (change, _) in T.FOLDERS.items():
    tmp = Path(tempfile.mkdtemp()); folder = T._folder(tmp, change)
    results.append(("folder", case, run(["--model", folder, "--prompt", "a red circle", "--steps", 1, "--width", 64, "--height", 64, "--output", tmp / "o.png"], tmp)))
clean = sum(r == "clean" for *_, r in results)
for kind, case, r in results: print(f"{kind:12s} {case:40s} {r}")
print(f"{clean} / {len(results)} clean")
