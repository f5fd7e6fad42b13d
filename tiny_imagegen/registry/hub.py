"""Where a model's files come from: a known name, a Hugging Face hub repo, or a local folder.

    resolve_model("flux1-schnell")          -> ~/.cache/huggingface/hub/models--black-forest-labs--FLUX.1-schnell/snapshots/<rev>
    resolve_model("org/some-flux-repo")     -> the same, for any repo in the diffusers layout
    resolve_model("/data/FLUX.1-schnell")   -> that folder, checked
    resolve_model("weights/schnell-q4")     -> a folder written by checkpoints/convert.py, as it is

FLUX repos on the hub hold every weight twice: the diffusers layout (model_index.json and one
folder per component) and the original single files at the root (flux1-schnell.safetensors 23.8 GB,
ae.safetensors). We read the diffusers layout only, so the download is limited by `allow_patterns`
to the configs, safetensors (and their index jsons) of the component folders and the tokenizer
files: no root single files, no *.bin, no ONNX. Which folders a model needs is its family's
(catalog.py); a repo the registry does not know is read as the family its model_index.json names.

Downloads go through `huggingface_hub.snapshot_download`: its cache (HF_HUB_CACHE, default
~/.cache/huggingface/hub), its progress bars, its offline mode (HF_HUB_OFFLINE=1: only the cache
is read) and its login (`hf auth login` or HF_TOKEN). Every way of not getting the files ends in
one `ModelNotAvailable` whose message says what to do.
"""

import json
import re
import shlex
from pathlib import Path

from . import catalog as registry
from .catalog import FAMILIES, Family

DEFAULT_FAMILY = FAMILIES["flux1"]  # a diffusers folder without model_index.json is read as FLUX.1
ALL_FOLDERS = DEFAULT_FAMILY.hub_folders()

CONVERTED_MARKER = "model.json"  # written by checkpoints/convert.py
# diffusers' weight variants beside the weights (SD 1.5: unet/*.fp16.safetensors, *.non_ema.*):
# never read (checkpoints/safetensors_io.py skips them), so never downloaded
VARIANT_PATTERNS = ["*.fp16.*", "*.bf16.*", "*.non_ema.*", "*.ema.*"]


class ModelNotAvailable(RuntimeError):
    """The model's files cannot be had: unknown name, gated repo, no network and no cache, ...
    The message is one line that says what to do."""


def allow_patterns(folders=ALL_FOLDERS, family: Family = DEFAULT_FAMILY) -> list[str]:
    """The hub files we need for `folders` of a `family` repo: fnmatch patterns as
    snapshot_download takes them (`*` also matches '/')."""
    patterns = ["model_index.json", "scheduler/scheduler_config.json"]
    for folder in folders:
        if folder in family.tokenizers:
            patterns.append(f"{folder}/*")  # vocab.json, merges.txt, spiece.model and their configs
        else:
            patterns += [f"{folder}/*.json", f"{folder}/*.safetensors"]  # config, index json, shards
    return patterns


def download_command(repo_id: str, folders=None, revision: str | None = None, family: Family | None = None) -> str:
    """The `hf` command that fetches exactly what `resolve_model` would, into ./<repo name>."""
    family = family or _family_of_repo(repo_id)
    words = ["hf", "download", repo_id, "--include", *allow_patterns(folders or family.hub_folders(), family),
             "--exclude", *VARIANT_PATTERNS]
    if revision:
        words += ["--revision", revision]
    words += ["--local-dir", repo_id.split("/")[-1]]
    return shlex.join(words)


def is_converted(path: str | Path) -> bool:
    """A folder in our own format (checkpoints/convert.py), recognised by its model.json."""
    marker = Path(path) / CONVERTED_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        return isinstance(info, dict) and info.get("format") == "tiny_imagegen"
    except (OSError, ValueError, RecursionError):
        return False


