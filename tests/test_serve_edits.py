"""POST /v1/images/edits in process on the shipped tiny model (FLUX.1, which inpaints): the
inpainted image is the bytes `generate --image --mask` writes, OpenAI's transparent mask is our
white one, uploads stay in memory until checked and are kept only in the output folder, and bad
uploads are 400s in OpenAI's error shape with the command's message."""

import base64
import hashlib
import io
import json
import zlib

import numpy as np
import pytest

from serve_helpers import require_serve
from test_serve import command_png, make_client

EDIT = {"prompt": "a red circle", "seed": "7", "steps": "2"}


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(size=(32, 32)):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def square(size=32):
    """(size, size) bool: the middle square, the part to repaint."""
    m = np.zeros((size, size), bool)
    m[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    return m


def grey_mask(size=32):
    from PIL import Image

    return Image.fromarray(square(size).astype(np.uint8) * 255, mode="L")  # ours: white = repaint


def openai_mask(size=32):
    """OpenAI's convention: an RGBA image, fully transparent (alpha 0) where to edit."""
    from PIL import Image

    rgba = np.full((size, size, 4), 200, np.uint8)
    rgba[..., 3] = np.where(square(size), 0, 255)
    return Image.fromarray(rgba, mode="RGBA")


def edit(client, data=EDIT, **files):
    return client.post("/v1/images/edits", data=data,
                       files={k: (f"{k}.png", v, "image/png") for k, v in files.items()})


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    require_serve()
    with make_client(tmp_path_factory.mktemp("serve-edits")) as c:
        yield c


def served_png(response) -> bytes:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 1
    return base64.b64decode(data[0]["b64_json"])


def test_inpainting_is_the_commands_png(client, tmp_path):
    from PIL import Image

    from tiny_imagegen.commands.metadata import read_parameters

    image = png(picture())
    served = served_png(edit(client, {**EDIT, "model": "dall-e-2", "user": "someone"}, image=image,
                             mask=png(grey_mask())))
    (tmp_path / "served.png").write_bytes(served)
    meta = read_parameters(tmp_path / "served.png")
    out = client.app.state.config.output / "inputs"
    # the image kept as sent (its sha256 is the client's file's), the mask as the greyscale the command reads
    assert meta["image"] == str(out / f"{hashlib.sha256(image).hexdigest()}.png")
    assert meta["image_sha256"] == hashlib.sha256(image).hexdigest()
    assert np.array_equal(np.asarray(Image.open(meta["mask"])), np.asarray(grey_mask()))
    expected = command_png(tmp_path, "--prompt", "a red circle", "--image", meta["image"], "--mask", meta["mask"],
                           "--seed", 7, "--steps", 2)
    assert [served] == expected  # byte for byte: pixels and metadata (strength, paths, sha256)
    assert float(meta["strength"]) == 0.75 and (meta["width"], meta["height"]) == ("32", "32")


def test_openais_transparent_mask_is_our_white_mask(client, tmp_path):
    from PIL import Image

    image = png(picture())
    ours = served_png(edit(client, image=image, mask=png(grey_mask())))
    theirs = served_png(edit(client, image=image, mask=png(openai_mask())))
    assert ours == theirs  # the same mask file is kept for both, so the same bytes
    # an alpha channel that is opaque everywhere carries no OpenAI mask (it would edit nothing): ours
    opaque = grey_mask().convert("RGBA")
    assert served_png(edit(client, image=image, mask=png(opaque))) == ours
    # no mask: the image's own transparency is the mask (OpenAI's rule)
    rgba = picture().convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(square(), 0, 255).astype(np.uint8)))
    (tmp_path / "own.png").write_bytes(served_png(edit(client, image=png(rgba))))
    from tiny_imagegen.commands.metadata import read_parameters

    meta = read_parameters(tmp_path / "own.png")
    assert np.array_equal(np.asarray(Image.open(meta["mask"])), np.asarray(grey_mask()))


