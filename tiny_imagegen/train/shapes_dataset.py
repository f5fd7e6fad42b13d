"""A procedural captioned dataset: small scenes of coloured shapes, drawn from a seed.

Each sample is rebuilt from `(seed, index)` with Pillow, so the dataset needs no files. A scene
holds one to three shapes on a white background; each object has a shape, a colour, a size and a
position, and the caption states some of that in a small fixed grammar:

    caption  := object [" " place]                          a large red circle on the left
              | object " " relation " " object              a green triangle above a yellow circle
              | number " " [size " "] colour " " shape "s"  two red squares
              | object [", " object] " and " object         a red circle, a blue square and a cyan triangle
    object   := "a " [size " "] colour " " shape
    place    := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the centre"
    relation := "to the left of" | "to the right of" | "above" | "below"

`parse_caption` inverts `format_caption` exactly, which lets `scene_parser.py` score an image
against the caption it was drawn for. Objects never touch (a gap between bounding boxes) and keep
a margin from the border, so the parser can segment them by colour.

Held-out combinations: three (colour, shape) pairs never appear in the "train" split, one per
shape and each colour at most once, so every colour and every shape is still seen in training;
in the "heldout" split every caption holds at least one of them, to test composition.

Coordinates are in pixels of the output image, x to the right and y down; an object's (x, y) is
the centre of its bounding box and `extent` the box's side.
"""

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
COLOURS = {  # pairwise RGB distance >= 134, to white >= 225
    "red": (220, 40, 40),
    "green": (30, 160, 50),
    "blue": (40, 60, 220),
    "yellow": (245, 205, 30),
    "purple": (170, 50, 190),
    "cyan": (30, 200, 220),
}
SHAPES = ("circle", "square", "triangle")  # the triangle points up
SIZES = {"small": (0.20, 0.24), "large": (0.34, 0.40)}  # extent as a fraction of the image side
SIZE_THRESHOLD = 0.29  # the parser's line between small and large, halfway between the ranges
MARGIN = 0.06  # free border, as a fraction of the image side
GAP = 0.06  # free space between two objects' bounding boxes
PLACES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBERS = {2: "two", 3: "three"}
KINDS = {"single": 0.3, "relation": 0.4, "count": 0.15, "list": 0.15}  # how often each form is drawn
SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges


HELD_OUT_DIAGONAL = 4  # keeps "a red circle" and "a blue square above a yellow circle" in training


def is_held_out(colour: str, shape: str) -> bool:
    """The diagonal rule (colour index + shape index = 4 mod 6): purple circle, yellow square and
    blue triangle are held out of training."""
    return (list(COLOURS).index(colour) + SHAPES.index(shape)) % len(COLOURS) == HELD_OUT_DIAGONAL


HELD_OUT_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if is_held_out(c, s))


@dataclass(frozen=True)
class Wanted:
    """One object as a caption names it; `size` is None when the caption does not say."""

    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for. `place` applies to a single object; `relation` relates
    objects[0] to objects[1]. A list of identical objects is the counting form ("two red squares")."""

    objects: tuple[Wanted, ...]
    place: str | None = None
    relation: str | None = None


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float
    y: float
    extent: float


@dataclass(frozen=True)
class Scene:
    caption: str
    spec: CaptionSpec
    objects: tuple[SceneObject, ...]
    image_size: int


# ---- the caption grammar, both ways -------------------------------------------------------------


def _phrase(w: Wanted) -> str:
    return " ".join(["a"] + ([w.size] if w.size else []) + [w.colour, w.shape])


def format_caption(spec: CaptionSpec) -> str:
    objs = spec.objects
    if len(objs) == 1:
        return _phrase(objs[0]) + (f" {PLACES[spec.place]}" if spec.place else "")
    if spec.relation:
        return f"{_phrase(objs[0])} {RELATIONS[spec.relation]} {_phrase(objs[1])}"
    if len(set(objs)) == 1:  # n identical objects: the counting form
        w = objs[0]
        return " ".join([NUMBERS[len(objs)]] + ([w.size] if w.size else []) + [w.colour, w.shape + "s"])
    return ", ".join(_phrase(w) for w in objs[:-1]) + " and " + _phrase(objs[-1])


def _alternatives(words) -> str:
    return "|".join(words)


_OBJECT = rf"a (?:({_alternatives(SIZES)}) )?({_alternatives(COLOURS)}) ({_alternatives(SHAPES)})"


def parse_caption(text: str) -> CaptionSpec:
    """The CaptionSpec of a caption in our grammar (case, spaces and a final '.' are forgiven);
    a ValueError naming the caption otherwise."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    spec = None
    number = {v: k for k, v in NUMBERS.items()}
    if m := re.fullmatch(
        rf"({_alternatives(number)}) (?:({_alternatives(SIZES)}) )?({_alternatives(COLOURS)}) "
        rf"({_alternatives(SHAPES)})s",
        t,
    ):
        spec = CaptionSpec((Wanted(m[3], m[4], m[2]),) * number[m[1]])
    elif m := re.fullmatch(rf"{_OBJECT} ({_alternatives(RELATIONS.values())}) {_OBJECT}", t):
        relation = {v: k for k, v in RELATIONS.items()}[m[4]]
        spec = CaptionSpec((Wanted(m[2], m[3], m[1]), Wanted(m[6], m[7], m[5])), relation=relation)
    elif m := re.fullmatch(rf"{_OBJECT}(?: ({_alternatives(PLACES.values())}))?", t):
        place = {v: k for k, v in PLACES.items()}.get(m[4])
        spec = CaptionSpec((Wanted(m[2], m[3], m[1]),), place=place)
    else:
        parts = [re.fullmatch(_OBJECT, p) for p in re.split(r", | and ", t)]
        if len(parts) in (2, 3) and all(parts):
            spec = CaptionSpec(tuple(Wanted(m[2], m[3], m[1]) for m in parts))
    if spec is None or format_caption(spec) != t:  # e.g. a list with commas in the wrong places
        raise ValueError(f"caption {text!r} is not in the shapes grammar (see shapes_dataset.py)")
    return spec


