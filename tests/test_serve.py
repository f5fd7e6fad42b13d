"""`tiny-imagegen serve`, in process (Starlette's test client) on the shipped tiny model: the OpenAI
route draws the command's bytes, jobs run in order with their events, cancel stops and frees, the
queue is bounded, the token guards every route but the page, and bad requests are 4xx, never 500."""

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_modules
from serve_helpers import require_serve

ROOT = Path(__file__).resolve().parents[1]
FAST = {"steps": 2, "width": 32, "height": 32}


def make_client(tmp_path, **config):
    require_serve()
    from starlette.testclient import TestClient

    from tiny_imagegen.serve.app import Config, create_app
    from tiny_imagegen.serve.params import Limits

    limits = Limits(**config.pop("limits", {}))
    app = create_app(Config(output=tmp_path / "out", limits=limits, memory_budget=1 << 30, **config))
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("serve")) as c:
        yield c


def wait(client, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "error", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def events(client, job_id, until=None):
    """The job's events as (event name, data), read from the stream until the last one."""
    out = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                assert data["type"] == name
                out.append((name, data))
                if until and until(name, data):
                    return out
    return out


def command_png(tmp_path, *flags) -> list[bytes]:
    """What `tiny-imagegen generate` writes for these flags (in this process: the same MLX)."""
    from tiny_imagegen.commands.generate import main

    out = tmp_path / "cmd"
    out.mkdir(exist_ok=True)
    assert main([*map(str, flags), "--output", str(out / "img-{i}.png")]) == 0
    return [p.read_bytes() for p in sorted(out.glob("img-*.png"))]


# ---- the extra stays optional ------------------------------------------------------------------

def test_core_never_imports_the_server():
    code = ("import sys, tiny_imagegen, tiny_imagegen.commands, tiny_imagegen.commands.generate\n"
            "bad = [m for m in sys.modules if m.startswith(('tiny_imagegen.serve', 'starlette', 'uvicorn'))]\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from tiny_imagegen.commands import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "starlette" else real(name, *a))
    assert serve.main([]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and 'pip install "tiny_imagegen[serve]"' in err, err


def test_serve_refuses_a_public_address_without_a_token(tmp_path):
    require_serve()
    r = subprocess.run([sys.executable, "-m", "tiny_imagegen", "serve", "--host", "0.0.0.0", "--output",
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--token" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- OpenAI's route ---------------------------------------------------------------------------

def test_generations_b64_is_the_commands_png(client, tmp_path):
    r = client.post("/v1/images/generations", json={
        "model": "dall-e-3", "prompt": "a red circle", "n": 2, "size": "32x32", "seed": 5, "steps": 2,
        "quality": "hd", "style": "vivid", "user": "someone"})  # OpenAI's fields we do not use: ignored
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    served = [base64.b64decode(d["b64_json"]) for d in body["data"]]
    expected = command_png(tmp_path, "--prompt", "a red circle", "--n-images", 2, "--width", 32, "--height", 32,
                           "--seed", 5, "--steps", 2)
    assert served == expected  # byte for byte: pixels and metadata


def test_generations_url(client):
    r = client.post("/v1/images/generations", json={"prompt": "a blue square", "size": "32x32", "steps": 1,
                                                    "seed": 1, "response_format": "url"})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    image = client.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG") and b"a blue square" in image.content


# ---- jobs ---------------------------------------------------------------------------------------

def test_job_runs_with_events_in_order_and_the_model_stays_loaded(client):
    loads = client.app.state.pool.loads
    r = client.post("/api/jobs", json={"prompt": "a green triangle", "seed": 2, **FAST, "steps": 3})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    seen = events(client, job_id)
    names = [n for n, _ in seen]
    assert names[-1] == "done" and "started" in names
    assert names[names.index("started") + 1:] == ["step"] * 3 + ["done"]
    assert set(names[:names.index("started")]) <= {"queued"}
    steps = [d for n, d in seen if n == "step"]
    assert [(d["step"], d["total"]) for d in steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(d["preview"].startswith("data:image/png;base64,") for d in steps[1:])  # watched: previews
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["state"] == "done" and job["position"] is None
    (image,) = job["images"]
    assert image["parameters"]["prompt"] == "a green triangle" and image["parameters"]["seed"] == "2"
    png = client.get(image["url"])
    assert png.status_code == 200 and png.content == (client.app.state.config.output / image["name"]).read_bytes()
    assert "attachment" in client.get(image["url"] + "?download=1").headers["content-disposition"]
    assert client.app.state.pool.loads == loads  # no reload: the model stayed loaded
    listed = client.get("/api/images").json()
    assert image["name"] in [i["name"] for i in listed]
    assert any(j["id"] == job_id for j in client.get("/api/jobs").json())


def test_cancel_a_running_job_stops_it_and_frees_its_memory(client):
    done = wait(client, client.post("/api/jobs", json={"prompt": "a red circle", "seed": 0, **FAST}).json()["id"])
    baseline = done["active_memory"]
    job_id = client.post("/api/jobs", json={"prompt": "a red circle", "seed": 9, **FAST, "steps": 100}).json()["id"]
    seen = events(client, job_id, until=lambda n, d: n == "step" and d["step"] >= 2)
    assert client.delete(f"/api/jobs/{job_id}").status_code == 202
    rest = [n for n, _ in events(client, job_id)]
    assert rest[-1] == "cancelled"
    job = wait(client, job_id)
    assert job["state"] == "cancelled" and job["images"] == []
    assert job["active_memory"] <= baseline * 1.05, (job["active_memory"], baseline)  # its arrays are freed
    assert job["progress"]["step"] < 100  # stopped at the next step, not run to the end
    assert not list(client.app.state.config.output.glob(f"{job_id}*"))  # nothing written
    assert client.delete(f"/api/jobs/{job_id}").status_code == 409  # already cancelled
    after = wait(client, client.post("/api/jobs", json={"prompt": "a red circle", "seed": 1, **FAST}).json()["id"])
    assert after["state"] == "done" and after["active_memory"] <= baseline * 1.05, (after, baseline)
    assert seen[-1][1]["step"] >= 2


def test_cancel_a_queued_job_and_the_queue_limit(tmp_path):
    with make_client(tmp_path, limits={"queue": 2}) as c:
        running = c.post("/api/jobs", json={"prompt": "a red circle", **FAST, "steps": 100}).json()["id"]
        events(c, running, until=lambda n, d: n == "step")  # it runs: the queue is empty again
        queued = [c.post("/api/jobs", json={"prompt": "a red circle", "seed": i, **FAST}) for i in range(2)]
        assert [r.status_code for r in queued] == [202, 202]
        assert [c.get(f"/api/jobs/{r.json()['id']}").json()["position"] for r in queued] == [1, 2]
        full = c.post("/api/jobs", json={"prompt": "a red circle", **FAST})
        assert full.status_code == 429 and full.headers["retry-after"]
        assert full.json()["error"]["type"] == "rate_limit_error" and "queue is full" in full.json()["error"]["message"]
        first = queued[0].json()["id"]
        assert c.delete(f"/api/jobs/{first}").status_code == 202
        assert c.get(f"/api/jobs/{first}").json()["state"] == "cancelled"  # at once: it never ran
        assert c.get(f"/api/jobs/{queued[1].json()['id']}").json()["position"] == 1
        assert c.post("/api/jobs", json={"prompt": "a red circle", **FAST}).status_code == 202  # room again
        c.delete(f"/api/jobs/{running}")
        assert wait(c, running)["state"] == "cancelled"
        assert wait(c, queued[1].json()["id"])["state"] == "done"


# ---- security -----------------------------------------------------------------------------------

def test_token_guards_every_route_but_the_page(tmp_path):
    token = "s3cret-token-for-tests"
    with make_client(tmp_path, token=token, loopback_only=False) as c:
        for path in ("/api/models", "/api/images", "/api/jobs", "/openapi.json", "/v1/models", "/api/images/x.png"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", path
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
        assert c.get("/api/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert c.get("/").status_code == 200 and "<form" in c.get("/").text
        assert c.get("/static/app.js").status_code == 200
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "32x32", "steps": 1},
                   headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text


def test_without_a_token_the_server_answers_only_to_loopback_names(client):
    assert client.get("/api/models").status_code == 200  # no token needed on 127.0.0.1
    r = client.get("/api/models", headers={"Host": "evil.example:8000"})  # a DNS-rebinding page
    assert r.status_code == 421
    assert client.get("/api/models", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/api/models", headers={"Host": "[::1]:8000"}).status_code == 200


def test_no_request_reaches_outside_the_output_folder(client):
    output = client.app.state.config.output
    (output.parent / "secret.png").write_bytes(b"\x89PNG secret")
    for name in ("..%2Fsecret.png", "%2e%2e%2fsecret.png", "..%5Csecret.png", "%2Fetc%2Fpasswd", ".hidden.png",
                 "..", "secret.png"):
        r = client.get(f"/api/images/{name}")
        assert r.status_code == 404 and b"PNG secret" not in r.content, name
    r = client.post("/api/jobs", json={"prompt": "x", "model": str(ROOT / "weights" / "tiny-shapes")})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"  # a path is not a model


# ---- bad requests: a 4xx with a message, never a 500 ----------------------------------------------

BAD = {
    "not json": ("/api/jobs", b"{prompt", 400),
    "json array": ("/api/jobs", [1, 2], 400),
    "empty prompt": ("/api/jobs", {"prompt": "  "}, 400),
    "no prompt": ("/v1/images/generations", {"size": "32x32"}, 400),
    "prompt too long": ("/api/jobs", {"prompt": "x" * 2001}, 400),
    "prompt not a string": ("/api/jobs", {"prompt": 5}, 400),
    "n zero": ("/v1/images/generations", {"prompt": "x", "n": 0}, 400),
    "n too many": ("/v1/images/generations", {"prompt": "x", "n": 50}, 400),
    "size not WxH": ("/v1/images/generations", {"prompt": "x", "size": "large"}, 400),
    "size too big": ("/v1/images/generations", {"prompt": "x", "size": "8192x8192"}, 400),
    "width not a multiple of 16": ("/api/jobs", {"prompt": "x", "width": 40}, 400),
    "steps zero": ("/api/jobs", {"prompt": "x", "steps": 0}, 400),
    "steps too many": ("/api/jobs", {"prompt": "x", "steps": 100000}, 400),
    "steps a string": ("/api/jobs", {"prompt": "x", "steps": "ten"}, 400),
    "steps a bool": ("/api/jobs", {"prompt": "x", "steps": True}, 400),
    "seed negative": ("/api/jobs", {"prompt": "x", "seed": -1}, 400),
    "seed fractional": ("/api/jobs", {"prompt": "x", "seed": 1.5}, 400),
    "guidance a string": ("/api/jobs", {"prompt": "x", "guidance": "high"}, 400),
    "unknown sampler": ("/api/jobs", {"prompt": "x", "sampler": "magic"}, 400),
    "unknown model": ("/v1/images/generations", {"prompt": "x", "model": "flux3-turbo"}, 404),
    "model not downloaded": ("/api/jobs", {"prompt": "x", "model": "flux1-dev"}, 404),
    "lora without a folder": ("/api/jobs", {"prompt": "x", "lora": ["a.safetensors"]}, 400),
    "response format": ("/v1/images/generations", {"prompt": "x", "response_format": "jpeg"}, 400),
    "modulation bits without quantize": ("/api/jobs", {"prompt": "x", "modulation_bits": 8}, 400),
    "guidance not finite": ("/api/jobs", b'{"prompt": "x", "guidance": NaN}', 400),
    "lone surrogate": ("/v1/images/generations", b'{"prompt": "a \\ud800 circle"}', 400),
    "body too big": ("/api/jobs", {"prompt": "x", "pad": "y" * (1 << 20)}, 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_a_4xx_with_a_message(client, case):
    path, body, status = BAD[case]
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["message"] and error["type"] and set(error) == {"message", "type", "param", "code"}


def test_other_bad_requests(client):
    r = client.post("/api/jobs", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415  # also what keeps other sites' forms out
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.delete("/api/jobs/nope").status_code == 404
    assert client.get("/api/nothing").status_code == 404
    assert client.put("/api/jobs").status_code == 405
    # what only the loaded model can refuse: the job ends in an error with the message
    job = client.post("/api/jobs", json={"prompt": "x", "sampler": "euler", **FAST}).json()
    done = wait(client, job["id"])
    assert done["state"] == "error" and "--sampler is not an option" in done["error"]
    r = client.post("/v1/images/generations", json={"prompt": "x", "sampler": "euler", "size": "32x32"})
    assert r.status_code == 200  # OpenAI's route takes only its fields (and ours it documents): sampler ignored


def test_models_and_openapi(client):
    models = client.get("/api/models").json()
    tiny = next(m for m in models["models"] if m["name"] == "tiny-shapes")
    assert tiny["here"] == "shipped" and tiny["runnable"] and tiny["loaded"]
    assert any(not m["runnable"] for m in models["models"])  # the big ones are not downloaded here
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-shapes"]
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/v1/images/generations" in spec["paths"]
    assert spec["components"]["schemas"]["JobRequest"]["properties"]["steps"]["maximum"] == 100


# ---- the model pool -----------------------------------------------------------------------------

def test_pool_keeps_models_loaded_and_evicts_the_least_recently_used():
    require_serve()
    from tiny_imagegen.commands.generate import build_parser
    from tiny_imagegen.serve.pool import ModelPool, resident_bytes

    fp32, bf16 = build_parser().parse_args([]), build_parser().parse_args(["--dtype", "bfloat16"])
    pool = ModelPool(budget=1 << 30)
    a = pool.get(fp32)
    assert pool.get(fp32) is a and pool.loads == 1  # kept: no reload
    size = resident_bytes(a)
    pool.get(bf16)
    assert [m["dtype"] for m in pool.loaded()] == ["auto", "bfloat16"]  # both fit a large budget
    pool.get(fp32)  # used last: bf16 is now the least recently used
    pool.budget = 2 * size + 1  # room for two fp32 pipelines, not for two and the bf16 one
    pool.get(build_parser().parse_args(["--dtype", "float32"]))  # another key, the size of the first
    assert [m["dtype"] for m in pool.loaded()] == ["auto", "float32"]  # the least recently used went
    assert pool.used() <= pool.budget and pool.loads == 3
    pool.budget = size  # one model larger than what is left still runs, alone
    pool.get(bf16)
    assert [m["dtype"] for m in pool.loaded()] == ["bfloat16"]


def test_any_json_body_is_accepted_or_a_request_error(tmp_path_factory):
    """The validation, fuzzed: whatever JSON arrives, the fields either become generate's arguments
    or one RequestError with a 4xx status and a message (never another exception: a 500)."""
    require_serve()
    require_modules("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    from tiny_imagegen.serve.params import FIELDS, Limits, RequestError, generate_arguments

    output = tmp_path_factory.mktemp("fuzz")
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=30) \
        | st.text(st.characters(codec=None, categories=["Cs", "Cc", "Lo"]), max_size=4)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                          max_leaves=6)
    keys = st.sampled_from(sorted(FIELDS)) | st.text(max_size=8)
    interesting = {"width": st.integers(-64, 2048), "height": st.integers(-64, 2048), "steps": st.integers(-3, 200),
                   "n": st.integers(-2, 9), "seed": st.integers(-5, 2**64)}
    bodies = st.dictionaries(keys, values, max_size=6) | st.fixed_dictionaries(
        {"prompt": st.text(max_size=40)}, optional={k: v | values for k, v in interesting.items()}) | values

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(bodies)
    def check(body):
        try:
            generate_arguments(body, limits=Limits(), output=output, models={"tiny-shapes": "tiny-shapes"},
                               default_model="tiny-shapes")
        except RequestError as e:
            assert 400 <= e.status < 500 and e.message

    check()


def test_a_long_running_server_forgets_old_jobs_and_their_previews(monkeypatch):
    require_serve()
    from tiny_imagegen.serve import jobs as jobs_module
    from tiny_imagegen.serve.jobs import Job, Worker

    monkeypatch.setattr(jobs_module, "KEEP_JOBS", 3)
    monkeypatch.setattr(jobs_module, "KEEP_PREVIEWS", 1)
    worker = Worker(pool=None, max_queue=4)
    try:
        for i in range(5):
            job = Job(str(i), None, None, [], {}, state="done",
                      events=[{"type": "step", "step": 1, "total": 1, "preview": "data:..."}, {"type": "done"}])
            worker.jobs[job.id] = job
        worker.jobs["running"] = Job("running", None, None, [], {}, state="running")
        worker._forget_old()
        assert list(worker.jobs) == ["2", "3", "4", "running"]  # the last 3 finished, and the running one
        assert ["preview" in j.events[0] for j in list(worker.jobs.values())[:3]] == [False, False, True]
    finally:
        worker.stop()


def tiny_lora(path: Path) -> Path:
    """A rank-2 LoRA on every linear of the shipped model, with random B so that it shows."""
    import mlx.core as mx

    from tiny_imagegen.pipelines.pipeline import Pipeline
    from tiny_imagegen.train.lora import add_lora, lora_layers, save_lora

    transformer = Pipeline.from_pretrained("tiny-shapes").transformer
    add_lora(transformer, rank=2, targets=(r".*",))
    for layer in lora_layers(transformer).values():
        layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape, key=mx.random.key(0))
    return save_lora(transformer, path)


def test_lora_from_the_lora_folder_only(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    lora = tiny_lora(loras / "wobble.safetensors")
    with make_client(tmp_path, lora_dir=loras) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "32x32", "steps": 2, "seed": 4,
                                                   "lora": ["wobble.safetensors:0.8"]})
        assert r.status_code == 200, r.text
        served = base64.b64decode(r.json()["data"][0]["b64_json"])
        assert served == command_png(tmp_path, "--prompt", "a red circle", "--width", 32, "--height", 32,
                                     "--steps", 2, "--seed", 4, "--lora", f"{lora}:0.8")[0]
        plain = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "32x32", "steps": 2,
                                                       "seed": 4}).json()["data"][0]["b64_json"]
        assert base64.b64decode(plain) != served
        for bad in (["../wobble.safetensors"], ["/etc/passwd"], ["missing.safetensors"], [{"name": "wobble.safetensors",
                                                                                           "weight": "x"}], "wobble"):
            r = c.post("/api/jobs", json={"prompt": "x", "lora": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora", (bad, r.text)
