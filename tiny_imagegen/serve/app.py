"""The routes: OpenAI's images API, our job API, the images, the models, the page.

    POST   /v1/images/generations  OpenAI's shape; waits for the image(s)
    POST   /v1/images/edits        OpenAI's shape (multipart: image, mask, prompt, ...): inpainting,
                                   reference editing or image-to-image; waits for the image(s)
    GET    /v1/models              the models this server can run, OpenAI's list shape
    POST   /api/jobs               queue a job (generate's parameters) -> 202 {id, position}; as the
                                   edits route's multipart form: an edit job (the page's uploads)
    GET    /api/jobs/{id}          state, queue position, progress, images
    GET    /api/jobs/{id}/events   server-sent events: queued, started, step (+ preview), done | error | cancelled
    DELETE /api/jobs/{id}          cancel: off the queue, or stopped at the next step
    GET    /api/images             the output folder's images, newest first, with their parameters
    GET    /api/images/{name}      one PNG (its parameters in its text chunks); ?download=1 to save
    GET    /api/models             the registry with each model's cache state and whether it is loaded
    GET    /openapi.json           this API described
    GET    /, /static/...          the page (never behind the token: it asks for it)

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status for
anything the request got wrong. `Guard` is the outermost layer: the Host check (loopback servers
answer only to loopback names, against DNS rebinding), the bearer token, the body size.
"""

import asyncio
import base64
import hmac
import json
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .jobs import FINAL, Job, QueueFull, Worker
from .openapi import openapi
from .params import Limits, RequestError, generate_arguments, job_arguments, parse_size, typed, validate
from . import uploads
from .edits import EDIT_FIELDS, attach, cross_site, form_fields
from .pool import ModelPool

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
OPENAI_MODELS = re.compile(r"^(dall-e-\d|gpt-image-.*)$")  # OpenAI's names: the server's default model
EDITS = "/v1/images/edits"
IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png$")


