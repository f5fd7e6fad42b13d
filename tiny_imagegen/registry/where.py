"""Where is this model? One answer for every way `--model` names one.

`--model` may name:
  - a registered model (catalog.py) or one of its aliases: shipped with the package
    (tiny-shapes) or downloaded from its hub repo into the Hugging Face cache (hub.py),
  - a model converted into `weights/<name>/` (our format, checkpoints/convert.py),
  - a folder in our format anywhere, or a local folder laid out like the hub repo,
  - any hub repo id org/name (its model_index.json says which family it is).

The shipped weights sit in the checkout's `weights/` folder, and inside the installed package
(`tiny_imagegen/weights/`, package data of the wheel), so the default model works after a plain
`pip install` from any folder.
"""

from pathlib import Path

from ..checkpoints.convert import read_manifest
from . import catalog as registry
from .catalog import ModelSpec
from .hub import ModelNotAvailable, is_converted, resolve_model

_PACKAGE = Path(__file__).resolve().parents[1]
WEIGHTS_FOLDERS = (_PACKAGE.parent / "weights", _PACKAGE / "weights")  # checkout, installed package


def shipped(name: str) -> Path | None:
    """weights/<name> of the checkout or of the installed package, if it holds a converted model."""
    return next((w / name for w in WEIGHTS_FOLDERS if is_converted(w / name)), None)


def locate(model: str) -> tuple[Path, ModelSpec | None]:
    """A local folder for `model` (see the module docstring; downloads if it must) and its
    registry entry (None for a folder or a repo id the registry does not know)."""
    spec = registry.find(model)
    local = shipped(spec.name if spec else model) if "/" not in model else None
    if local is not None:
        return local, spec
    if spec is not None and spec.shipped:
        raise ModelNotAvailable(f"{model}: the shipped weights are missing from {' and '.join(map(str, WEIGHTS_FOLDERS))} "
                                "(a broken install? reinstall the package)")
    if spec is None and "/" not in model and not Path(model).expanduser().is_dir():
        ours = sorted({p.name for w in WEIGHTS_FOLDERS if w.is_dir() for p in w.iterdir() if is_converted(p)})
        known = list(dict.fromkeys(registry.names() + ours))
        raise ModelNotAvailable(f"unknown model {model!r}: known names are {', '.join(known)}; or pass a local "
                                "folder (hub layout or converted) or a hub repo id org/name (`--model list` shows them)")
    folder = resolve_model(model)
    if spec is None and is_converted(folder):  # a converted copy of a registered model keeps its defaults
        source = read_manifest(folder).get("source", {})
        spec = registry.find(source.get("model", "")) or registry.by_repo(source.get("repo_id"))
    return folder, spec
