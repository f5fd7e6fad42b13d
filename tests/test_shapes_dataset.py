"""The procedural shapes dataset and its scene parser (the quality metric of the tiny model).

The parser must read the generator's own images back (~100%), also when they are blurred,
noisy and tinted as a model's output would be, and the scoring must fail on a wrong caption."""

import dataclasses

import numpy as np
import pytest

from tiny_imagegen.train.scene_parser import (
    METRICS,
    connected_components,
    degrade,
    evaluate,
    parse_image,
    score,
)
from tiny_imagegen.train.shapes_dataset import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    CaptionSpec,
    Wanted,
    format_caption,
    is_held_out,
    make_batch,
    parse_caption,
    sample_scene,
    sample_spec,
    to_uint8,
)


def test_same_seed_same_images():
    images, captions, scenes = make_batch(seed=7, n=8)
    again, captions_again, _ = make_batch(seed=7, n=8)
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again
    tail, tail_captions, _ = make_batch(seed=7, n=4, start=4)  # sample i depends on (seed, i) only
    np.testing.assert_array_equal(images[4:], tail)
    assert tail_captions == captions[4:]
    other, _, _ = make_batch(seed=8, n=8)
    assert not np.array_equal(images, other)
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
    assert all(1 <= len(s.objects) <= 3 for s in scenes)


def test_float_batch_is_the_uint8_batch_in_minus_one_one():
    images, _, _ = make_batch(seed=1, n=4)
    floats, _, _ = make_batch(seed=1, n=4, as_float=True)
    assert floats.dtype == np.float32 and floats.min() >= -1 and floats.max() <= 1
    np.testing.assert_array_equal(to_uint8(floats), images)


def test_caption_grammar_round_trip():
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng, "all") for _ in range(2000)]
    for spec in specs:
        assert parse_caption(format_caption(spec)) == spec
    forms = {(len(s.objects), s.place is not None, s.relation is not None, len(set(s.objects))) for s in specs}
    assert {(1, True, False, 1), (1, False, False, 1), (2, False, True, 2), (3, False, False, 1),
            (2, False, False, 1), (2, False, False, 2), (3, False, False, 3)} <= forms  # fmt: skip


def test_caption_examples_and_errors():
    red_circle, blue_square = Wanted("red", "circle"), Wanted("blue", "square")
    assert parse_caption("a red circle to the left of a blue square") == CaptionSpec(
        (red_circle, blue_square), relation="left of"
    )
    assert parse_caption("Two large green triangles.") == CaptionSpec((Wanted("green", "triangle", "large"),) * 2)
    assert parse_caption("a small red circle in the centre") == CaptionSpec(
        (Wanted("red", "circle", "small"),), place="centre"
    )
    assert parse_caption("a red circle, a blue square and a yellow triangle").objects[2] == Wanted("yellow", "triangle")
    for bad in ("a pink circle", "four red squares", "a red circle, a blue square", "a red circle near a blue square"):
        with pytest.raises(ValueError, match="not in the shapes grammar"):
            parse_caption(bad)


def test_held_out_split_has_no_overlap_with_train():
    assert set(HELD_OUT_PAIRS) == {("purple", "circle"), ("yellow", "square"), ("blue", "triangle")}
    # the README's examples must be drawable: their pairs are seen in training
    assert not any(is_held_out(*pair) for pair in [("red", "circle"), ("blue", "square"), ("yellow", "circle")])
    train_pairs = {(c, s) for c in COLOURS for s in SHAPES if not is_held_out(c, s)}
    assert {c for c, _ in train_pairs} == set(COLOURS) and {s for _, s in train_pairs} == set(SHAPES)
    train = [sample_scene(0, i, "train") for i in range(2000)]
    heldout = [sample_scene(0, i, "heldout") for i in range(500)]
    assert not any(is_held_out(o.colour, o.shape) for s in train for o in s.objects)
    assert all(any(is_held_out(o.colour, o.shape) for o in s.objects) for s in heldout)
    assert not {s.caption for s in train} & {s.caption for s in heldout}
    assert {(o.colour, o.shape) for s in heldout for o in s.objects} >= set(HELD_OUT_PAIRS)


def test_connected_components_in_numpy():
    labels = np.array(
        [
            [0, 0, -1, 0],
            [-1, 0, -1, 0],
            [1, 1, -1, -1],
            [-1, 0, 0, 0],
        ]
    )
    ids = connected_components(labels)
    assert ids[0, 0] == ids[0, 1] == ids[1, 1] == 0  # the first pixel's index names the component
    assert ids[0, 3] == ids[1, 3] == 3
    assert ids[2, 0] == ids[2, 1] == 8  # touching, but another colour
    assert ids[3, 1] == ids[3, 2] == ids[3, 3] == 13  # diagonal neighbours do not join
    assert (ids[labels < 0] == -1).all()


@pytest.mark.parametrize("image_size", [64, 32])
def test_parser_reads_the_generators_images(image_size):
    images, captions, scenes = make_batch(seed=100, n=300, split="all", image_size=image_size)
    accuracy = evaluate(captions, images)
    assert all(accuracy[m] >= 0.99 for m in METRICS), accuracy  # measured: 100% on 1000 images
    for image, scene in zip(images[:50], scenes[:50]):  # positions and extents, to about a pixel
        found = parse_image(image)
        for o in scene.objects:
            f = min(found, key=lambda f: (f.x - o.x) ** 2 + (f.y - o.y) ** 2)
            assert (f.shape, f.colour, f.size) == (o.shape, o.colour, o.size)
            assert abs(f.x - o.x) < 1 and abs(f.y - o.y) < 1 and abs(f.extent - o.extent) < 1.5


def test_parser_is_robust_to_blur_noise_and_colour_cast():
    images, captions, _ = make_batch(seed=200, n=300, split="all")
    degraded = degrade(images, seed=0, noise=10, blur=0.7, cast=10)
    accuracy = evaluate(captions, degraded)
    assert all(accuracy[m] >= 0.98 for m in METRICS), accuracy  # measured: 100% on 1000 images


def test_scores_fail_on_the_wrong_caption():
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert parse_image(blank) == [] and parse_image(degrade(blank[None], seed=0, noise=20)[0]) == []
    assert score("a red circle", blank)["count"] is False
    for i in range(40):
        scene = sample_scene(3, i, "all")
        image = make_batch(3, 1, "all", start=i)[0][0]
        spec, first = scene.spec, scene.spec.objects[0]
        other_colour = next(c for c in COLOURS if c not in {w.colour for w in spec.objects})
        recoloured = dataclasses.replace(spec, objects=(dataclasses.replace(first, colour=other_colour),) + spec.objects[1:])
        assert not score(format_caption(recoloured), image)["colour"]
        if spec.relation:
            flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            wrong = dataclasses.replace(spec, relation=flipped[spec.relation])
            assert score(format_caption(wrong), image)["position"] is False
        if spec.place:
            wrong = dataclasses.replace(spec, place="right" if spec.place == "left" else "left")
            assert score(format_caption(wrong), image)["position"] is False
        if len(spec.objects) == 1:
            reshaped = dataclasses.replace(first, shape=next(s for s in SHAPES if s != first.shape))
            assert not score(format_caption(dataclasses.replace(spec, objects=(reshaped,))), image)["shape"]
            assert not score(format_caption(CaptionSpec((first,) * 2)), image)["count"]
