"""Pixels <-> the tensors an autoencoder reads and writes: decoder output (B, H, W, 3) in [-1, 1]
-> uint8 PIL images, and PIL images -> encoder input in [-1, 1], both as diffusers'
VaeImageProcessor converts them. PIL and numpy are imported where they are used: making an image
needs neither numpy nor PIL's plugins before the PNG is written."""

import mlx.core as mx


def to_pil(images: mx.array) -> list:
    """Decoder output (B, H, W, 3) in [-1, 1] -> uint8 PIL images (as diffusers' VaeImageProcessor)."""
    from PIL import Image

    x = mx.clip(images.astype(mx.float32) * 0.5 + 0.5, 0.0, 1.0)
    pixels = mx.round(x * 255).astype(mx.uint8)  # half to even, as numpy's round (and torch's)
    mx.eval(pixels)
    B, H, W, _ = pixels.shape
    return [Image.frombytes("RGB", (W, H), bytes(memoryview(pixels[i]))) for i in range(B)]


def from_pil(images) -> mx.array:
    """PIL image(s) -> encoder input (B, H, W, 3) float32 in [-1, 1] (numpy, imported here: only edits read images)."""
    import numpy as np

    images = images if isinstance(images, (list, tuple)) else [images]
    x = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0 for im in images])
    return 2.0 * mx.array(x) - 1.0