@dataclass
class Config:
    output: Path
    default_model: str = "tiny-shapes"
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    memory_budget: int = 8 << 30
    lora_dir: Path | None = None
    keep_text_encoders: bool = False
    loopback_only: bool = True  # answer only Host: 127.0.0.1 / localhost / [::1]


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Guard:
    """ASGI middleware: Host, bearer token (all routes but the page's files), body size."""

    def __init__(self, app, config: Config):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        response = None
        host = headers.get("host", "")
        host = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        if self.config.loopback_only and host not in LOOPBACK_NAMES:
            response = error(421, f"this server answers only to {', '.join(LOOPBACK_NAMES)} (Host: {host!r:.60})")
        elif self.config.token and not (path == "/" or path.startswith("/static/")):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.config.token}".encode()):
                response = error(401, "missing or wrong bearer token: send Authorization: Bearer <token>",
                                 kind="authentication_error", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
        limit = body_limit(self.config.limits, path)
        if response is None and headers.get("content-length", "0").isdigit() and \
                int(headers.get("content-length", "0")) > limit:
            response = error(413, f"the request body is over {limit} bytes")
        if response is not None:
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def body_limit(limits: Limits, path: str) -> int:
    """Bytes a request body may have: the routes that take an edit's images, or JSON."""
    return limits.upload_bytes if path in (EDITS, "/api/jobs") else limits.body_bytes


async def read_body(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes also when it comes in chunks (no Content-Length)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the request body is over {limit} bytes", status=413)
    return bytes(body)


async def read_json(request: Request, limit: int):
    """The body as JSON: at most `limit` bytes (also when sent in chunks), a JSON content type."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        # also what stops a page on another site from posting here without a CORS preflight
        raise RequestError(f"send the parameters as JSON (Content-Type: application/json), not {media or 'nothing'}",
                           status=415)
    body = await read_body(request, limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from None


def available_models() -> dict[str, dict]:
    """Registered models -> {family, here (cache state)}; read on each /api/models."""
    from .. import registry
    from ..commands.models import availability

    return {spec.name: {"spec": spec, "here": availability(spec)} for spec in registry.MODELS}


def runnable(models: dict[str, dict]) -> dict[str, str]:
    """Name or alias -> name, for the models whose weights are here (a request never downloads)."""
    out = {}
    for name, m in models.items():
        if m["here"] in ("shipped", "cached", "converted in weights/"):
            out.update({alias: name for alias in (name, *m["spec"].aliases)})
    return out


def create_app(config: Config) -> Starlette:
    config.output.mkdir(parents=True, exist_ok=True)
    pool = ModelPool(config.memory_budget, config.keep_text_encoders)
    worker = Worker(pool, config.limits.queue)
    state = {"models": available_models()}

    def submit(fields: dict, prepared=None) -> Job:
        """Queue a job for the fields (or the `prepared` (name, args, jobs, paths, edit) of them)."""
        name, args, jobs, paths, edit = prepared or generate_arguments(
            fields, limits=config.limits, output=config.output, models=runnable(state["models"]),
            default_model=config.default_model, lora_dir=config.lora_dir)
        job = Job(name, args, jobs[0], paths, {k: v for k, v in fields.items() if v is not None}, edit=edit)
        try:
            worker.submit(job)
        except QueueFull as e:
            raise RequestError(str(e), status=429, kind="rate_limit_error") from None
        return job

    def find_job(request: Request) -> Job:
        job = worker.jobs.get(request.path_params["id"])
        if job is None:
            raise RequestError(f"no job {request.path_params['id']!r:.40}", "id", status=404, kind="not_found_error")
        return job

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def openapi_json(request: Request):
        return JSONResponse(openapi(config))

    def openai_fields(body: dict, keys: tuple) -> tuple[dict, str]:
        """OpenAI's fields -> (our job fields, response_format); OpenAI's model names mean ours by default."""
        response_format = body.get("response_format") or "b64_json"
        if response_format not in ("b64_json", "url"):
            raise RequestError(f"response_format: {response_format!r:.40} is not 'b64_json' or 'url'", "response_format")
        model = body.get("model")
        width, height = parse_size(body.get("size"))
        fields = {k: body.get(k) for k in keys}
        fields.update(width=width, height=height,
                      model=None if model is None or (isinstance(model, str) and OPENAI_MODELS.match(model)) else model)
        return fields, response_format

    async def generations(request: Request):
        body = await read_json(request, config.limits.body_bytes)
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        fields, response_format = openai_fields(
            body, ("prompt", "n", "seed", "steps", "guidance", "negative_prompt", "lora"))
        return await respond(request, submit(fields), response_format)

    async def respond(request: Request, job: Job, response_format: str):
        """Wait for the job; OpenAI's response: its images as base64 or URLs."""
        while job.state not in FINAL:
            if await request.is_disconnected():
                worker.cancel(job)
                return Response(status_code=499)
            await asyncio.sleep(0.05)
        if job.state == "cancelled":
            return error(409, f"job {job.id} was cancelled", code="cancelled")
        if job.state == "error":
            return error(400 if job.error_kind == "usage" else 500, job.error,
                         kind="invalid_request_error" if job.error_kind == "usage" else "server_error")
        data = []
        for image in job.images:
            if response_format == "url":
                data.append({"url": str(request.url_for("image", name=image["name"]))})
            else:
                data.append({"b64_json": base64.b64encode((config.output / image["name"]).read_bytes()).decode()})
        return JSONResponse({"created": int(job.created), "data": data})

    async def edit_job(request: Request) -> tuple[Job, str]:
        """A multipart edit (edits.py): the form's fields checked as a job's, then its images -> the
        queued job and the response_format asked for."""
        problem = cross_site(request.headers)
        if problem:
            raise RequestError(problem, status=403, kind="permission_error")
        form = uploads.parse_form(await read_body(request, config.limits.upload_bytes),
                                  request.headers.get("content-type", ""))
        fields, response_format = openai_fields(form_fields(form.fields), EDIT_FIELDS)
        if not form.files.get("image") and not form.files.get("image[]"):
            raise RequestError("image: missing, send the image to edit as a file field 'image'", "image")
        # the other fields first, as the command checks them (no image read yet)
        name, args = job_arguments(fields, limits=config.limits, output=config.output,
                                   models=runnable(state["models"]), default_model=config.default_model)
        if fields.get("strength") is not None:  # generate's --strength (a job of /api/jobs has no image)
            args.strength = typed("strength", fields["strength"], float)
        validate(args)
        attach(form, args, config.limits.side, config.output / "inputs")
        return submit(fields, (name, args, *validate(args))), response_format

    async def edits(request: Request):
        return await respond(request, *(await edit_job(request)))

    async def openai_models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tiny_imagegen"}
            for name in dict.fromkeys(runnable(state["models"]).values())]})

    async def create_job(request: Request):
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            job, _ = await edit_job(request)  # an edit, as the page sends it: its events as any job's
        else:
            job = submit(await read_json(request, config.limits.body_bytes))
        return JSONResponse({"id": job.id, "state": job.state, "position": worker.position(job),
                             "events": f"/api/jobs/{job.id}/events"}, status_code=202)

    async def list_jobs(request: Request):
        return JSONResponse([job.summary(worker.position(job)) for job in list(worker.jobs.values())[-100:]])

    async def get_job(request: Request):
        job = find_job(request)
        return JSONResponse(job.summary(worker.position(job)))

    async def cancel_job(request: Request):
        job = find_job(request)
        if job.state in FINAL:
            raise RequestError(f"job {job.id} is already {job.state}", "id", status=409)
        worker.cancel(job)
        return JSONResponse({"id": job.id, "state": job.state if job.state != "running" else "cancelling"},
                            status_code=202)

    async def events(request: Request):
        job = find_job(request)
        job.watchers += 1

        async def stream():
            sent, quiet = 0, time.monotonic()
            try:
                while True:
                    while sent < len(job.events):
                        event = job.events[sent]
                        sent += 1
                        if event["type"] == "queued":  # the position now, not at submission
                            event = {**event, "position": worker.position(job)} if job.state == "queued" else None
                        if event is not None:
                            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                        if job.events[sent - 1]["type"] in FINAL:
                            return
                        quiet = time.monotonic()
                    if time.monotonic() - quiet > 15:
                        yield ": keep-alive\n\n"
                        quiet = time.monotonic()
                    await asyncio.sleep(0.05)
            finally:
                job.watchers -= 1

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def image_path(name: str) -> Path:
        """A file directly in the output folder, or a 404: no request reaches anywhere else."""
        folder = config.output.resolve()
        path = (folder / name).resolve() if IMAGE_NAME.match(name) else None
        if path is None or path.parent != folder or not path.is_file():
            raise RequestError(f"no image {name!r:.80}", "name", status=404, kind="not_found_error")
        return path

    async def image(request: Request):
        path = image_path(request.path_params["name"])
        attachment = request.query_params.get("download") not in (None, "", "0")
        return FileResponse(path, media_type="image/png", filename=path.name if attachment else None)

    async def list_images(request: Request):
        from ..commands.metadata import read_parameters

        out = []
        for path in sorted(config.output.glob("*.png"), key=lambda p: p.stat().st_mtime, reverse=True)[:100]:
            try:
                out.append({"name": path.name, "url": f"/api/images/{path.name}",
                            "parameters": read_parameters(path)})
            except ValueError:
                continue
        return JSONResponse(out)

    async def models(request: Request):
        state["models"] = available_models()
        loaded = {m["model"] for m in pool.loaded()}
        return JSONResponse({"default": config.default_model, "memory_budget": config.memory_budget,
                             "loaded": pool.loaded(), "models": [
            {"name": name, "family": m["spec"].family, "description": m["spec"].description,
             "licence": m["spec"].licence, "aliases": list(m["spec"].aliases), "here": m["here"],
             "runnable": name in runnable(state["models"]).values(), "loaded": name in loaded,
             "defaults": {"width": m["spec"].defaults.width, "height": m["spec"].defaults.height,
                          "steps": m["spec"].defaults.steps, "guidance": m["spec"].defaults.guidance}}
            for name, m in state["models"].items()]})

    async def request_error(request: Request, exc: RequestError):
        return error(exc.status, exc.message, exc.kind, exc.param,
                     headers={"Retry-After": "5"} if exc.status == 429 else None)

    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, exc.detail or "error", "not_found_error" if exc.status_code == 404
                     else "invalid_request_error", headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception):
        return error(500, f"{type(exc).__name__}: {exc}", "server_error")

    @asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = Starlette(routes=[
        Route("/", page),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/openapi.json", openapi_json),
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route(EDITS, edits, methods=["POST"]),
        Route("/v1/models", openai_models),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs/{id}", get_job, methods=["GET"]),
        Route("/api/jobs/{id}", cancel_job, methods=["DELETE"]),
        Route("/api/jobs/{id}/events", events),
        Route("/api/images", list_images),
        Route("/api/images/{name}", image, name="image"),
        Route("/api/models", models),
    ], exception_handlers={RequestError: request_error, HTTPException: http_error,
                                   Exception: server_error}, lifespan=lifespan)
    app.state.worker, app.state.pool, app.state.config = worker, pool, config
    app.add_middleware(Guard, config=config)
    return app
