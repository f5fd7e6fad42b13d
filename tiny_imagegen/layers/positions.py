"""Where each token sits: position-id builders for RoPE, and absolute position embeddings.

Position ids are (L, n_axes) mx arrays, text first then image when a joint sequence is built.
They are integers, so MLX builds them exactly; the float64 sin-cos tables below use numpy,
imported where it is used (the shipped model's `generate` never loads numpy: 0.075 s saved).

- FLUX: image token at (0, row, col) on the packed grid; every text token at (0, 0, 0), so text
  carries no position of its own (T5 already encoded its order).
- centred: rows and columns counted from the image centre, so a larger canvas extends the grid
  outwards instead of stretching it; positions seen at 256² stay where they were at 1024².
- diagonal text: text token i at (s + i, s + i, ...), on the diagonal just beyond the image
  grid, so text and image positions never collide and text keeps its order.
- MSRoPE (Qwen-Image): both of the above on three axes (frame, row, col), `msrope_*_ids` below.
- Z-Image: caption token j at (1 + j, 0, 0), the image one frame later at (L + 1, row, col):
  the first axis counts the sequence like a time axis, text then image.

Absolute embeddings (ViT/DiT) add a vector per position instead: 2-D sin-cos or learned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    import numpy as np


def image_grid(height: int, width: int, centred: bool = False) -> tuple[mx.array, mx.array]:
    """Row and column of each token of an (height, width) grid, row-major, each (H*W,) int32."""
    rows, cols = mx.repeat(mx.arange(height), width), mx.tile(mx.arange(width), height)
    if centred:
        rows, cols = rows - height // 2, cols - width // 2
    return rows, cols


def _stack(*columns) -> mx.array:
    """Columns (N,) -> (N, len(columns)); an int column is that value for every row."""
    n = next(c.size for c in columns if isinstance(c, mx.array))
    return mx.stack([c if isinstance(c, mx.array) else mx.full((n,), c) for c in columns], axis=-1)


def flux_image_ids(height: int, width: int, index: int = 0) -> mx.array:
    """(H*W, 3) float32 ids (index, row, col) of FLUX's packed latent grid."""
    rows, cols = image_grid(height, width)
    return _stack(index, rows, cols).astype(mx.float32)


def flux_text_ids(length: int) -> mx.array:
    """(L, 3) zeros: FLUX gives text tokens no RoPE position."""
    return mx.zeros((length, 3), mx.float32)


def centred_image_ids(height: int, width: int) -> mx.array:
    """(H*W, 2) float32 ids (row, col) with the origin at the grid centre: row - H//2, col - W//2."""
    rows, cols = image_grid(height, width, centred=True)
    return _stack(rows, cols).astype(mx.float32)


def diagonal_text_ids(length: int, n_axes: int = 2, start: int = 0) -> mx.array:
    """(L, n_axes) float32 ids: text token i at (start + i, ..., start + i)."""
    return mx.repeat((start + mx.arange(length))[:, None], n_axes, axis=1).astype(mx.float32)