def test_the_same_form_to_api_jobs_is_a_job_with_steps(client):
    """The page's way: the edits form posted to /api/jobs queues a job (202) whose events show the
    steps, and its image is the edits route's for the same fields."""
    from test_serve import events, wait

    files = {"image": ("i.png", png(picture()), "image/png"), "mask": ("m.png", png(grey_mask()), "image/png")}
    r = client.post("/api/jobs", data=EDIT, files=files)
    assert r.status_code == 202, r.text
    job = wait(client, r.json()["id"])
    assert job["state"] == "done", job
    steps = [d["step"] for name, d in events(client, job["id"]) if name == "step"]
    assert steps == [1, 2]
    assert client.app.state.worker.jobs[job["id"]].edit.image is None  # a finished job holds no upload
    image = client.get(job["images"][0]["url"]).content
    assert image == served_png(client.post("/v1/images/edits", data=EDIT, files=files))
    r = client.post("/api/jobs", data=EDIT, files=files, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403, r.text


def test_an_image_alone_is_image_to_image_at_the_strength(client, tmp_path):
    image = png(picture())
    served = served_png(edit(client, {**EDIT, "strength": "0.5", "size": "32x32"}, image=image))
    (tmp_path / "i2i.png").write_bytes(served)
    from tiny_imagegen.commands.metadata import read_parameters

    meta = read_parameters(tmp_path / "i2i.png")
    assert "mask" not in meta and float(meta["strength"]) == 0.5
    assert [served] == command_png(tmp_path, "--prompt", "a red circle", "--image", meta["image"], "--strength", 0.5,
                                   "--width", 32, "--height", 32, "--seed", 7, "--steps", 2)


def bad(response, param, *words):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    assert "Traceback" not in error["message"] and "(uploaded" not in error["message"], error


def test_bad_uploads_are_400s_with_the_commands_message(client):
    from PIL import Image

    inputs = client.app.state.config.output / "inputs"
    before = sorted(inputs.iterdir()) if inputs.exists() else []
    image = png(picture())
    bad(edit(client, mask=png(grey_mask())), "image", "image: missing")
    bad(edit(client, image=image, mask=png(grey_mask(16))), "mask", "mask is 16x16 but image is 32x32")
    coloured = Image.fromarray(np.stack([square() * 255, square() * 0, square() * 255], -1).astype(np.uint8))
    bad(edit(client, image=image, mask=png(coloured)), "mask", "mask has colours")
    bad(edit(client, image=image, mask=png(Image.new("L", (32, 32)))), "mask", "all black")
    bad(edit(client, image=b"not an image"), "image", "not a readable image")
    bad(edit(client, {**EDIT, "steps": "two"}, image=image), "steps", "not a number")
    bad(edit(client, {**EDIT, "strength": "1.5"}, image=image), "strength", "strength")
    bad(edit(client, {"seed": "1"}, image=image), "prompt", "prompt")
    bad(edit(client, {**EDIT, "response_format": "gif"}, image=image), "response_format", "b64_json")
    big = png(picture((64, 48)))
    r = edit(client, {**EDIT, "size": "32x32"}, image=big, mask=png(grey_mask()))
    bad(r, "mask", "mask is 32x32 but image is 64x48")
    # nothing that failed was kept
    assert (sorted(inputs.iterdir()) if inputs.exists() else []) == before
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):  # another site's page
        r = client.post("/v1/images/edits", data=EDIT, files={"image": ("i.png", image, "image/png")}, headers=headers)
        assert r.status_code == 403 and "cross-site" in r.json()["error"]["message"], r.text
    r = client.post("/v1/images/edits", json={"prompt": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]["message"]


def test_a_model_without_inpainting_is_a_400(client, monkeypatch):
    from tiny_imagegen.pipelines.flux1 import Flux1Pipeline

    monkeypatch.setattr(Flux1Pipeline, "inpaint", False)  # the one model here, as a family that cannot
    bad(edit(client, image=png(picture()), mask=png(grey_mask())), "mask", "has no inpainting here")


def test_an_image_alone_is_a_reference_for_the_families_that_edit_from_references(client, monkeypatch):
    """Checked as the command checks --ref (the tiny model made to take references; a 32-pixel
    image is under the reference pipelines' 64-pixel minimum)."""
    from tiny_imagegen.pipelines.flux1 import Flux1Pipeline

    monkeypatch.setattr(Flux1Pipeline, "max_references", 1)
    r = edit(client, image=png(picture()))
    bad(r, "image", "image")
    assert "64" in r.json()["error"]["message"], r.text


def test_upload_bounds(tmp_path):
    require_serve()
    with make_client(tmp_path, limits={"upload_bytes": 4096, "side": 32}) as c:
        r = edit(c, image=png(picture((64, 64))))
        assert r.status_code == 413, r.text
        small = png(picture((48, 48)).quantize(2))  # a few hundred bytes, but larger than the side
        bad(edit(c, image=small), "image", "48x48", "at most 32")
        # a header that claims a huge image is refused before it is decoded
        from tiny_imagegen.serve import uploads

        small = png(picture((8, 8)))  # its IHDR made to claim 5000x5000 pixels (under PIL's own bomb limit), with a valid CRC
        ihdr = (5000).to_bytes(4, "big") * 2 + small[24:29]
        huge = small[:16] + ihdr + zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big") + small[33:]
        with pytest.raises(uploads.RequestError, match="pixels, this server reads at most"):
            uploads.decode(huge, "image")
    assert not any(p.suffix == ".tmp" for p in tmp_path.rglob("*"))


def test_the_form_is_parsed_in_memory(monkeypatch, client):
    """No part of the body reaches a temporary file (Starlette's form() would spool parts over 1 MB)."""
    import tempfile

    import starlette.formparsers

    def refuse(*a, **k):
        raise AssertionError("an upload went to a temporary file")

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", refuse)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", refuse)
    noise = png(picture((400, 400)))  # ~480 kB of incompressible pixels, three times in the body
    r = edit(client, {**EDIT, "size": "32x32", "extra": json.dumps({"x": 1})}, image=noise, mask=noise,
             other=noise)
    bad(r, "mask", "mask has colours")
