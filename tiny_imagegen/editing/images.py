"""Input images of an edit, as the reference pipelines prepare them (PIL in, PIL out).

Three inputs, three meanings (they never share a flag):
  init image   (--image)   img2img and inpainting start from its latents, noised to the strength
  mask         (--mask)    white = repaint, black = keep (inpainting)
  references   (--ref)     clean images the model reads beside the noisy tokens, at their own
                           offset on the position-id axis (FLUX.2 klein, FLUX.1 Kontext)
"""

import math

MIN_REFERENCE_SIDE = 64  # Flux2ImageProcessor.check_image_input
MAX_REFERENCE_ASPECT = 8
MAX_REFERENCE_AREA = 1024 * 1024  # larger references are resized to this area (FKP:775)


def open_image(image, what: str = "image"):
    """A path or a PIL image -> PIL image (loaded), with a one-line error for a bad file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ValueError(f"{what} {image}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {image}: not a readable image ({e})") from None


def floor_to(value: int, multiple: int) -> int:
    return value // multiple * multiple


def resize_to_area(image, area: int):
    """LANCZOS resize to about `area` pixels at the same aspect, sides truncated (FKP:775)."""
    from PIL import Image

    w, h = image.size
    scale = math.sqrt(area / (w * h))
    return image.resize((int(w * scale), int(h * scale)), Image.LANCZOS)


def centre_crop(image, width: int, height: int):
    """Flux2ImageProcessor's "crop" resize mode: a pure centre crop, no resampling."""
    w, h = image.size
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def check_reference(image, name: str = "reference") -> None:
    """Flux2ImageProcessor.check_image_input: at least 64 px a side, aspect at most 8:1."""
    w, h = image.size
    if w < MIN_REFERENCE_SIDE or h < MIN_REFERENCE_SIDE:
        raise ValueError(f"{name} is {w}x{h}: both sides must be at least {MIN_REFERENCE_SIDE} px")
    if max(w / h, h / w) > MAX_REFERENCE_ASPECT:
        raise ValueError(f"{name} is {w}x{h}: the aspect ratio {max(w / h, h / w):.1f}:1 exceeds "
                         f"{MAX_REFERENCE_ASPECT}:1")


def klein_reference(image, multiple: int = 16):
    """One FLUX.2 klein reference as Flux2KleinPipeline(image=[...]) prepares it (FKP:764-782):
    RGB; above 1024² pixels LANCZOS-resized to that area; the sides floored to `multiple` by a
    centre crop. -> (PIL image, resized: bool)."""
    check_reference(image)
    resized = image.size[0] * image.size[1] > MAX_REFERENCE_AREA
    if resized:
        image = resize_to_area(image, MAX_REFERENCE_AREA)
    w, h = floor_to(image.size[0], multiple), floor_to(image.size[1], multiple)
    return centre_crop(image, w, h).convert("RGB"), resized


def image_size(image, multiple: int, max_area: int | None = None) -> tuple[int, int]:
    """The output size an init image implies: its own, scaled down to `max_area` if larger
    (as Flux2KleinInpaintPipeline), floored to `multiple`. -> (width, height)."""
    w, h = image.size
    if max_area is not None and w * h > max_area:
        s = math.sqrt(max_area / (w * h))
        w, h = int(w * s), int(h * s)
    return floor_to(w, multiple), floor_to(h, multiple)


def resize_init(image, width: int, height: int):
    """VaeImageProcessor.preprocess(resize_mode="default"): LANCZOS to (width, height), then RGB."""
    from PIL import Image

    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image.convert("RGB")


# FluxKontextPipeline's PREFERRED_KONTEXT_RESOLUTIONS (KX:82-100), (width, height): the sizes
# Kontext was trained at, all about 1024² pixels
KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


def kontext_size(width: int, height: int, multiple: int = 16, auto_resize: bool = True) -> tuple[int, int]:
    """The size FluxKontextPipeline gives a reference of width x height (KX:938-945): floored to
    `multiple`, then (auto_resize) the trained resolution of the nearest aspect ratio (ties: the
    narrower), floored again. -> (width, height)."""
    w, h = floor_to(width, multiple), floor_to(height, multiple)
    if auto_resize:
        aspect = w / h
        _, w, h = min((abs(aspect - rw / rh), rw, rh) for rw, rh in KONTEXT_RESOLUTIONS)
    return floor_to(w, multiple), floor_to(h, multiple)


def kontext_reference(image, multiple: int = 16, auto_resize: bool = True):
    """A Kontext reference: LANCZOS-resized to `kontext_size`, RGB."""
    w, h = kontext_size(*image.size, multiple, auto_resize)
    return resize_init(image, w, h)
