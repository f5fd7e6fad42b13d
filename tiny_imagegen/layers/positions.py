"""Where each token sits: position-id builders for RoPE, and absolute position embeddings.

Position ids are (L, n_axes) arrays, text first then image when a joint sequence is built.

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

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def image_grid(height: int, width: int, centred: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each token of an (height, width) grid, row-major, each (H*W,)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    if centred:
        rows, cols = rows - height // 2, cols - width // 2
    return rows.reshape(-1), cols.reshape(-1)


def flux_image_ids(height: int, width: int, index: int = 0) -> np.ndarray:
    """(H*W, 3) ids (index, row, col) of FLUX's packed latent grid."""
    rows, cols = image_grid(height, width)
    return np.stack([np.full_like(rows, index), rows, cols], axis=-1).astype(np.float32)


def flux_text_ids(length: int) -> np.ndarray:
    """(L, 3) zeros: FLUX gives text tokens no RoPE position."""
    return np.zeros((length, 3), np.float32)


def centred_image_ids(height: int, width: int) -> np.ndarray:
    """(H*W, 2) ids (row, col) with the origin at the grid centre: row - H//2, col - W//2."""
    rows, cols = image_grid(height, width, centred=True)
    return np.stack([rows, cols], axis=-1).astype(np.float32)


def diagonal_text_ids(length: int, n_axes: int = 2, start: int = 0) -> np.ndarray:
    """(L, n_axes) ids: text token i at (start + i, ..., start + i)."""
    return np.repeat((start + np.arange(length))[:, None], n_axes, axis=1).astype(np.float32)


def text_start_after(height: int, width: int) -> int:
    """First diagonal position beyond a centred (height, width) grid, as MSRoPE places text."""
    return max(height - height // 2, width - width // 2)


def zimage_caption_ids(length: int) -> np.ndarray:
    """(L, 3) ids of Z-Image's caption tokens: token j at (1 + j, 0, 0). The learned pad tokens
    that fill a caption up to a multiple of 32 keep counting (diffusers builds the grid at the
    padded length), so pass the padded length."""
    ids = np.zeros((length, 3), np.int64)
    ids[:, 0] = 1 + np.arange(length)
    return ids


def zimage_image_ids(height: int, width: int, start: int, padded_length: int) -> np.ndarray:
    """(padded_length, 3) ids of Z-Image's image tokens: (start, row, col) row-major, where
    start = the padded caption length + 1 (the frame index just after the caption); the pad
    tokens that fill up to padded_length sit at (0, 0, 0)."""
    rows, cols = image_grid(height, width)
    ids = np.zeros((padded_length, 3), np.int64)
    ids[: rows.size] = np.stack([np.full_like(rows, start), rows, cols], axis=-1)
    return ids


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Transformer sin-cos embedding of positions (N,) -> (N, dim): [sin(p ω), cos(p ω)], ω = 10000^(-2j/dim)."""
    omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.outer(np.asarray(positions, np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, height: int, width: int) -> mx.array:
    """2-D sin-cos table (H*W, dim) as in MAE / DiT: half the channels encode the column, half the
    row (column first: their meshgrid puts w first, and checkpoints depend on it)."""
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


def flux2_image_ids(height: int, width: int, t: int = 0) -> np.ndarray:
    """(H*W, 4) ids (t, row, col, 0) of FLUX.2's packed latent grid; reference images of an edit
    get t = 10, 20, ... (FP:303-367)."""
    rows, cols = image_grid(height, width)
    return np.stack([np.full_like(rows, t), rows, cols, np.zeros_like(rows)], axis=-1).astype(np.float32)


def flux2_text_ids(length: int) -> np.ndarray:
    """(L, 4) ids (0, 0, 0, l): FLUX.2 gives text tokens their order on a fourth RoPE axis."""
    ids = np.zeros((length, 4), np.float32)
    ids[:, 3] = np.arange(length)
    return ids


def sincos_2d_interpolated(dim: int, height: int, width: int, base_size: int, interpolation_scale: float = 1.0) -> mx.array:
    """2-D sin-cos table (H*W, dim) for a grid other than the one a model was trained on, as
    diffusers' `get_2d_sincos_pos_embed(dim, (H, W), base_size, interpolation_scale)` makes it:
    each axis is stretched to span `base_size` positions, p_j = j / (n / base_size) / scale, in
    float32 as there. With height = width = base_size and scale 1 this is `sincos_2d` exactly."""
    assert dim % 4 == 0, f"2-D sin-cos embedding needs dim divisible by 4, got {dim}"

    def axis(n):
        return np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)

    rows, cols = np.meshgrid(axis(height), axis(width), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], axis=1)
    return mx.array(table.astype(np.float32))


# ---- MSRoPE (Qwen-Image, "multimodal scalable RoPE") ---------------------------------------------


def msrope_image_ids(height: int, width: int, frame: int = 0) -> np.ndarray:
    """(H*W, 3) ids (frame, row, col) of Qwen-Image's packed grid, in *centred coordinates*:
    row - (H - H//2), col - (W - W//2), so rows run -(H - H//2) .. H//2 - 1 (H = 3: -2, -1, 0;
    H = 4: -2 .. 1). The odd side's extra row sits on the negative side (QT:430-441), unlike
    `centred_image_ids`. `frame` is 0 for the generated image (edit models number references)."""
    rows, cols = image_grid(height, width)
    rows, cols = rows - (height - height // 2), cols - (width - width // 2)
    return np.stack([np.full_like(rows, frame), rows, cols], axis=-1).astype(np.float32)


def msrope_text_ids(length: int, height: int, width: int) -> np.ndarray:
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
