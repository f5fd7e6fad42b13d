"""The OpenAPI 3.1 description of the server (GET /openapi.json), written out rather than derived:
the request fields are params.py's FIELDS, checked by the command's own validation."""

from .. import __version__
from .params import CHOICES, FIELDS

TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array"}
ERROR = {"description": "an error, OpenAI's shape", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}


def job_fields(config) -> dict:
    limits = config.limits
    props = {}
    for name, (kind, _) in FIELDS.items():
        schema = {"type": TYPES[kind]}
        if name in CHOICES:
            schema["enum"] = list(CHOICES[name])
        if name == "lora":
            schema["items"] = {"oneOf": [{"type": "string", "description": "FILE.safetensors[:WEIGHT]"},
                                         {"type": "object", "properties": {"name": {"type": "string"},
                                                                            "weight": {"type": "number"}}}]}
            schema["description"] = "file names in the server's --lora-dir"
        props[name] = schema
    props["prompt"].update(maxLength=limits.prompt_chars)
    props["negative_prompt"].update(maxLength=limits.prompt_chars)
    props["n"].update(minimum=1, maximum=limits.images)
    props["steps"].update(minimum=1, maximum=limits.steps)
    for side in ("width", "height"):
        props[side].update(minimum=16, maximum=limits.side, multipleOf=16)
    props["model"]["description"] = f"a registered model whose weights are here (default {config.default_model})"
    props["seed"]["description"] = "the same seed gives the same image (default: random); image i uses seed + i"
    return {"type": "object", "required": ["prompt"], "properties": props}


def op(summary: str, responses: dict, body: dict | None = None, params: list | None = None) -> dict:
    out = {"summary": summary, "responses": responses}
    if body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        out["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    return out


def ok(description: str, media: str = "application/json") -> dict:
    return {"description": description, "content": {media: {}}}


def edits_op(config, errors: dict) -> dict:
    """OpenAI's edits: a multipart form (the files and the text fields)."""
    image = {"type": "string", "contentMediaType": "image/png"}
    form = {"type": "object", "required": ["image", "prompt"], "properties": {
        "image": {**image, "description": "the image to edit (PNG, JPEG, WebP); several as image[] are references "
                                          "(FLUX.2 klein, FLUX.1 Kontext)"},
        "mask": {**image, "description": "the image's size; OpenAI's convention where it has transparency "
                                         "(alpha 0 = edit), else ours: greyscale, white = repaint, black = keep"},
        "prompt": {"type": "string", "maxLength": config.limits.prompt_chars},
        "model": {"type": "string", "description": "a registered model that edits; OpenAI's names mean the default"},
        "n": {"type": "integer", "minimum": 1, "maximum": config.limits.images},
        "size": {"type": "string", "description": "WIDTHxHEIGHT; default the image's size"},
        "response_format": {"type": "string", "enum": ["b64_json", "url"], "default": "b64_json"},
        "strength": {"type": "number", "description": "how far from the image (0, 1], default 0.75"},
        "seed": {"type": "integer"}, "steps": {"type": "integer"}, "guidance": {"type": "number"},
        "negative_prompt": {"type": "string"}}, "additionalProperties": True}
    return {"summary": "edit or inpaint an image (waits for the result)",
            "responses": {"200": ok("{created, data: [{b64_json | url}]}"), **errors},
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


def jobs_op(config, errors: dict) -> dict:
    """POST /api/jobs: generate's parameters as JSON, or an edit as the edits route's form."""
    out = op("queue a job (JSON), or an edit job (the edits route's multipart form)",
             {"202": ok("{id, state, position, events}"), "403": ERROR, **errors},
             {"$ref": "#/components/schemas/JobRequest"})
    out["requestBody"]["content"].update(edits_op(config, errors)["requestBody"]["content"])
    return out


def openapi(config) -> dict:
    openai_body = {"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"type": "string", "maxLength": config.limits.prompt_chars},
        "model": {"type": "string", "description": "a registered model; OpenAI's names (dall-e-*, gpt-image-*) "
                                                   "mean the server's default"},
        "n": {"type": "integer", "minimum": 1, "maximum": config.limits.images},
        "size": {"type": "string", "example": "512x512", "description": "WIDTHxHEIGHT or auto"},
        "response_format": {"type": "string", "enum": ["b64_json", "url"], "default": "b64_json"},
        "seed": {"type": "integer"}, "steps": {"type": "integer"}, "guidance": {"type": "number"},
        "negative_prompt": {"type": "string"}}, "additionalProperties": True,
        "description": "OpenAI's fields; others (quality, style, user, ...) are ignored; seed, steps, guidance "
                       "and negative_prompt are this server's additions"}
    errors = {"400": ERROR, "401": ERROR, "404": ERROR, "413": ERROR, "415": ERROR, "429": ERROR}
    return {
        "openapi": "3.1.0",
        "info": {"title": "tiny-imagegen serve", "version": __version__,
                 "description": "Models kept loaded behind OpenAI's images API and a job queue."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]}}}}},
                "JobRequest": job_fields(config)}},
        "security": [{"bearer": []}] if config.token else [],
        "paths": {
            "/v1/images/generations": {"post": op("draw images (waits for them)", {
                "200": ok("{created, data: [{b64_json | url}]}"), **errors}, openai_body)},
            "/v1/images/edits": {"post": edits_op(config, errors)},
            "/v1/models": {"get": op("the models this server can run", {"200": ok("OpenAI's model list")})},
            "/api/jobs": {
                "post": jobs_op(config, errors),
                "get": op("the latest jobs", {"200": ok("a list of jobs")})},
            "/api/jobs/{id}": {
                "get": op("a job: state, queue position, progress, images", {"200": ok("the job"), "404": ERROR},
                          params=["id"]),
                "delete": op("cancel: off the queue, or stopped at the next step",
                             {"202": ok("{id, state}"), "404": ERROR, "409": ERROR}, params=["id"])},
            "/api/jobs/{id}/events": {"get": op(
                "server-sent events: queued, started, step {step, total, preview}, done | error | cancelled",
                {"200": ok("an event stream", "text/event-stream"), "404": ERROR}, params=["id"])},
            "/api/images": {"get": op("the output folder's images, newest first", {"200": ok("a list")})},
            "/api/images/{name}": {"get": op("one PNG with its parameters in its text chunks",
                                             {"200": ok("the image", "image/png"), "404": ERROR}, params=["name"])},
            "/api/models": {"get": op("the registry with cache state and what is loaded", {"200": ok("models")})},
        },
    }