def family_of_folder(folder: Path) -> Family:
    """The family of a local folder: its model.json (converted) or model_index.json (hub layout)."""
    for marker, key in ((CONVERTED_MARKER, "family"), ("model_index.json", "_class_name")):
        try:
            info = json.loads((folder / marker).read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(info, dict):
            raise ModelNotAvailable(f"{folder / marker}: not a JSON object")
        if marker == CONVERTED_MARKER:
            recipe = info.get("pipeline", {})
            name = recipe.get("family", "flux1") if isinstance(recipe, dict) else None
            if name not in FAMILIES:
                raise ModelNotAvailable(f"{folder / marker}: pipeline.family {name!r} is not a family this code runs "
                                        f"(known: {', '.join(FAMILIES)})")
            return FAMILIES[name]
        family = registry.family_for_pipeline_class(info.get(key, ""))
        if family is None:
            raise ModelNotAvailable(f"{folder}: model_index.json names {info.get(key)!r}, a pipeline this code "
                                    f"does not run (known: {', '.join(c for f in FAMILIES.values() for c in f.pipeline_classes)})")
        return family
    return DEFAULT_FAMILY


def _family_of_repo(repo_id: str) -> Family:
    spec = registry.by_repo(repo_id)
    return FAMILIES[spec.family] if spec else DEFAULT_FAMILY


def resolve_model(
    name_or_path: str | Path,
    folders=None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder laid out like the hub repo (or a converted folder) for `name_or_path`.

    `name_or_path`: a registered name (catalog.py), an existing folder, or a hub repo id
    "org/name". `folders`: the component folders the caller needs (default: all its family
    reads); only their files are downloaded and checked. Hub arguments are snapshot_download's;
    HF_HUB_OFFLINE=1 makes it read the cache only. Raises ModelNotAvailable with a one-line message."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not is_converted(path):
            family = family_of_folder(path)
            check_layout(path, folders or family.hub_folders(), origin=f"local folder {path}", family=family)
        return path
    if path.is_file():
        raise ModelNotAvailable(
            f"{path} is a file: pass a folder laid out like the hub repo (model_index.json, transformer/, "
            "vae/, text_encoder/, ...) or a converted folder"
        )
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelNotAvailable(f"no such folder: {path}")
    spec = registry.find(name)
    if spec is not None and spec.repo_id:
        repo_id, family = spec.repo_id, FAMILIES[spec.family]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        repo_id = name
        family = _family_of_repo(repo_id) if registry.by_repo(repo_id) else None
    else:
        raise ModelNotAvailable(
            f"unknown model {name!r}: known names are {', '.join(registry.names())}; "
            "or pass a local folder (diffusers layout or converted) or a hub repo id org/name"
        )
    kw = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    if family is None:  # a repo we do not know: its model_index.json says what it is
        family = family_of_folder(Path(_download(name, repo_id, ["model_index.json"], **kw)))
    folders = folders or family.hub_folders()
    snapshot = Path(_download(name, repo_id, allow_patterns(folders, family), family=family, **kw))
    check_layout(snapshot, folders, origin=f"{repo_id} in the Hugging Face cache ({snapshot})", repo_id=repo_id,
                 family=family)
    return snapshot


def _download(name, repo_id, patterns, revision, cache_dir, token, local_files_only, family=None) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=patterns,
            ignore_patterns=VARIANT_PATTERNS,
        )
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: first
        spec = registry.find(name) or registry.by_repo(repo_id)
        terms = f" ({spec.licence})" if spec else ""
        raise ModelNotAvailable(
            f"{repo_id} is gated{terms}: accept its licence at https://huggingface.co/{repo_id} while logged in, "
            "then log in here with `hf auth login` (or set HF_TOKEN to a read token) and run again"
        ) from None
    except RepositoryNotFoundError:
        hint = f"; known names: {', '.join(registry.names())}" if registry.find(name) is None else ""
        raise ModelNotAvailable(
            f"no hub repo {repo_id!r} (or it is private: log in with `hf auth login`), "
            f"and no local folder {name!r}{hint}"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotAvailable(f"{repo_id} has no revision {revision!r} (a branch, tag or commit)") from None
    except HfHubHTTPError as e:  # e.g. 401 for a bad token
        raise ModelNotAvailable(f"the hub refused {repo_id}: {str(e).splitlines()[0]} (check `hf auth login` / HF_TOKEN)") from None
    except LocalEntryNotFoundError:  # offline, no network, or local_files_only; nothing cached
        cache = cache_dir or constants.HF_HUB_CACHE
        if constants.is_offline_mode():
            why = "offline mode is on (HF_HUB_OFFLINE=1)"
        elif local_files_only:
            why = "local_files_only is set"
        else:
            why = "the hub cannot be reached"
        also = "" if registry.find(name) else f" (and there is no local folder {name!r})"
        raise ModelNotAvailable(
            f"{repo_id} is not in the Hugging Face cache ({cache}) and {why}{also}. "
            f"On a machine with network run `{download_command(repo_id, None, revision, family)}`, "
            f"copy the folder {repo_id.split('/')[-1]}/ to this machine and pass its path in place of {name!r} "
            f"(or copy that machine's cache folder {_cache_folder(repo_id)} into {cache})"
        ) from None


def _cache_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def check_layout(folder: Path, folders=None, origin: str = "", repo_id: str | None = None,
                 family: Family = DEFAULT_FAMILY):
    """Every file `folders` need is present: a component's config.json and safetensors (all shards
    its index json lists), a tokenizer's files. Catches interrupted downloads and partial copies."""
    missing = []
    for name in folders or family.hub_folders():
        sub = folder / name
        if name in family.tokenizers:
            missing += [f"{name}/{f}" for f in family.tokenizers[name] if not (sub / f).is_file()]
            continue
        if not (sub / "config.json").is_file():
            missing.append(f"{name}/config.json")
        indexes = sorted(sub.glob("*.safetensors.index.json"))
        if indexes:
            try:
                shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise ModelNotAvailable(f"{origin}: unreadable {name}/{indexes[0].name} ({e})") from None
            missing += [f"{name}/{s}" for s in shards if not (sub / s).is_file()]
        elif not any(sub.glob("*.safetensors")):
            missing.append(f"{name}/*.safetensors")
    if missing:
        fix = f"; fetch them with `{download_command(repo_id, folders, family=family)}`" if repo_id else ""
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelNotAvailable(f"{origin} is incomplete: missing {shown}{fix}")


def hub_source(path: str | Path) -> dict:
    """Provenance of a resolved folder: the hub repo and commit for a cache snapshot
    (…/models--org--name/snapshots/<commit>), else the folder's absolute path."""
    path = Path(path).resolve()
    m = re.search(r"models--(.+?)--(.+)/snapshots/([0-9a-f]{40})$", path.as_posix())
    if m:
        return {"repo_id": f"{m[1]}/{m[2]}", "revision": m[3]}
    return {"path": str(path)}


def resolve_file(spec: str) -> Path:
    """A local file, or one file of a hub repo named `org/name/path/in/repo` (hf_hub_download:
    the cache, HF_HUB_OFFLINE=1, login). Used for LoRA files (--lora)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    parts = spec.split("/")
    if len(parts) < 3 or path.exists() or spec.startswith(("/", ".", "~")):
        raise ModelNotAvailable(f"no such file {spec!r} (a local file, or a hub file org/name/file.safetensors)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError:
        raise ModelNotAvailable(f"{filename} of {repo_id} is not in the Hugging Face cache and the hub cannot be "
                                f"reached: on a machine with network run `hf download {repo_id} {filename}`") from None
    except HfHubHTTPError as e:
        raise ModelNotAvailable(f"cannot download {filename} from {repo_id}: {e}") from None
