"""Masked sampling (inpainting), one mechanism for every family.

Start as image-to-image: the init image's latents x0, noised to the first step's level with the
noise ε. After every step, the known region (mask 0) is put back: x0 noised to the level the
step arrived at, with the same ε (clean x0 after the last step), and the model's result kept only
where the mask is 1:

    x <- (1 - m) · noised(x0, ε, level_{i+1}) + m · x           (FI:1182-1191, FKI:1216-1224)

So at the end the known region is x0 itself, and the decoded image equals the input there up to
the VAE's round trip. The family says what a level is and how to noise: flow matching
(FLUX.1, FLUX.2, Z-Image, SD3, Qwen-Image) noises to σ as σ ε + (1 - σ) x0; DDPM (SD 1.5) as
sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε.
"""

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx


@dataclass
class KnownRegion:
    """x0 (the init image's latents), ε and the mask (1 = repaint), all in the sampler's layout
    (the mask broadcasts over channels); `noised(x0, ε, level)` is the family's forward process."""

    x0: mx.array
    noise: mx.array
    mask: mx.array
    noised: Callable[[mx.array, mx.array, object], mx.array]

    def blend(self, x: mx.array, level=None) -> mx.array:
        """Keep x where the mask is 1; elsewhere x0 at `level` (None: clean, the last step)."""
        known = self.x0 if level is None else self.noised(self.x0, self.noise, level)
        return (1 - self.mask) * known + self.mask * x


def masked_steps(step: Callable[[int, mx.array], mx.array], region: KnownRegion | None, levels: list) -> Callable:
    """step(i, x) followed by the blend at levels[i + 1] (the last step blends with x0 itself).
    `region` None (image-to-image, text-to-image): the step unchanged."""
    if region is None:
        return step
    n = len(levels) - 1

    def masked(i: int, x: mx.array) -> mx.array:
        return region.blend(step(i, x), levels[i + 1] if i < n - 1 else None)

    return masked


def flow_noised(x0: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """The flow's forward process as the scheduler's scale_noise computes it (SCH:234): σ in the
    sample's dtype, σ ε + (1 - σ) x0."""
    s = mx.array(sigma, dtype=mx.float32).astype(x0.dtype)
    return s * noise.astype(x0.dtype) + (1 - s) * x0
