"""How a generation fits in the device's memory: wired weights on Apple GPUs, and when the VAE
decodes in tiles.

Apple GPUs share the machine's memory with the system. Metal may page out ("un-wire") buffers
that a large model has not touched for a moment, and reading them back stalls the next step;
MLX lets a program keep up to a limit wired (`mx.set_wired_limit`), and mlx-lm sets it to the
device's recommended working set while it generates. We do the same while a pipeline samples,
when its weights are a large part of that working set.

The VAE decoder's activations grow with the image: measured on this CPU for the FLUX VAE in
float32, 13.2 GiB at 1024x1024 untiled (26 full-resolution copies of its first level's 128
channels), 4.6 GiB in 512-pixel tiles. `auto_tiling` tiles above 768x768 pixels (as before), and
also below that when the untiled estimate would take more than half of the device's memory.
"""

import contextlib
import os

import mlx.core as mx

UNTILED_COPIES = 26  # full-resolution first-level activations of an untiled decode (measured, see above)
AUTO_TILE_PIXELS = 768 * 768


def device_memory() -> int | None:
    """Bytes the device can work in: Metal's recommended working set, else the machine's memory."""
    if mx.metal.is_available():
        return int(mx.metal.device_info()["max_recommended_working_set_size"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def untiled_decode_bytes(width: int, height: int, first_channels: int, dtype: mx.Dtype) -> int:
    """Estimated peak of decoding a width x height image in one piece."""
    return UNTILED_COPIES * width * height * first_channels * dtype.size


def auto_tiling(width: int, height: int, first_channels: int, dtype: mx.Dtype, memory: int | None = None) -> bool:
    """Tile the decode above 768x768 pixels, or where the untiled estimate exceeds half the memory."""
    memory = device_memory() if memory is None else memory
    too_big = memory is not None and untiled_decode_bytes(width, height, first_channels, dtype) > memory // 2
    return width * height > AUTO_TILE_PIXELS or too_big


@contextlib.contextmanager
def wired_weights(weight_bytes: int):
    """While sampling on an Apple GPU: keep the working set wired when the weights are more than a
    quarter of it (mlx-lm's practice); elsewhere, or for small models, nothing changes."""
    if not mx.metal.is_available():
        yield
        return
    limit = int(mx.metal.device_info()["max_recommended_working_set_size"])
    if weight_bytes < limit // 4:
        yield
        return
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)
