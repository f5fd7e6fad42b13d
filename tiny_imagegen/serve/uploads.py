"""POST /v1/images/edits' uploads: the multipart form read in memory, the images decoded with
bounds, OpenAI's mask convention mapped onto ours, and the checked files kept in the server's area.

The body is read whole into memory, at most `Limits.upload_bytes` (also when sent in chunks), and
parsed there (python-multipart's parser with our callbacks, not Starlette's form(), whose parts
spill over 1 MB into the system's temporary folder): no upload touches the disk before it decodes
and passes the command's checks (commands/inputs.py `read_edit_inputs`, run on the in-memory files).

Masks. OpenAI: "fully transparent areas (alpha zero) indicate where the image should be edited";
ours (--mask): white = repaint, black = keep. A mask with an alpha channel that is anywhere
below 255 is read OpenAI's way: repaint = alpha 0, keep = the rest. A mask without alpha, or with
an alpha that is opaque everywhere (OpenAI's reading would be "edit nothing", never a request),
is read as ours: greyscale, white = repaint. With no mask, an image with transparent pixels is
its own mask (OpenAI's rule). The mapped mask is kept as a greyscale PNG: the mask `generate`
would be given.

Checked files are kept content-addressed in `<output>/inputs/<sha256>.<format>` (written to a temporary
name, then renamed): the image's own bytes, so its sha256 is the client's file's, and the path the
PNG metadata records is one `generate --config-from-metadata` can replay on the server.
"""

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .params import RequestError

MAX_PIXELS = 4096 * 4096  # an uploaded image's decoded size (checked from its header, before decoding)
FILE_FIELDS = ("image", "image[]", "mask")


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)  # the last value of each text field
    files: dict[str, list[bytes]] = field(default_factory=dict)  # field -> the files sent under it


class Upload(io.BytesIO):
    """An uploaded file in memory, named in the command's messages by its field."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.field = name

    def __str__(self):
        return f"(uploaded {self.field})"


def parse_form(body: bytes, content_type: str, max_parts: int = 64) -> Form:
    """multipart/form-data -> Form, in memory; a malformed body is a 400."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    media, options = parse_options_header(content_type)
    if media != b"multipart/form-data" or not options.get(b"boundary"):
        raise RequestError("send the image and fields as multipart/form-data (Content-Type: multipart/form-data; "
                           f"boundary=...), not {media.decode('latin-1') or 'nothing'}", status=415)
    form, part, header = Form(), {}, {}

    def on_part_begin():
        part.clear()
        part.update(headers={}, data=bytearray())
        if len(form.fields) + sum(map(len, form.files.values())) >= max_parts:
            raise RequestError(f"more than {max_parts} form fields")

    def on_header_field(data, start, end):
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data, start, end):
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end():
        part["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data, start, end):
        part["data"] += data[start:end]

    def on_part_end():
        disposition, params = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise RequestError("a multipart part without Content-Disposition: form-data; name=...")
        if b"filename" in params or name in FILE_FIELDS:
            form.files.setdefault(name, []).append(bytes(part["data"]))
        else:
            try:
                form.fields[name] = part["data"].decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"{name}: not UTF-8 text", name) from None

    parser = MultipartParser(options[b"boundary"], callbacks=dict(
        on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
        on_header_end=on_header_end, on_part_data=on_part_data, on_part_end=on_part_end))
    try:
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as e:  # python-multipart's MultipartParseError and friends
        raise RequestError(f"the multipart body is malformed ({e})") from None
    return form


def decode(data: bytes, name: str):
    """Uploaded bytes -> a loaded PIL image, its pixel count bounded before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise RequestError(f"{name}: {im.size[0]}x{im.size[1]} pixels, this server reads at most "
                                   f"{MAX_PIXELS:,}", name)
            im.load()
            out = im.copy()
            out.format = im.format  # the suffix its kept file gets
            return out
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{name}: not a readable image ({e})", name) from None


def transparent(image):
    """(H, W) bool: where the image is fully transparent; None when it has no alpha below 255."""
    import numpy as np

    if image.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and not (
            image.mode == "P" and "transparency" in image.info):
        return None
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    return (alpha == 0) if (alpha < 255).any() else None


def our_mask(mask) -> object:
    """An uploaded mask -> ours (white = repaint): OpenAI's transparent = edit when it has
    transparency, else the greyscale mask as sent (the command's checks refuse colours)."""
    from PIL import Image

    holes = transparent(mask)
    if holes is None:
        return mask
    import numpy as np

    return Image.fromarray(np.where(holes, 255, 0).astype(np.uint8), mode="L")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def suffix(image) -> str:
    """A kept upload's suffix: its format's usual one."""
    return {"JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}.get(image.format, ".png")


def keep(folder: Path, data: bytes, suffix: str = ".png") -> Path:
    """Checked bytes -> <folder>/<sha256><suffix>, written once (temporary name, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
