"""An inpainting mask: white (>= 0.5) = repaint, black = keep, as the reference pipelines read it.

Pixel level (VaeImageProcessor / Flux2ImageProcessor with do_normalize=False, do_binarize=True,
do_convert_grayscale=True): LANCZOS-resized to the output size in its own mode, then converted
to greyscale ("L"), / 255, binarised at 0.5. Then onto the latent grid, where families differ:

  nearest to H/8 x W/8        FluxInpaintPipeline (FI:708), ZImageInpaintPipeline,
                              StableDiffusionInpaintPipeline: F.interpolate's default mode
  bilinear to H/16 x W/16     Flux2KleinInpaintPipeline (FKI:680): the packed token grid,
                              align_corners=False, no antialias -> soft edges (0, 0.25, ..., 1)
"""

import numpy as np

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P", "La")


def check_mask(mask, name: str = "mask") -> None:
    """A mask is greyscale: a grey mode, or RGB(A) whose three channels are equal. A coloured
    image would be converted by luminance into a mask nobody drew, so it is refused."""
    if mask.mode in GREY_MODES:
        return
    if mask.mode not in ("RGB", "RGBA"):
        raise ValueError(f"{name}: mode {mask.mode} is not a greyscale mask (white = repaint, black = keep)")
    rgb = np.asarray(mask.convert("RGB"))
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
        raise ValueError(f"{name} has colours: draw it in greys (white = repaint, black = keep)")


def pixel_mask(mask, width: int, height: int) -> np.ndarray:
    """PIL mask -> (height, width) float32 in {0, 1}: resized (LANCZOS, own mode), greyscale, >= 0.5."""
    from PIL import Image

    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    m = np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255.0)
    return (m >= 0.5).astype(np.float32)


def nearest(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """torch F.interpolate(mode="nearest"): output i reads input floor(i * in / out)."""
    H, W = mask.shape
    rows = np.floor(np.arange(h) * np.float32(H / h)).astype(int)
    cols = np.floor(np.arange(w) * np.float32(W / w)).astype(int)
    return mask[rows][:, cols]


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = np.float32(n_in / n_out)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def bilinear(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """torch F.interpolate(mode="bilinear", align_corners=False, antialias=False), float32."""
    r0, r1, fr = _bilinear_axis(mask.shape[0], h)
    c0, c1, fc = _bilinear_axis(mask.shape[1], w)
    top = mask[r0][:, c0] * (1 - fc) + mask[r0][:, c1] * fc
    bottom = mask[r1][:, c0] * (1 - fc) + mask[r1][:, c1] * fc
    return (top * (1 - fr)[:, None] + bottom * fr[:, None]).astype(np.float32)


def coverage(mask: np.ndarray) -> str | None:
    """A notice for a mask that paints nothing or everything (None for an ordinary one)."""
    if not mask.any():
        return "the mask is all black: nothing is repainted, the output is the input image (through the VAE)"
    if mask.all():
        return "the mask is all white: everything is repainted (image-to-image at this strength)"
    return None
