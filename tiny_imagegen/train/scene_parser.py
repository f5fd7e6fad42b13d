"""A deterministic scene parser: reads a shapes image back into objects and scores it against
its caption. This is the quality metric of the tiny model.

Parsing, in four steps:
  1. colour segmentation: after a 3x3 smoothing against pixel noise (from 64 pixels up) and a
     white balance that makes the background (the median pixel) exactly BACKGROUND, each pixel
     is read as a blend of the background and the palette colour that explains it best, and
     belongs to that colour when it is at least half covered;
  2. connected components of equal colour (4-neighbour), by min-label propagation in numpy;
     components smaller than `min_area` are noise and dropped;
  3. shape: each ideal shape (circle, square, triangle) is fitted to the component by its area and
     centroid, e.g. a square of side sqrt(area); the one that overlaps the component best (IoU)
     names the shape, or 'unknown' below `min_iou`. An extent-e circle covers pi/4 e^2, a
     triangle e^2 / 2, and a triangle's centroid sits e/6 below its box centre;
  4. size (SIZE_THRESHOLD) and position come from the winning fit's extent and box centre.

Scoring compares the objects found with the objects the caption asks for (`parse_caption`):
count, colour, shape, object (colour and shape on the same object), size and position.
"""

import argparse
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .shapes_dataset import (
    BACKGROUND,
    COLOURS,
    SHAPES,
    SIZE_THRESHOLD,
    make_batch,
    parse_caption,
    place_holds,
    relation_holds,
)

METRICS = ("count", "colour", "shape", "object", "size", "position", "all")


@dataclass(frozen=True)
class Found:
    shape: str  # one of SHAPES, or 'unknown'
    colour: str
    size: str
    x: float  # box centre of the fitted ideal shape, pixels
    y: float
    extent: float  # side of the fitted shape's box, pixels
    area: int  # pixels
    iou: float  # with the fitted ideal shape


def as_rgb(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255] from a PIL image, a uint8 array, or a float array in [-1, 1]
    (the training convention; numpy or MLX)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    return (np.clip(a.astype(np.float64), -1, 1) + 1) * 127.5


def smooth(rgb: np.ndarray) -> np.ndarray:
    """A 3x3 binomial filter ([1, 2, 1] / 4 along each axis): pixel noise drops by ~2.7x, while a
    straight edge's half-way contour stays where it was."""
    p = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def white_balance(rgb: np.ndarray) -> np.ndarray:
    """Shifts the image so that its background is BACKGROUND. Objects cover well under half of
    the image, so the median pixel is background; a model that draws it off-white likely tints
    its objects the same way."""
    return rgb + (np.array(BACKGROUND, np.float64) - np.median(rgb.reshape(-1, 3), axis=0))


def colour_labels(rgb: np.ndarray, max_residual: float) -> np.ndarray:
    """(H, W) int: index into COLOURS of each pixel's colour, -1 for background.

    A pixel is modelled as a blend of the background and one palette colour,
    p = bg + alpha (c - bg): an anti-aliased or blurred edge is exactly such a blend. For each
    colour, alpha is solved by least squares; the colour whose blend fits best (smallest
    residual) wins, and the pixel is that colour when at least half covered (alpha >= 1/2, the
    threshold that keeps a blurred edge where it was). Pixels no blend explains within
    max_residual (a model's off-palette smudge) count as background."""
    bg = np.array(BACKGROUND, np.float64)
    direction = np.array(list(COLOURS.values()), np.float64) - bg  # (K, 3)
    q = rgb - bg  # (H, W, 3)
    alpha = np.clip(q @ direction.T / (direction**2).sum(-1), 0.0, 1.0)  # (H, W, K)
    residual = np.linalg.norm(q[:, :, None, :] - alpha[..., None] * direction, axis=-1)  # (H, W, K)
    best = residual.argmin(-1)
    coverage = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    keep = (coverage >= 0.5) & (residual.min(-1) <= max_residual)
    return np.where(keep, best, -1)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """(H, W) int: a component id per pixel (-1 where labels is -1); 4-neighbours with the same
    label share an id. Every pixel starts with its own flat index as id and repeatedly takes the
    smallest id among its same-label neighbours, until nothing changes: each component ends up
    with the index of its first pixel. Rounds needed ~ the longest path inside a component."""
    h, w = labels.shape
    none = h * w  # larger than every real id
    ids = np.where(labels >= 0, np.arange(h * w).reshape(h, w), none)
    padded_labels = np.pad(labels, 1, constant_values=-1)
    while True:
        padded = np.pad(ids, 1, constant_values=none)
        smallest = ids
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            neighbour = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            same = padded_labels[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == labels
            smallest = np.minimum(smallest, np.where(same, neighbour, none))
        if np.array_equal(smallest, ids):
            return np.where(ids == none, -1, ids)
        ids = smallest


FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / extent**2
CENTROID_BELOW_CENTRE = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}  # times extent