# ---- what positions and relations mean (shared with the parser) ----------------------------------


def place_holds(place: str, x, y, image_size: int, slack: float = 0.0):
    """An object is 'on the left' when its centre lies in the left third of the image (and so
    on); 'in the centre' needs the middle third on both axes. `slack` (pixels) narrows each
    region. x, y may be arrays (then so is the answer)."""
    lo, hi = image_size / 3, 2 * image_size / 3
    return {
        "left": x <= lo - slack,
        "right": x >= hi + slack,
        "top": y <= lo - slack,
        "bottom": y >= hi + slack,
        "centre": (lo + slack <= x) & (x <= hi - slack) & (lo + slack <= y) & (y <= hi - slack),
    }[place]


def relation_offsets(relation: str, dx, dy):
    """(along, across) for the displacement (dx, dy) of object a from object b: how far a lies
    from b in the relation's direction (positive when the relation holds), and the absolute
    offset on the other axis."""
    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
    across = abs(dy) if relation in ("left of", "right of") else abs(dx)
    return along, across


def relation_holds(relation: str, a, b) -> bool:
    """'a is left of b' when a's centre is left of b's and the horizontal offset dominates.
    a and b have .x and .y."""
    along, across = relation_offsets(relation, a.x - b.x, a.y - b.y)
    return bool(along > across)


# ---- sampling a scene ----------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[rng.integers(len(options))]


def _random_object(rng: np.random.Generator) -> Wanted:
    size = _pick(rng, SIZES) if rng.random() < 0.5 else None  # the caption names the size half the time
    return Wanted(_pick(rng, COLOURS), _pick(rng, SHAPES), size)


def _random_spec(rng: np.random.Generator) -> CaptionSpec:
    kind = rng.choice(list(KINDS), p=list(KINDS.values()))
    if kind == "single":
        place = _pick(rng, PLACES) if rng.random() < 0.6 else None
        return CaptionSpec((_random_object(rng),), place=place)
    if kind == "count":
        return CaptionSpec((_random_object(rng),) * int(rng.integers(2, 4)))
    n = 2 if kind == "relation" else int(rng.integers(2, 4))
    while True:  # distinct (colour, shape) pairs, so each object can be told apart and matched
        objs = tuple(_random_object(rng) for _ in range(n))
        if len({(w.colour, w.shape) for w in objs}) == n:
            return CaptionSpec(objs, relation=_pick(rng, RELATIONS) if kind == "relation" else None)


