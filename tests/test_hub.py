"""resolve_model: known names, local folders, the Hugging Face cache, offline mode, and the errors.

No test touches the network. A tiny FLUX repo is assembled from the reference fixtures (transformer,
VAE, text encoders, tokenizers) plus the big files we must never fetch; it is served either as a
local folder, as a pre-populated HF cache, or by a fake hub: an httpx MockTransport behind
huggingface_hub's own client, so snapshot_download runs its real code path (repo info, tree
listing, per-file HEAD + GET, cache, tree-cache completeness check offline).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils import filter_repo_objects

from conftest import fixture_path
from tiny_imagegen import registry
from tiny_imagegen.registry.hub import (
    ModelNotAvailable,
    allow_patterns,
    download_command,
    hub_source,
    is_converted,
    resolve_model,
)

ROOT = Path(__file__).resolve().parents[1]
REPO = registry.find("flux1-schnell").repo_id
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# The files of black-forest-labs/FLUX.1-schnell (main, as of 2024-08; the test needs their shape).
SCHNELL_FILES = [
    ".gitattributes", "README.md", "schnell_grid.jpeg", "ae.safetensors", "flux1-schnell.safetensors",
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
NOT_NEEDED = {".gitattributes", "README.md", "schnell_grid.jpeg", "ae.safetensors", "flux1-schnell.safetensors"}


def test_allow_patterns_pick_the_diffusers_layout_only():
    # filter_repo_objects is the function snapshot_download filters the repo listing with
    chosen = set(filter_repo_objects(SCHNELL_FILES, allow_patterns=allow_patterns()))
    assert chosen == set(SCHNELL_FILES) - NOT_NEEDED
    decoys = ["text_encoder/pytorch_model.bin", "vae/diffusion_pytorch_model.bin", "text_encoder/model.onnx", "flux1-dev.safetensors"]
    assert not set(filter_repo_objects(decoys, allow_patterns=allow_patterns()))
    only_vae = set(filter_repo_objects(SCHNELL_FILES, allow_patterns=allow_patterns(("vae",))))
    assert only_vae == {"model_index.json", "scheduler/scheduler_config.json", "vae/config.json",
                        "vae/diffusion_pytorch_model.safetensors"}


# ---- a tiny FLUX repo from the reference fixtures -------------------------------------------------


def tiny_flux_repo(folder: Path, big_files: bool = True) -> Path:
    """A folder laid out like the FLUX.1-schnell repo, with tiny real weights. With `big_files`,
    stand-ins for the root single files and a .bin that a download must skip."""
    parts = {
        "transformer": fixture_path("flux_transformer", "schnell_tiny", "diffusers"),
        "vae": fixture_path("vae", "flux_small", "diffusers"),
        **{p: fixture_path("text_encoders", "flux", p) for p in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")},
    }
    for name, src in parts.items():
        shutil.copytree(src, folder / name)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "use_dynamic_shifting": False,
    }))
    if big_files:
        for name in ("flux1-schnell.safetensors", "ae.safetensors", "README.md", "text_encoder/pytorch_model.bin"):
            (folder / name).write_bytes(b"must never be downloaded")
    return folder


def repo_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cache_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """A Hugging Face cache holding `files` as one snapshot of `repo_id`, as snapshot_download
    leaves it (refs/main -> commit; the real cache links snapshot files to blobs/, plain files
    read the same)."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    return snapshot


def needed(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: files[k] for k in filter_repo_objects(files, allow_patterns=allow_patterns())}


# ---- local folders --------------------------------------------------------------------------------


def test_local_folder_resolves_as_it_is(tmp_path):
    repo = tiny_flux_repo(tmp_path / "FLUX.1-schnell")
    assert resolve_model(repo) == repo
    assert resolve_model(str(repo)) == repo
    assert hub_source(repo) == {"path": str(repo.resolve())}


def test_local_folder_with_a_missing_shard_names_it(tmp_path):
    repo = tiny_flux_repo(tmp_path / "FLUX.1-schnell")
    (repo / "text_encoder_2" / "model-00002-of-00002.safetensors").unlink()
    shutil.rmtree(repo / "tokenizer_2")
    with pytest.raises(ModelNotAvailable) as e:
        resolve_model(repo)
    message = str(e.value)
    assert "text_encoder_2/model-00002-of-00002.safetensors" in message and "tokenizer_2/spiece.model" in message
    assert "\n" not in message
    # a caller that needs only some parts is not stopped by the others
    assert resolve_model(repo, folders=("transformer", "vae")) == repo