def ideal_mask(shape: str, x: float, y: float, extent: float, h: int, w: int) -> np.ndarray:
    """(h, w) bool: the shape as the generator draws it, box centre (x, y) and side `extent`,
    sampled at pixel centres."""
    u = (np.arange(w)[None, :] + 0.5 - x) / extent  # box coordinates: 0 at the centre, +-1/2 at edges
    v = (np.arange(h)[:, None] + 0.5 - y) / extent
    inside_box = (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if shape == "circle":
        return u**2 + v**2 <= 0.25
    if shape == "square":
        return inside_box
    if shape == "triangle":  # apex at the top centre, base along the bottom
        return inside_box & (np.abs(u) <= (v + 0.5) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def fit_shape(mask: np.ndarray, shape: str) -> tuple[float, float, float, float]:
    """(x, y, extent, IoU): the ideal shape with the mask's area and centroid, and how well it
    overlaps the mask. Area and centroid are sums over all pixels, so a few stray pixels along a
    noisy edge barely move them (a bounding box would jump by a whole pixel)."""
    ys, xs = np.nonzero(mask)
    extent = float(np.sqrt(len(ys) / FILL[shape]))
    x, y = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5 - CENTROID_BELOW_CENTRE[shape] * extent
    ideal = ideal_mask(shape, x, y, extent, *mask.shape)
    return x, y, extent, float((mask & ideal).sum() / (mask | ideal).sum())


def parse_image(
    image,
    max_residual: float = 80.0,
    min_area: float = 0.005,
    min_iou: float = 0.6,
    denoise: bool | None = None,
) -> list[Found]:
    """The objects in an image, in raster order of their first pixel. Each component is fitted
    with every ideal shape (fit_shape); the best IoU names its shape, and that fit gives its
    centre and extent. `min_area` is a fraction of the image (0.005 = 20 pixels at 64x64; the
    smallest object, a small triangle, covers ~80); below `min_iou` the shape is 'unknown'.
    `denoise` (the 3x3 smoothing) defaults to on from 64 pixels up: there objects are >= 13 pixels
    wide and lose nothing to it, while at 32 pixels it would round a 7-pixel square into a circle."""
    rgb = as_rgb(image)
    h, w, _ = rgb.shape
    if denoise is None:
        denoise = min(h, w) >= 64
    if denoise:
        rgb = smooth(rgb)
    labels = colour_labels(white_balance(rgb), max_residual)
    components = connected_components(labels)
    ids, areas = np.unique(components[components >= 0], return_counts=True)
    found = []
    for i, area in zip(ids, areas):
        if area < min_area * h * w:
            continue
        mask = components == i
        fits = {shape: fit_shape(mask, shape) for shape in SHAPES}
        shape = max(fits, key=lambda s: fits[s][3])
        x, y, extent, iou = fits[shape]
        found.append(
            Found(
                shape=shape if iou >= min_iou else "unknown",
                colour=list(COLOURS)[labels.flat[i]],
                size="small" if extent < SIZE_THRESHOLD * max(h, w) else "large",
                x=x,
                y=y,
                extent=extent,
                area=int(area),
                iou=iou,
            )
        )
    return found


# ---- scoring against a caption -------------------------------------------------------------------


def _match(wanted, found) -> list[Found | None]:
    """For each wanted object, a distinct found object: of the same colour, shape and size if
    there is one, else the same colour and shape, else the same colour (so that position and size
    are still judged when a shape came out wrong); None when the colour is missing."""
    free, matched = list(found), []
    for want in wanted:
        same = [f for f in free if f.colour == want.colour]
        same.sort(key=lambda f: (f.shape != want.shape, f.size != want.size))  # stable otherwise
        matched.append(same[0] if same else None)
        if same:
            free.remove(same[0])
    return matched


def score(caption: str, image, **parse_options) -> dict[str, bool | None]:
    """Per-image checks, each True/False, or None where the caption says nothing about it:
    count     as many objects as the caption names
    colour    the multiset of colours is the caption's
    shape     the multiset of shapes is the caption's
    object    the multiset of (colour, shape) pairs is the caption's (attributes bound correctly)
    size      every object the caption gives a size has it
    position  the place of a single object, or the relation between two, holds
    all       every check that applies passes"""
    spec = parse_caption(caption)
    found = parse_image(image, **parse_options)
    wanted, matched = spec.objects, _match(spec.objects, found)
    image_size = as_rgb(image).shape[0]  # square images, as the generator makes
    result = {
        "count": len(found) == len(wanted),
        "colour": Counter(f.colour for f in found) == Counter(w.colour for w in wanted),
        "shape": Counter(f.shape for f in found) == Counter(w.shape for w in wanted),
        "object": Counter((f.colour, f.shape) for f in found)
        == Counter((w.colour, w.shape) for w in wanted),
        "size": None,
        "position": None,
    }
    if any(w.size for w in wanted):
        sized = [(w, m) for w, m in zip(wanted, matched) if w.size]
        result["size"] = all(m is not None and m.size == w.size for w, m in sized)
    if spec.place:
        o = matched[0]
        result["position"] = o is not None and place_holds(spec.place, o.x, o.y, image_size)
    if spec.relation:
        a, b = matched[0], matched[1]
        result["position"] = a is not None and b is not None and relation_holds(spec.relation, a, b)
    result["all"] = all(v for v in result.values() if v is not None)
    return result


def evaluate(captions, images, verbose: bool = True, **parse_options) -> dict[str, float]:
    """Mean of each check over the images it applies to; prints a small table when verbose."""
    scores = [score(c, im, **parse_options) for c, im in zip(captions, images, strict=True)]
    accuracy = {}
    for metric in METRICS:
        applies = [s[metric] for s in scores if s[metric] is not None]
        accuracy[metric] = float(np.mean(applies)) if applies else float("nan")
        if verbose:
            print(f"{metric:>9s} accuracy {accuracy[metric]:7.2%}  over {len(applies)} images")
    return accuracy


def degrade(
    images: np.ndarray, seed: int, noise: float = 0.0, blur: float = 0.0, cast: float = 0.0
) -> np.ndarray:
    """Imitates a model's imperfect output: a Gaussian blur of radius `blur` pixels, a colour cast
    (one random RGB offset per image, std `cast`), then per-pixel Gaussian noise of std `noise`
    (both in 0..255 units). (N, H, W, 3) uint8 in and out."""
    rng = np.random.default_rng(seed)
    out = []
    for im in images:
        if blur > 0:
            im = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(blur)))
        im = im + rng.normal(0.0, cast, 3) + rng.normal(0.0, noise, im.shape)
        out.append(np.clip(np.round(im), 0, 255).astype(np.uint8))
    return np.stack(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="The parser's accuracy on the generator's own images.")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="all", choices=("train", "heldout", "all"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise std, 0..255 units")
    p.add_argument("--blur", type=float, default=0.0, help="Gaussian blur radius, pixels")
    p.add_argument("--cast", type=float, default=0.0, help="std of a per-image RGB offset, 0..255 units")
    args = p.parse_args(argv)
    images, captions, _ = make_batch(args.seed, args.n, args.split, args.image_size)
    images = degrade(images, args.seed, args.noise, args.blur, args.cast)
    print(
        f"{args.n} {args.split} images, {args.image_size}x{args.image_size}: "
        f"noise {args.noise}, blur {args.blur}, cast {args.cast}"
    )
    return evaluate(captions, images)


if __name__ == "__main__":
    main()