def sample_spec(rng: np.random.Generator, split: str = "train") -> CaptionSpec:
    """A random caption spec. split: 'train' (no held-out pair), 'heldout' (at least one), 'all'."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    while True:
        spec = _random_spec(rng)
        unseen = any(is_held_out(w.colour, w.shape) for w in spec.objects)
        if split == "all" or unseen == (split == "heldout"):
            return spec


def _separated(xy: np.ndarray, extents: np.ndarray, image_size: int) -> np.ndarray:
    """(T,) bool over T candidate layouts xy (T, n, 2): every two bounding boxes are GAP apart."""
    ok = np.ones(len(xy), bool)
    for i in range(len(extents)):
        for j in range(i):
            apart = np.abs(xy[:, i] - xy[:, j]).max(-1) - (extents[i] + extents[j]) / 2
            ok &= apart >= GAP * image_size
    return ok


def _clearly_satisfies(spec: CaptionSpec, xy: np.ndarray, extents: np.ndarray, image_size: int) -> np.ndarray:
    """(T,) bool: the spec holds with room to spare, so that slight blur or noise cannot flip it.
    A placed object sits well inside its region (and in the middle band across it); related
    objects are apart along the relation's axis, and offset across it by at most half that."""
    ok = np.ones(len(xy), bool)
    if spec.place:
        x, y, band = xy[:, 0, 0], xy[:, 0, 1], image_size / 20
        ok &= place_holds(spec.place, x, y, image_size, slack=band)
        across = y if spec.place in ("left", "right") else x
        ok &= (image_size / 3 + band <= across) & (across <= 2 * image_size / 3 - band)
    if spec.relation:
        dx, dy = (xy[:, 0] - xy[:, 1]).T
        along, across = relation_offsets(spec.relation, dx, dy)
        ok &= (along >= (extents[0] + extents[1]) / 2 + GAP * image_size) & (across <= along / 2)
    return ok


def layout(spec: CaptionSpec, rng: np.random.Generator, image_size: int = 64) -> tuple[SceneObject, ...]:
    """Sizes and positions for the spec's objects, by rejection sampling done in bulk: draw
    sizes, then 2048 candidate layouts at once with uniform positions inside the margins, and keep
    the first in which the objects are apart and the caption clearly holds. (Three large
    objects, the hardest case, fit about once in 2,500 draws; new sizes are drawn when none fits.)"""
    n = len(spec.objects)
    for _ in range(100):
        sizes = [w.size or _pick(rng, SIZES) for w in spec.objects]
        extents = np.array([rng.uniform(*SIZES[size]) for size in sizes]) * image_size  # (n,)
        lo, hi = MARGIN * image_size + extents / 2, (1 - MARGIN) * image_size - extents / 2
        xy = rng.uniform(lo[:, None], hi[:, None], size=(2048, n, 2))  # (T, n, 2) centres
        ok = _separated(xy, extents, image_size) & _clearly_satisfies(spec, xy, extents, image_size)
        if ok.any():
            centres = xy[ok.argmax()]  # the first layout that works
            return tuple(
                SceneObject(w.shape, w.colour, size, float(x), float(y), float(extent))
                for w, size, (x, y), extent in zip(spec.objects, sizes, centres, extents)
            )
    raise RuntimeError(f"no layout found for {format_caption(spec)!r} at {image_size}x{image_size}")


def sample_scene(seed: int, index: int = 0, split: str = "train", image_size: int = 64) -> Scene:
    """Scene number `index` of the stream `seed`: caption, spec and object layout (no pixels).
    Cheap, so it also serves to build a caption corpus for a tokenizer."""
    rng = np.random.default_rng([seed, index])
    spec = sample_spec(rng, split)
    return Scene(format_caption(spec), spec, layout(spec, rng, image_size), image_size)


# ---- drawing -------------------------------------------------------------------------------------


def render(scene: Scene) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image, drawn at SUPERSAMPLE x and box-filtered down."""
    s, n = SUPERSAMPLE, scene.image_size
    canvas = Image.new("RGB", (n * s, n * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        x0, y0 = (o.x - o.extent / 2) * s, (o.y - o.extent / 2) * s
        x1, y1 = x0 + o.extent * s, y0 + o.extent * s
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=colour)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return np.asarray(canvas.resize((n, n), Image.BOX))


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


def to_uint8(images) -> np.ndarray:
    """float [-1, 1] (numpy or MLX) -> uint8 [0, 255], clipping what a model overshoots."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_batch(
    seed: int, n: int, split: str = "train", image_size: int = 64, as_float: bool = False, start: int = 0
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Samples start .. start+n-1 of the stream `seed`: images (n, H, W, 3) as uint8 [0, 255], or
    float32 [-1, 1] with as_float; their captions; their scenes. Sample i depends only on
    (seed, i, split, image_size), so batches can be rebuilt anywhere, in any order."""
    if n < 1:
        raise ValueError(f"a batch needs n >= 1 samples, got {n}")
    scenes = [sample_scene(seed, i, split, image_size) for i in range(start, start + n)]
    images = np.stack([render(s) for s in scenes])
    return (to_float(images) if as_float else images), [s.caption for s in scenes], scenes