def test_converted_folder_is_recognised(tmp_path):
    folder = tmp_path / "schnell-q4"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"format": "tiny_imagegen", "format_version": 1}))
    assert is_converted(folder) and resolve_model(folder) == folder
    (folder / "model.json").write_text("{not json")
    assert not is_converted(folder)


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ModelNotAvailable, match="unknown model 'flux2-pro'.*flux1-schnell, flux1-dev"):
        resolve_model("flux2-pro")
    with pytest.raises(ModelNotAvailable, match="no such folder"):
        resolve_model(str(tmp_path / "not-there"))
    (tmp_path / "flux1-schnell.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotAvailable, match="is a file: pass a folder"):
        resolve_model(tmp_path / "flux1-schnell.safetensors")


# ---- the Hugging Face cache, offline --------------------------------------------------------------


def _resolve_in_subprocess(tmp_path, cache: Path, name: str) -> subprocess.CompletedProcess:
    """resolve_model in a fresh interpreter with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set, as a user
    would: huggingface_hub reads both when it is imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    env.pop("HF_TOKEN", None)
    code = f"from tiny_imagegen.registry.hub import resolve_model; print(resolve_model({name!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_known_name_resolves_from_the_cache_offline(tmp_path):
    files = repo_files(tiny_flux_repo(tmp_path / "repo", big_files=False))
    snapshot = cache_snapshot(tmp_path / "cache", REPO, files)
    run = _resolve_in_subprocess(tmp_path, tmp_path / "cache", "flux1-schnell")
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == snapshot
    assert hub_source(snapshot) == {"repo_id": REPO, "revision": COMMIT}


def test_empty_cache_offline_says_what_to_download_and_where(tmp_path):
    run = _resolve_in_subprocess(tmp_path, tmp_path / "empty_cache", "flux1-schnell")
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    print(message)
    assert message.startswith("tiny_imagegen.registry.hub.ModelNotAvailable: black-forest-labs/FLUX.1-schnell is not in")
    assert "HF_HUB_OFFLINE=1" in message and str(tmp_path / "empty_cache") in message
    assert f"`{download_command(REPO)}`" in message
    assert "hf download black-forest-labs/FLUX.1-schnell --include model_index.json" in message
    assert "pass its path in place of 'flux1-schnell'" in message


def test_incomplete_cache_offline_names_the_missing_files(tmp_path, monkeypatch):
    files = needed(repo_files(tiny_flux_repo(tmp_path / "repo")))
    del files["transformer/diffusion_pytorch_model-00002-of-00002.safetensors"]
    cache_snapshot(tmp_path / "cache", REPO, files)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailable, match="incomplete: missing transformer/diffusion_pytorch_model-00002"):
        resolve_model("flux1-schnell", cache_dir=tmp_path / "cache")


# ---- a fake hub: snapshot_download's online path, without a network --------------------------------


class FakeHub:
    """Serves one repo the way huggingface.co answers snapshot_download, and records requests."""

    def __init__(self, repo_id: str, files: dict[str, bytes], gated: bool = False, reachable: bool = True):
        self.repo_id, self.files, self.gated, self.reachable = repo_id, files, gated, reachable
        self.downloaded: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        if not self.reachable:
            raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)
        path, api = request.url.path, f"/api/models/{self.repo_id}"
        if path == f"{api}/revision/main":
            return httpx2.Response(200, json={"id": self.repo_id, "sha": COMMIT, "gated": "manual" if self.gated else False})
        if path.startswith(f"{api}/revision/"):
            return httpx2.Response(404, headers={"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        if path == f"{api}/tree/{COMMIT}":
            return httpx2.Response(200, json=[
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in self.files.items()
            ])
        prefix = f"/{self.repo_id}/resolve/{COMMIT}/"
        if path.startswith(prefix) and path[len(prefix):] in self.files:
            if self.gated:
                return httpx2.Response(401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted"})
            data = self.files[path[len(prefix):]]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Content-Length": str(len(data))}
            if request.method == "GET":
                self.downloaded.append(path[len(prefix):])
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})


@pytest.fixture
def serve(monkeypatch):
    """serve(FakeHub) routes huggingface_hub's HTTP client to it; online mode for the test."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), follow_redirects=True))
    hub = None

    def _serve(fake: FakeHub) -> FakeHub:
        nonlocal hub
        hub = fake
        return fake

    yield _serve
    from huggingface_hub.utils import _http

    set_client_factory(_http.default_client_factory)


def test_download_fetches_only_the_needed_files_then_works_offline(tmp_path, serve, monkeypatch):
    files = repo_files(tiny_flux_repo(tmp_path / "repo"))
    hub = serve(FakeHub(REPO, files))
    folder = resolve_model("flux1-schnell", cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert set(hub.downloaded) <= set(needed(files))  # identical blobs are fetched once
    assert not {"flux1-schnell.safetensors", "ae.safetensors", "README.md", "text_encoder/pytorch_model.bin"} & set(hub.downloaded)
    assert repo_files(folder) == needed(files)
    # offline, the same call is served from the cache: snapshot_download checks the snapshot
    # against its cached tree listing filtered by our patterns, which must not want the big files
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from huggingface_hub.utils import _http

    set_client_factory(_http.default_client_factory)
    assert resolve_model("flux1-schnell", cache_dir=tmp_path / "cache") == folder


def test_gated_repo_says_accept_the_licence_and_log_in(tmp_path, serve):
    serve(FakeHub(registry.find("flux1-dev").repo_id, {"model_index.json": b"{}"}, gated=True))
    with pytest.raises(ModelNotAvailable) as e:
        resolve_model("flux1-dev", cache_dir=tmp_path / "cache")
    message = str(e.value)
    print(message)
    assert "black-forest-labs/FLUX.1-dev is gated" in message and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message
    assert "hf auth login" in message and "HF_TOKEN" in message and "\n" not in message


def test_repo_not_found(tmp_path, serve):
    serve(FakeHub("someone/else", {}))
    with pytest.raises(ModelNotAvailable, match="no hub repo 'nobody/no-such-model'.*no local folder"):
        resolve_model("nobody/no-such-model", cache_dir=tmp_path / "cache")


def test_unknown_revision(tmp_path, serve):
    serve(FakeHub(REPO, {"model_index.json": b"{}"}))
    with pytest.raises(ModelNotAvailable, match="FLUX.1-schnell has no revision 'v9'"):
        resolve_model("flux1-schnell", revision="v9", cache_dir=tmp_path / "cache")


def test_no_network_and_no_cache(tmp_path, serve):
    serve(FakeHub(REPO, {}, reachable=False))
    with pytest.raises(ModelNotAvailable) as e:
        resolve_model("flux1-schnell", cache_dir=tmp_path / "cache")
    message = str(e.value)
    print(message)
    assert "the hub cannot be reached" in message and download_command(REPO) in message and "\n" not in message