def text_start_after(height: int, width: int) -> int:
    """First diagonal position beyond a centred (height, width) grid, as MSRoPE places text."""
    return max(height - height // 2, width - width // 2)


def zimage_caption_ids(length: int) -> mx.array:
    """(L, 3) int32 ids of Z-Image's caption tokens: token j at (1 + j, 0, 0). The learned pad
    tokens that fill a caption up to a multiple of 32 keep counting (diffusers builds the grid at
    the padded length), so pass the padded length."""
    return _stack(1 + mx.arange(length), 0, 0)


def zimage_image_ids(height: int, width: int, start: int, padded_length: int) -> mx.array:
    """(padded_length, 3) int32 ids of Z-Image's image tokens: (start, row, col) row-major, where
    start = the padded caption length + 1 (the frame index just after the caption); the pad
    tokens that fill up to padded_length sit at (0, 0, 0)."""
    rows, cols = image_grid(height, width)
    pad = mx.zeros((padded_length - rows.size, 3), mx.int32)
    return mx.concatenate([_stack(start, rows, cols), pad])


def sincos_1d(dim: int, positions) -> np.ndarray:
    """Transformer sin-cos embedding of positions (N,) -> (N, dim), float64:
    [sin(p ω), cos(p ω)], ω = 10000^(-2j/dim)."""
    import numpy as np

    omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.outer(np.asarray(positions, np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, height: int, width: int) -> mx.array:
    """2-D sin-cos table (H*W, dim) as in MAE / DiT: half the channels encode the column, half the
    row (column first: their meshgrid puts w first, and checkpoints depend on it)."""
    import numpy as np

    assert dim % 4 == 0, f"2-D sin-cos embedding needs dim divisible by 4, got {dim}"
    rows, cols = image_grid(height, width)
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return mx.array(table.astype(np.float32))


class LearnedPositionEmbedding(nn.Module):
    """A learned vector per position (ViT, CLIP's text model)."""

    def __init__(self, num_positions: int, dim: int):
        super().__init__()
        self.weight = 0.02 * mx.random.normal((num_positions, dim))

    def __call__(self, positions: mx.array) -> mx.array:
        """positions (L,) integer -> (L, dim)."""
        return self.weight[positions]


def flux2_image_ids(height: int, width: int, t: int = 0) -> mx.array:
    """(H*W, 4) float32 ids (t, row, col, 0) of FLUX.2's packed latent grid; reference images of an
    edit get t = 10, 20, ... (FP:303-367)."""
    rows, cols = image_grid(height, width)
    return _stack(t, rows, cols, 0).astype(mx.float32)


def flux2_text_ids(length: int) -> mx.array:
    """(L, 4) float32 ids (0, 0, 0, l): FLUX.2 gives text tokens their order on a fourth RoPE axis."""
    return _stack(0, 0, 0, mx.arange(length)).astype(mx.float32)


def sincos_2d_interpolated(dim: int, height: int, width: int, base_size: int, interpolation_scale: float = 1.0) -> mx.array:
    """2-D sin-cos table (H*W, dim) for a grid other than the one a model was trained on, as
    diffusers' `get_2d_sincos_pos_embed(dim, (H, W), base_size, interpolation_scale)` makes it:
    each axis is stretched to span `base_size` positions, p_j = j / (n / base_size) / scale, in
    float32 as there. With height = width = base_size and scale 1 this is `sincos_2d` exactly."""
    import numpy as np

    assert dim % 4 == 0, f"2-D sin-cos embedding needs dim divisible by 4, got {dim}"

    def axis(n):
        return np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)

    rows, cols = np.meshgrid(axis(height), axis(width), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], axis=1)
    return mx.array(table.astype(np.float32))


# ---- MSRoPE (Qwen-Image, "multimodal scalable RoPE") ---------------------------------------------


def msrope_image_ids(height: int, width: int, frame: int = 0) -> mx.array:
    """(H*W, 3) ids (frame, row, col) of Qwen-Image's packed grid, in *centred coordinates*:
    row - (H - H//2), col - (W - W//2), so rows run -(H - H//2) .. H//2 - 1 (H = 3: -2, -1, 0;
    H = 4: -2 .. 1). The odd side's extra row sits on the negative side (QT:430-441), unlike
    `centred_image_ids`. `frame` is 0 for the generated image (edit models number references)."""
    rows, cols = image_grid(height, width)
    rows, cols = rows - (height - height // 2), cols - (width - width // 2)
    return _stack(frame, rows, cols).astype(mx.float32)


def msrope_text_ids(length: int, height: int, width: int) -> mx.array:
    """(L, 3) *diagonal text positions*: token k at (s + k, s + k, s + k), s = max(H//2, W//2),
    one past the largest image coordinate on every axis (QT:285-293). A 4 x 6 grid, 3 tokens:

         col    -3  -2  -1   0   1   2   3   4   5
        row -2   I   I   I   I   I   I   .   .   .
        row -1   I   I   I   I   I   I   .   .   .
        row  0   I   I   I   I   I   I   .   .   .
        row  1   I   I   I   I   I   I   .   .   .
        row  2   .   .   .   .   .   .   .   .   .
        row  3   .   .   .   .   .   .  T0   .   .
        row  4   .   .   .   .   .   .   .  T1   .
        row  5   .   .   .   .   .   .   .   .  T2

        frame axis: image 0, text 3, 4, 5

    Text never collides with an image position whatever the size, a larger image only adds rows and
    columns around the centre, and text order is 1-D RoPE along the diagonal (the same for any
    image: relative positions among text tokens do not depend on where it starts)."""
    return diagonal_text_ids(length, 3, max(height // 2, width // 2))
