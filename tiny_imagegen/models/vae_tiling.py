"""Decoding big images in bounded memory: limited run-ahead, and tiles.

The decoder's activations grow with the image: 128 channels at full resolution, and on the CPU
each 3x3 convolution also unfolds its input nine-fold (a 256-channel layer at 1024x1024: 9 GB).

Run-ahead. MLX evaluates a graph asynchronously and schedules up to ten operations ahead of the
one running, each already holding its output (and a convolution its unfolded input): on the
decoder that multiplies the peak by ~2.5-4. While more memory is in use than MLX's memory limit,
it waits for running operations instead. `limited_run_ahead` sets that limit a little above what
is held on entry: small operations still run ahead, the big ones one at a time, so the peak is
about that of the largest single layer plus the headroom. (Waiting costs time: with 0.25 GB of
headroom a 512x512 decode took 1.7x as long on a busy 2-core CPU, with 2 GB 1.2x.)

Tiles. Decoding the latents in tiles bounds the largest layer by the tile size. Tiles overlap by
`overlap` latent positions; over the overlap each tile fades in linearly over its upper (then
left) neighbour, which hides the seams that independent GroupNorm statistics and attention per
tile would leave.

The algorithm is diffusers' `AutoencoderKL.tiled_decode` (tile_latent_min_size = tile,
tile_overlap_factor = overlap / tile), so it can be checked against it:

    tiles start every `tile - overlap` latent positions, in raster order;
    each decoded tile is blended with its already blended upper neighbour, then its left one;
    each tile keeps its first (tile - overlap) * 8 rows and columns; the kept parts are concatenated.
"""

from contextlib import contextmanager
from typing import Callable

import mlx.core as mx


@contextmanager
def limited_run_ahead(headroom: int = 2 * 2**30):
    """Let MLX schedule ahead only while it holds less than `headroom` bytes more than now."""
    # The limit is a guideline for scheduling, not a cap: allocations above it still succeed.
    previous = mx.set_memory_limit(mx.get_active_memory() + headroom)
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


def blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    """b with its first `extent` rows (axis 1) or columns (axis 2) faded in over a's last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    w = (mx.arange(extent, dtype=mx.float32) / extent).reshape(shape)  # 0, 1/n, ..., (n-1)/n
    a_tail = mx.take(a, mx.arange(a.shape[axis] - extent, a.shape[axis]), axis=axis)
    b_head, b_rest = mx.split(b, [extent], axis=axis)
    # Each product in float32 and rounded to the tiles' dtype, as torch multiplies a bf16 tensor
    # by diffusers' Python-float weights: the blend stays in the VAE's dtype (no-ops in float32).
    faded = (a_tail.astype(mx.float32) * (1 - w)).astype(a.dtype) + (b_head.astype(mx.float32) * w).astype(b.dtype)
    return mx.concatenate([faded, b_rest], axis=axis)


def tiled_decode(
    decode: Callable[[mx.array], mx.array], z: mx.array, tile: int = 64, overlap: int = 16, scale: int = 8
) -> mx.array:
    """decode (B, h, w, C) -> (B, scale*h, scale*w, 3), applied to overlapping tiles of z."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile): got tile={tile}, overlap={overlap}")
    stride, fade, keep = tile - overlap, overlap * scale, (tile - overlap) * scale
    h, w = z.shape[1:3]
    rows = []
    for i in range(0, h, stride):
        row = []
        for j in range(0, w, stride):
            t = decode(z[:, i : i + tile, j : j + tile])
            if rows:
                t = blend(rows[-1][len(row)], t, fade, axis=1)
            if row:
                t = blend(row[-1], t, fade, axis=2)
            mx.eval(t)  # one tile at a time: this is what bounds the memory
            row.append(t)
        rows.append(row)
    return mx.concatenate(
        [mx.concatenate([t[:, :keep, :keep] for t in row], axis=2) for row in rows], axis=1
    )
