"""Does the colour word attend to its object? The binding claim of joint attention, through the
shipped tiny-shapes MM-DiT's attention maps (docs/attention-maps.md).

The 100 binding captions of the ablations (train/ablation_eval.py: two objects in a relation, of
different colours, "a red square to the left of a blue circle"), image i from noise seed i with the
shipped sampling (20 Euler steps, guidance 4): the images the ablation table scores. For every
image, step and block the image->text attention is read out (conditioning/attention_maps.py) and, for each
colour and shape word, its attention mass inside the region of the object it names is compared
with the mass inside the other object's region.

Regions are the scene parser's detections on the *generated* image (train/scene_parser.py), not
the renderer's layout of the caption: the model draws its own placement from its noise, so the
renderer's layout for a caption says nothing about where this image's objects are. The two
detected objects are assigned to the caption's two objects by the caption's relation alone
(object 0 is the one to the left / above ...), never by colour or shape, so that an image whose
colours came out wrong still says which object each word *should* attend to. Images without
exactly two detected objects are left out of the region analysis (counted).

    density(word, object) = attention mass of the word inside the object / the object's area
    prefers its object      density(own) > density(other)
    own share               mass(own) / (mass(own) + mass(other)); the area share is its baseline

    python benchmarks/attention_binding.py                   # ~1 min on 2 CPU cores
    python benchmarks/attention_binding.py --n 20 --figure /tmp/fig.png
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tiny_imagegen.conditioning.attention_maps import generate_with_attention_maps, overlay, per_word  # noqa: E402
from tiny_imagegen.pipelines.pipeline import Pipeline  # noqa: E402
from tiny_imagegen.train.ablations.scoring import caption_sets  # noqa: E402
from tiny_imagegen.train.scene_parser import ideal_mask, parse_image, score  # noqa: E402
from tiny_imagegen.train.shapes_dataset import COLOURS, SHAPES, parse_caption, relation_offsets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK_NAMES = ["double 0", "double 1", "single 0", "single 1"]


def assign(caption: str, found) -> tuple:
    """The two detected objects in the caption's order: the ordering that agrees with the caption
    on more of (shape of object 0, shape of object 1, the relation's direction); a tie goes to the
    relation. Colour is never used, so that a colour word's object is defined without its colour."""
    spec = parse_caption(caption)
    a, b = found

    def agreement(first, second):
        along = relation_offsets(spec.relation, first.x - second.x, first.y - second.y)[0]
        shapes = (first.shape == spec.objects[0].shape) + (second.shape == spec.objects[1].shape)
        return shapes + 1.5 * (along >= 0)  # the relation outweighs one shape, not both

    return (a, b) if agreement(a, b) >= agreement(b, a) else (b, a)


def regions(caption: str, image: np.ndarray, grid: int):
    """((2, grid, grid) coverage of each caption object's detected region per token cell, the two
    objects in caption order), or None unless exactly two objects are found."""
    found = parse_image(image)
    if len(found) != 2:
        return None
    objects = assign(caption, found)
    h, w = image.shape[:2]
    cover = []
    for f in objects:
        mask = ideal_mask(f.shape if f.shape in SHAPES else "square", f.x, f.y, f.extent, h, w)
        cover.append(mask.reshape(grid, h // grid, grid, w // grid).mean(axis=(1, 3)))
    return np.stack(cover), objects


def word_slots(words) -> dict[str, int]:
    """The word indices of colour 0, shape 0, colour 1, shape 1 (in caption order)."""
    colours = [i for i, w in enumerate(words) if w.text in COLOURS]
    shapes = [i for i, w in enumerate(words) if w.text in SHAPES]
    return {"colour 0": colours[0], "shape 0": shapes[0], "colour 1": colours[1], "shape 1": shapes[1]}


def analyse(pipe, captions, batch: int):
    """Per image: its score, and per (step, block, word slot) the mass in object 0 / object 1."""
    records = []
    for s in range(0, len(captions), batch):
        part = list(captions[s : s + batch])
        images, maps = generate_with_attention_maps(pipe, part, seed=list(range(s, s + len(part))), keep_each=True)
        n_steps = 1 + max(step for step, _, _ in maps.each)
        n_blocks = 1 + max(block for _, block, _ in maps.each)
        per_call = np.zeros((len(part), n_steps, n_blocks, *maps.maps.shape[1:]), np.float32)
        for step, block, p in maps.each:
            per_call[:, step, block] = p
        for j, (caption, image) in enumerate(zip(part, images)):
            pixels = np.asarray(image)
            rec = {"caption": caption, "seed": s + j, "score": score(caption, pixels)}
            reg = regions(caption, pixels, maps.maps.shape[1])
            if reg is not None:
                cover, objects = reg
                slots = word_slots(maps.words[j])
                words = [maps.words[j][i] for i in slots.values()]
                w = per_word(per_call[j], words)  # (4 slots, steps, blocks, rows, cols)
                mass = np.einsum("wsbyx,oyx->wsbo", w, cover)  # (slot, step, block, object)
                rec.update(mass=mass, area=cover.sum(axis=(1, 2)), colours=[o.colour for o in objects],
                           shapes=[o.shape for o in objects], slots=list(slots))
            rec["calls"] = per_call[j]  # (steps, blocks, rows, cols, L_txt)
            rec["map"] = per_call[j].mean(axis=0)  # (blocks, rows, cols, L_txt): the mean over steps
            rec["words"] = maps.words[j]
            rec["image"] = image
            records.append(rec)
        print(f"{s + len(part)}/{len(captions)} images", file=sys.stderr)
    return records


def prefers(mass, area, slot_objects):
    """(slot, step, block) bool: density on the named object above density on the other."""
    density = mass / area[None, None, None, :]
    own = np.stack([density[k, :, :, o] for k, o in enumerate(slot_objects)])
    other = np.stack([density[k, :, :, 1 - o] for k, o in enumerate(slot_objects)])
    return own > other, own / (own + other)


SLOT_OBJECT = [0, 0, 1, 1]  # colour 0 and shape 0 name object 0


def bound(r) -> bool:
    """Both objects, in caption order (assign), have the colour and shape the caption names. Unlike
    the scorer's "object" (a multiset), "a red circle right of a yellow circle" drawn with the red
    one on the left is not bound right here: for two circles only the place says which is which."""
    want = parse_caption(r["caption"]).objects
    return all(c == w.colour and s == w.shape for c, s, w in zip(r["colours"], r["shapes"], want))


def colour_table(group, block: int | None) -> dict:
    """Per colour word: its attention (density on its object above the other's; in `block`, or
    over all blocks; over all steps) against its colour (the object it names has that colour)."""
    table = {f"attention {a}, colour {c}": 0 for a in ("right", "wrong") for c in ("right", "wrong")}
    table["colour wrong: the named colour is on the other object"] = 0
    for r in group:
        mass = r["mass"] if block is None else r["mass"][:, :, block : block + 1]
        pref, _ = prefers(mass.mean(axis=(1, 2), keepdims=True), r["area"], SLOT_OBJECT)
        want = parse_caption(r["caption"]).objects
        for k, o in ((0, 0), (2, 1)):  # the two colour words
            colour_ok = r["colours"][o] == want[o].colour
            table[f"attention {'right' if pref[k].item() else 'wrong'}, colour {'right' if colour_ok else 'wrong'}"] += 1
            table["colour wrong: the named colour is on the other object"] += int(
                not colour_ok and r["colours"][1 - o] == want[o].colour)
    return table


def summarise(records) -> dict:
    usable = [r for r in records if "mass" in r]
    right = [r for r in usable if bound(r)]
    wrong = [r for r in usable if not bound(r)]
    out = {"images": len(records), "two objects found": len(usable), "binding right": len(right),
           "binding wrong": len(wrong),
           "scores": {k: float(np.mean([r["score"][k] for r in records if r["score"][k] is not None]))
                      for k in ("count", "colour", "shape", "object", "position", "all")}}
    for name, group in (("all", usable), ("right", right), ("wrong", wrong)):
        if not group:
            continue
        pref = np.stack([prefers(r["mass"], r["area"], SLOT_OBJECT)[0] for r in group])  # (N, slot, step, block)
        share = np.stack([r["mass"][k, :, :, o] / r["mass"][k].sum(-1) for r in group
                          for k, o in enumerate(SLOT_OBJECT)]).reshape(len(group), 4, *pref.shape[2:])
        area_share = np.stack([[r["area"][o] / r["area"].sum() for o in SLOT_OBJECT] for r in group])  # (N, slot)
        excess = share - area_share[:, :, None, None]  # own share above what a uniform map would give
        colour, shape = [0, 2], [1, 3]
        per_image = pref[:, colour].mean(axis=(1, 2))  # (N, block)
        out[name] = {
            "n": len(group),
            "colour words prefer their object, per block: standard error over images": (
                per_image.std(axis=0, ddof=1) / np.sqrt(len(group))).round(3).tolist() if len(group) > 1 else None,
            "colour words prefer their object, per block (mean over steps)": pref[:, colour].mean(axis=(0, 1, 2)).round(3).tolist(),
            "shape words prefer their object, per block": pref[:, shape].mean(axis=(0, 1, 2)).round(3).tolist(),
            "colour words prefer their object, per step (mean over blocks)": pref[:, colour].mean(axis=(0, 1, 3)).round(3).tolist(),
            "shape words prefer their object, per step": pref[:, shape].mean(axis=(0, 1, 3)).round(3).tolist(),
            "colour words: own share - area share, per block": excess[:, colour].mean(axis=(0, 1, 2)).round(3).tolist(),
            "shape words: own share - area share, per block": excess[:, shape].mean(axis=(0, 1, 2)).round(3).tolist(),
            "colour words prefer their object, averaged over steps and blocks": float(
                np.mean([prefers(r["mass"].mean(axis=(1, 2), keepdims=True), r["area"], SLOT_OBJECT)[0][colour]
                         for r in group]).round(3)),
        }
    # binding failures: attention failures (the colour word attends to the other object) or later
    # (it attends to its object, and the object still gets another colour)?
    for name, block in (("all blocks", None), *((n, i) for i, n in enumerate(BLOCK_NAMES))):
        out[f"colour words, every usable image, {name}"] = colour_table(usable, block)
    return out


def figure(records, path: Path, block: int, cell: int = 112):
    """Two rows: a binding-right and a binding-wrong sample; image, then the maps of its four
    colour/shape words in `block`, averaged over the steps (each scaled to its own maximum)."""
    from PIL import Image, ImageDraw

    usable = [r for r in records if "mass" in r]
    right = next((r for r in usable if bound(r)), None)
    def swapped(r):  # both objects drawn, each in the other's colour: the typical binding failure
        want = parse_caption(r["caption"]).objects
        return r["colours"] == [want[1].colour, want[0].colour]

    candidates = [r for r in usable if swapped(r)] or [r for r in usable if not bound(r)]
    wrong = max(candidates, key=lambda r: r["area"].min())  # the one whose smaller object is largest
    if right is None:  # none bound right: the other row is the wrong sample whose colour words prefer their objects most
        right = max((r for r in usable if r is not wrong), key=lambda r: prefers(r["mass"], r["area"], SLOT_OBJECT)[1][[0, 2]].mean())
    sheet = Image.new("RGB", (5 * cell, 2 * (cell + 30)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (r, label) in enumerate(((right, "binding right" if bound(right) else "best attended"),
                                      (wrong, "binding wrong"))):
        y = row * (cell + 30)
        draw.text((3, y + 2), f"{label}: {r['caption']} (seed {r['seed']}), block {BLOCK_NAMES[block]}", fill="black")
        base = r["image"].convert("RGB").resize((cell, cell), Image.NEAREST)
        sheet.paste(base, (0, y + 28))
        slots = word_slots(r["words"])
        for n, (slot, i) in enumerate(slots.items(), start=1):
            w = r["words"][i]
            heat = r["map"][block][..., list(w.tokens)].sum(-1)
            sheet.paste(overlay(base, heat), (n * cell, y + 28))
            draw.text((n * cell + 3, y + 16), w.text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return right, wrong


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="binding captions (default: the ablations' 100)")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "attention-binding.png")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "attention_binding.json")
    ap.add_argument("--raw", type=Path, help="also pickle the per-image records here")
    ap.add_argument("--from-raw", type=Path, help="summarise records pickled by --raw instead of generating")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    import pickle

    if args.from_raw:
        records = pickle.loads(args.from_raw.read_bytes())
    else:
        pipe = Pipeline.from_pretrained(str(ROOT / "weights" / "tiny-shapes"), progress=False, keep_text_encoders=True)
        records = analyse(pipe, caption_sets(0, args.n)["binding"], args.batch)
    if args.raw:  # everything the summary reads, to re-summarise without regenerating
        args.raw.write_bytes(pickle.dumps(records))
    summary = summarise(records)
    block = int(np.argmax(summary["all"]["colour words prefer their object, per block (mean over steps)"]))
    right, wrong = figure(records, args.figure, block)
    summary["figure"] = {"block": BLOCK_NAMES[block], "right": [right["caption"], right["seed"]], "wrong": [wrong["caption"], wrong["seed"]],
                         "wrong colours found (object 0, 1)": wrong["colours"]}
    if not args.from_raw:
        summary["seconds"] = round(time.perf_counter() - start, 1)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
