"""RoPE variants and position ids: each tested for its defining property; sin-cos against diffusers."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close, load_fixture
from tiny_imagegen.layers.positions import (
    LearnedPositionEmbedding, centred_image_ids, diagonal_text_ids, flux_image_ids, flux_text_ids,
    sincos_2d, text_start_after,
)
from tiny_imagegen.layers.rope import MixedRoPE, apply_rope, axial_rope, rope_angles

HEAD_DIM = 32
AXES = (8, 12, 12)


def scores(q, k, rope):
    """q·k for every pair of tokens after rotation: (L, L)."""
    qr, kr = apply_rope(q, rope), apply_rope(k, rope)
    return (qr @ kr.swapaxes(-1, -2))[0, 0]


def random_qk(L, seed=0):
    rng = np.random.default_rng(seed)
    return (mx.array(rng.standard_normal((1, 1, L, HEAD_DIM)).astype(np.float32)),
            mx.array(rng.standard_normal((1, 1, L, HEAD_DIM)).astype(np.float32)))


def one_d(positions):
    a = rope_angles(positions, HEAD_DIM)
    return mx.array(np.cos(a).astype(np.float32)), mx.array(np.sin(a).astype(np.float32))


def test_1d_rope_sees_only_relative_positions():
    q, k = random_qk(5)
    p = np.array([0, 3, 4, 9, 17])
    assert np.allclose(scores(q, k, one_d(p)), scores(q, k, one_d(p + 40)), atol=1e-4)
    assert not np.allclose(scores(q, k, one_d(p)), scores(q, k, one_d(p * 2)), atol=1e-2)


def test_axial_rope_is_shift_invariant_on_every_axis():
    q, k = random_qk(15)
    ids = flux_image_ids(3, 5)
    shifted = ids + np.array([2.0, 7.0, -3.0], np.float32)
    assert np.allclose(scores(q, k, axial_rope(ids, AXES)), scores(q, k, axial_rope(shifted, AXES)), atol=1e-4)


def test_mixed_rope_is_shift_invariant():
    q, k = random_qk(12)
    rope = MixedRoPE(HEAD_DIM, num_heads=1)
    ids = centred_image_ids(3, 4)
    shifted = ids + np.array([5.0, -2.0], np.float32)
    assert np.allclose(scores(q, k, rope(mx.array(ids))), scores(q, k, rope(mx.array(shifted))), atol=1e-4)


def test_axial_rope_is_separable_and_mixed_is_not():
    """Axial: moving a token along the row axis turns only the row axis' channels.
    Mixed: every channel pair sees both axes, so a row move turns all of them."""
    base = np.array([[0.0, 2.0, 3.0]])
    moved = base + np.array([[0.0, 1.0, 0.0]])  # one row down
    cos0, _ = axial_rope(base, AXES)
    cos1, _ = axial_rope(moved, AXES)
    changed = np.abs(np.array(cos1 - cos0))[0] > 1e-7
    n_index, n_row = AXES[0] // 2, AXES[1] // 2
    assert not changed[:n_index].any() and not changed[n_index + n_row :].any()
    assert changed[n_index : n_index + n_row].all()

    mixed = MixedRoPE(HEAD_DIM, num_heads=2)
    c0, _ = mixed(mx.array(base[:, 1:]))
    c1, _ = mixed(mx.array(moved[:, 1:]))
    assert (np.abs(np.array(c1 - c0)) > 1e-7).all()


def test_mixed_rope_init_follows_heo_et_al():
    f = np.array(MixedRoPE(HEAD_DIM, num_heads=3, theta=10.0).freqs)  # (2, H, d/2)
    assert f.shape == (2, 3, HEAD_DIM // 2)
    magnitude = np.hypot(f[0], f[1])
    expected = 1.0 / 10.0 ** (np.arange(0, HEAD_DIM, 4) / HEAD_DIM)
    assert np.allclose(magnitude, np.tile(expected, 2)[None], atol=1e-6)
    # the two halves point in perpendicular directions, turned differently per head
    d = HEAD_DIM // 4
    assert np.allclose((f[0, :, :d] * f[0, :, d:] + f[1, :, :d] * f[1, :, d:]), 0, atol=1e-6)
    assert not np.allclose(f[:, 0], f[:, 1])


def test_rope_shapes_and_dtypes():
    x = mx.ones((2, 3, 7, HEAD_DIM), dtype=mx.bfloat16)
    cos, sin = axial_rope(np.zeros((7, 3)), AXES)
    assert cos.shape == (7, HEAD_DIM // 2) and cos.dtype == mx.float32
    y = apply_rope(x, (cos, sin))
    assert y.shape == x.shape and y.dtype == mx.bfloat16
    assert mx.array_equal(y, x)  # position 0 is the identity rotation
    cos_h, _ = MixedRoPE(HEAD_DIM, num_heads=3)(mx.zeros((7, 2)))
    assert cos_h.shape == (3, 7, HEAD_DIM // 2)
    with pytest.raises(ValueError, match=r"\(L, 3\)"):
        axial_rope(np.zeros((7, 2)), AXES)


def test_flux_ids():
    ids = flux_image_ids(2, 3)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert not flux_text_ids(4).any()


def test_centred_grid_extends_outwards():
    small = {tuple(p) for p in centred_image_ids(4, 6).tolist()}
    large = {tuple(p) for p in centred_image_ids(8, 10).tolist()}
    assert small < large  # the small canvas sits inside the large one, same origin
    assert (0.0, 0.0) in small and (-2.0, -3.0) in small and (1.0, 2.0) in small


def test_diagonal_text_ids_follow_the_grid():
    h, w = 4, 6
    start = text_start_after(h, w)
    text = diagonal_text_ids(5, n_axes=2, start=start)
    assert text.tolist()[0] == [start, start] and text.tolist()[-1] == [start + 4, start + 4]
    image = centred_image_ids(h, w)
    assert start > image.max()  # beyond every image position: no collision
    assert not {tuple(p) for p in text.tolist()} & {tuple(p) for p in image.tolist()}


def test_sincos_2d_matches_diffusers():
    ref = load_fixture("positions", "sincos.safetensors")["sincos_2d_32_6x6"]
    assert_close("2-D sin-cos position table", sincos_2d(32, 6, 6), ref, atol=1e-6)


def test_learned_positions():
    emb = LearnedPositionEmbedding(16, 8)
    assert emb(mx.arange(5)).shape == (5, 8)


# ---- the rotation itself against diffusers (tests/reference/rope_rotation.py) -----------------------

ROTATION_AXES, ROTATION_THETA = (4, 6, 6), 10_000


def test_axial_tables_and_rotation_match_diffusers():
    """FluxPosEmbed's tables (each angle repeated for its channel pair) and apply_rotary_emb's
    rotation of interleaved pairs, at positions up to 400 (angles of hundreds of radians): a
    reversed rotation, swapped pair order or wrong axis split fails here, though it keeps every
    property tested above."""
    ref = load_fixture("rope_rotation", "rope.safetensors")
    cos, sin = axial_rope(np.array(ref["ids"]), ROTATION_AXES, ROTATION_THETA)
    assert_close("axial rope cos table", cos, ref["cos"][:, ::2], atol=1e-6)
    assert_close("axial rope sin table", sin, ref["sin"][:, ::2], atol=1e-6)
    assert mx.array_equal(ref["cos"][:, ::2], ref["cos"][:, 1::2])  # the layout read above
    assert_close("rope rotation (float32)", apply_rope(ref["x"], (cos, sin)), ref["out"], atol=2e-6)


def test_bf16_rotation_rounds_once_as_diffusers():
    """diffusers rotates x.float() by the float32 tables and rounds once to bf16: ours is the same
    function, so it agrees with torch's bf16 result to the last bit on (nearly) every element.
    Rotating in bf16 (the float32 island dropped) rounds three times and differs on 23% of them
    (test_bf16_islands.py drops it on purpose and sees this bound fail)."""
    ref = load_fixture("rope_rotation", "rope.safetensors")
    ours = apply_rope(ref["x_bf16"].astype(mx.bfloat16), axial_rope(np.array(ref["ids"]), ROTATION_AXES, ROTATION_THETA))
    assert ours.dtype == mx.bfloat16
    assert rope_bf16_mismatch(ours, ref["out_bf16"]) <= ROPE_BF16_MISMATCH


# measured: 0 of 1536 elements differ from torch's bf16 rotation (the rounding of one float32 value)
ROPE_BF16_MISMATCH = 0.01


def rope_bf16_mismatch(ours, ref) -> float:
    """The fraction of elements where ours and torch's bf16 results differ at all."""
    return float(np.mean(np.array(ours.astype(mx.float32)) != np.array(ref.astype(mx.float32))))
