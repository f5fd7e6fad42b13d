"""POST /v1/images/edits: which edit a form asks for, and its uploads checked as the command checks
--image, --mask and --ref, before anything is written.

With a mask (or an image with transparent pixels, OpenAI's rule): inpainting, the image the init
image. Without: the image(s) are references for the families that edit from references (FLUX.2
klein, FLUX.1 Kontext), else the init image of image-to-image at `strength`. The uploads are
checked in memory by the command's `read_edit_inputs`; only then are they kept (uploads.py `keep`)
and named on the job's arguments, where the command's `check_inputs` reads them again from disk.
"""

import argparse
import json
import re
from pathlib import Path

from . import uploads
from .params import RequestError

EDIT_FIELDS = ("prompt", "n", "seed", "steps", "guidance", "negative_prompt", "strength")
NUMBERS = ("n", "seed", "steps", "guidance", "strength")  # form fields are text: these are read as JSON numbers


def cross_site(headers) -> str | None:
    """Why a request is refused as another site's page posting here, or None. A multipart form is
    what any page may post without a CORS preflight; browsers mark it (Sec-Fetch-Site, Origin),
    while clients such as curl and the openai package send neither header."""
    origin = headers.get("origin")
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none") or (
            origin is not None and origin.split("://", 1)[-1] != headers.get("host")):
        return (f"a cross-site request (Origin {origin!r:.60}): edits are taken from this server's own page or "
                "from programs, not from other sites' pages")
    return None


def form_fields(fields: dict[str, str]) -> dict:
    """The form's text fields as a JSON body would give them: numbers parsed, empty ones unset."""
    body = dict(fields)
    for key in NUMBERS:
        if body.get(key) in (None, ""):
            body.pop(key, None)
            continue
        try:
            body[key] = json.loads(body[key])
        except ValueError:
            raise RequestError(f"{key}: {body[key]!r:.40} is not a number", key) from None
    return body


def attach(form: uploads.Form, args: argparse.Namespace, max_side: int, kept: Path) -> None:
    """The form's images checked and kept, named on `args` (--image and --mask, or --ref)."""
    from ..commands.inputs import UsageError, read_edit_inputs
    from ..pipelines.loading import pipeline_class

    images = form.files.get("image", []) + form.files.get("image[]", [])
    masks = form.files.get("mask", [])
    if len(masks) > 1:
        raise RequestError("mask: one mask, not several", "mask")
    decoded = [uploads.decode(data, "image") for data in images]
    mask = uploads.our_mask(uploads.decode(masks[0], "mask")) if masks else None
    if mask is None and len(decoded) == 1 and uploads.transparent(decoded[0]) is not None:
        mask = uploads.our_mask(decoded[0])  # OpenAI: no mask, the image's transparency is the mask
    cls = pipeline_class(args.model)
    references = mask is None and getattr(cls, "max_references", 0)
    if not references:
        if len(decoded) > 1:
            raise RequestError(f"image: {len(decoded)} images, {args.model} edits one (several are references "
                               "for FLUX.2 klein / FLUX.1 Kontext)", "image")
        if (args.width is None or args.height is None) and max(decoded[0].size) > max_side:
            raise RequestError(f"image: {decoded[0].size[0]}x{decoded[0].size[1]}, the output takes its size and "
                               f"this server makes at most {max_side}: send a size", "image")
        inputs = {"image": uploads.Upload(images[0], "image"),
                  "mask": None if mask is None else uploads.Upload(uploads.png_bytes(mask), "mask"), "ref": []}
    else:  # the model reads the images beside its noisy tokens
        inputs = {"image": None, "mask": None, "ref": [uploads.Upload(data, "image") for data in images]}
    try:  # the command's checks, on the files in memory
        read_edit_inputs(argparse.Namespace(**{**vars(args), **inputs}), cls)
    except UsageError as e:  # the command's words, with the form's field names for its flags
        message = re.sub(r"--(image|mask|ref) \(uploaded (image|mask)\)", r"\2", str(e))
        message = re.sub(r"--(image|mask|strength)\b", r"\1", message).replace("--ref", "image")
        raise RequestError(message, "mask" if re.match(r"--mask\b", str(e)) else "image") from None
    if references:
        args.ref = [str(uploads.keep(kept, data, uploads.suffix(im))) for data, im in zip(images, decoded)]
        return
    args.image = str(uploads.keep(kept, images[0], uploads.suffix(decoded[0])))
    if mask is not None:  # as "L": what the pipeline reads of any checked mask (masks.pixel_mask converts so)
        args.mask = str(uploads.keep(kept, uploads.png_bytes(mask.convert("L"))))
