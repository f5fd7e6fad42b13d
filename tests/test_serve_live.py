"""`tiny-imagegen serve` on a real port (uvicorn): the `openai` package draws with it, and 40 jobs
from 8 client threads all finish, each image once, in order per client, with flat memory."""

import base64
import threading
import time
from pathlib import Path

import pytest

from conftest import require_modules
from serve_helpers import live_server, require_serve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_serve()
    from tiny_imagegen.serve.app import Config
    from tiny_imagegen.serve.params import Limits

    config = Config(output=tmp_path_factory.mktemp("live"), limits=Limits(queue=64), memory_budget=1 << 30)
    with live_server(config) as (url, app):
        yield url, app


def test_the_openai_client_draws(server, tmp_path):
    require_modules("openai")
    import openai

    url, app = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-without-a-token", max_retries=0, timeout=120)
    result = client.images.generate(model="tiny-shapes", prompt="a red circle", size="32x32", n=1,
                                    response_format="b64_json", extra_body={"seed": 11, "steps": 2})
    png = base64.b64decode(result.data[0].b64_json)
    from tiny_imagegen.commands.generate import main

    assert main(["--prompt", "a red circle", "--width", "32", "--height", "32", "--seed", "11", "--steps", "2",
                 "--output", str(tmp_path / "cmd.png")]) == 0
    assert png == (tmp_path / "cmd.png").read_bytes()
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="a red circle", size="huge")
    assert [m.id for m in client.models.list()] == ["tiny-shapes"]


def test_the_openai_client_inpaints(server, tmp_path):
    """client.images.edit: the package's own multipart upload, with OpenAI's transparent mask."""
    require_modules("openai")
    import hashlib

    import numpy as np
    import openai
    from PIL import Image

    url, app = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused-without-a-token", max_retries=0, timeout=120)
    image = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[:16] = 0  # the top half: edit
    mask = Image.new("RGBA", (32, 32))
    mask.putalpha(Image.fromarray(alpha))
    files = {name: (f"{name}.png", _png(im), "image/png") for name, im in (("image", image), ("mask", mask))}
    result = client.images.edit(image=files["image"], mask=files["mask"], prompt="a blue square",
                                extra_body={"seed": 3, "steps": 2, "strength": 1.0})
    served = base64.b64decode(result.data[0].b64_json)
    kept = app.state.config.output / "inputs"
    ours = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")  # white = repaint
    mask_path = kept / f"{hashlib.sha256(_png(ours)).hexdigest()}.png"
    image_path = kept / f"{hashlib.sha256(files['image'][1]).hexdigest()}.png"
    from tiny_imagegen.commands.generate import main

    assert main(["--prompt", "a blue square", "--image", str(image_path), "--mask", str(mask_path), "--strength", "1",
                 "--seed", "3", "--steps", "2", "--output", str(tmp_path / "cmd.png")]) == 0
    assert served == (tmp_path / "cmd.png").read_bytes()
    with pytest.raises(openai.BadRequestError, match="mask is 16x16 but image is 32x32"):
        client.images.edit(image=files["image"], mask=("m.png", _png(mask.resize((16, 16))), "image/png"), prompt="x")


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_forty_jobs_from_eight_clients(server):
    import httpx

    url, app = server
    output = app.state.config.output
    before = {p.name for p in output.iterdir()}
    submitted: dict[int, list[str]] = {}
    failures = []

    def client(k: int):
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                ids = []
                for j in range(5):
                    r = http.post("/api/jobs", json={"prompt": ["a red circle", "a blue square"][j % 2],
                                                     "seed": 100 * k + j, "steps": 1, "width": 16, "height": 16})
                    r.raise_for_status()
                    ids.append(r.json()["id"])
                submitted[k] = ids
        except Exception as e:  # reported in the main thread
            failures.append(f"client {k}: {e!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    ids = [i for k in range(8) for i in submitted[k]]
    assert len(set(ids)) == 40

    deadline = time.monotonic() + 300
    jobs = {}
    with httpx.Client(base_url=url, timeout=60) as http:  # polled gently: the worker shares the CPU
        while len(jobs) < len(ids) and time.monotonic() < deadline:
            for i in ids:
                if i not in jobs:
                    job = http.get(f"/api/jobs/{i}").json()
                    if job["state"] not in ("queued", "running"):
                        jobs[i] = job
                    else:
                        break  # the rest next round
            time.sleep(0.5)
    assert len(jobs) == 40 and all(j["state"] == "done" for j in jobs.values()), \
        [j for j in jobs.values() if j["state"] != "done"]
    names = [image["name"] for j in jobs.values() for image in j["images"]]
    assert len(names) == 40 and len(set(names)) == 40  # each image exactly once
    assert {p.name for p in output.iterdir()} - before == set(names)  # and no temporary file left
    worker = app.state.worker
    for k in range(8):  # one worker, jobs in order: each client's jobs finish in the order it sent them
        order = [worker.jobs[i].finished_seq for i in submitted[k]]
        assert order == sorted(order), (k, order)
    for i in ids:  # the right image for each job
        job = jobs[i]
        assert job["images"][0]["parameters"]["seed"] == str(job["parameters"]["seed"])
    by_finish = sorted(jobs.values(), key=lambda j: worker.jobs[j["id"]].finished_seq)
    tenth, fortieth = by_finish[9], by_finish[39]
    print(f"peak memory: job 10 {tenth['peak_memory'] / 2**20:.2f} MiB, job 40 {fortieth['peak_memory'] / 2**20:.2f} MiB; "
          f"after the job: {tenth['active_memory'] / 2**20:.2f} / {fortieth['active_memory'] / 2**20:.2f} MiB")
    assert fortieth["peak_memory"] <= tenth["peak_memory"] * 1.05 and tenth["peak_memory"] <= fortieth["peak_memory"] * 1.05
    assert fortieth["active_memory"] <= tenth["active_memory"] * 1.02 + (1 << 20)
    assert app.state.pool.loads == 1  # one model, loaded once for all 41 jobs


def test_the_command_serves(tmp_path):
    """`tiny-imagegen serve` itself: it starts, answers, and stops on Ctrl-C."""
    require_serve()
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tiny_imagegen", "serve", "--port", str(port), "--output",
                             str(tmp_path / "out"), "--max-steps", "8"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["paths"]
        r = httpx.post(f"http://127.0.0.1:{port}/api/jobs", json={"prompt": "a red circle", "steps": 9})
        assert r.status_code == 400 and "1 to 8" in r.json()["error"]["message"]  # --max-steps
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    assert "http://127.0.0.1:" in err and "no token" in err and "Traceback" not in err, err
