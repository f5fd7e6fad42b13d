"""MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache"), as
diffusers' hook (`MagCacheConfig`, hooks/mag_cache.py) decides it, step for step.

The magnitude of the residual the whole block stack adds, |r_t| (r_t = the last block's image
stream - the first block's image input), changes by a ratio m_t = |r_t| / |r_{t-1}| per step that
is nearly the same for every prompt, so a model's ratios are measured once ("calibration") and the
decision is a fixed schedule from them and the step index, not from the content:

1. the first int(retention_ratio * n + 0.5) steps are always computed;
2. after them, each step: ratio *= m_t; steps += 1; err += |1 - ratio|;
   skip iff a residual is remembered and err <= threshold and steps <= max_skip_steps (K),
   else reset ratio, steps, err to 1, 0, 0 and compute;
3. a computed step runs every block and remembers r = last block's image output - first block's
   image input; a skipped step runs no block at all: image = input + r, text = its input.

The ratios a model was calibrated at (any number of steps) are resampled to this generation's n
steps by nearest neighbour, index round(i * (L - 1) / (n - 1)) (diffusers' `nearest_interp`).
diffusers keeps them in a float32 tensor, so its accumulators are float32 tensors after the first
product: we accumulate in float32 likewise, so decisions on a boundary agree too.

Calibration (`calibrate=True`): nothing is skipped; each computed step after the first records
mean over tokens of |r_t| / (|r_{t-1}| + 1e-8) (norms over channels, the mean over the batch rows
too), the first step 1.0 — the numbers the hook prints.

The per-generation contexts and the batch of guidance halves are step_cache.py's
(`GenerationCache`, one state per context): here the halves' decisions are equal (one schedule), so
a batched [positive; negative] forward is computed or skipped as a whole, each half adding its own
residual.

numpy (the float32 accumulators) is imported where it is used: `generate` without `--cache mag`
never loads it (0.075 s of the first image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import mlx.core as mx

if TYPE_CHECKING:
    import numpy as np

Streams = tuple[mx.array, mx.array]  # (image stream (B, L_img, D), text stream (B, L_txt, D))

MAX_SKIP_STEPS, RETENTION_RATIO = 3, 0.2  # diffusers' MagCacheConfig defaults


def nearest_interp(ratios, n: int) -> np.ndarray:
    """`ratios` (L values, calibrated at L steps) -> n values: nearest neighbour on a grid spanning
    both ends (diffusers' nearest_interp, MAG:69-80; n == 1 keeps the last)."""
    import numpy as np

    ratios = np.asarray(ratios, np.float32)
    if n == 1:
        return ratios[-1:]
    scale = np.float32((len(ratios) - 1) / (n - 1))  # float32 as torch's grid * scale
    return ratios[np.round(np.arange(n, dtype=np.float32) * scale).astype(np.int64)]


@dataclass
class MagCache:
    """One cache context's state for one generation of `n` steps. Called as the model's `cache=`."""

    threshold: float
    ratios: np.ndarray | None  # float32, one per step (already resampled to n); None when calibrating
    n: int  # steps of this generation (diffusers' num_inference_steps)
    max_skip_steps: int = MAX_SKIP_STEPS
    retention_ratio: float = RETENTION_RATIO
    calibrate: bool = False
    step: int = 0  # forwards seen
    residual: mx.array | None = None  # last block's image output - first block's image input, last computed step
    ratio: np.float32 | float = 1.0  # the accumulators (float32 from the first product, as diffusers' tensors)
    err: np.float32 | float = 0.0
    skips: int = 0  # steps accumulated since the last computed one (diffusers' accumulated_steps)
    skipped: list = field(default_factory=list)  # the forward indices that skipped
    measured: list = field(default_factory=list)  # calibration: the ratio of each step

    def __call__(self, img, txt, head, rest) -> Streams:
        return run_blocks([self], img, txt, head, rest)

    def decide(self) -> bool:
        """True: compute this step (advances the accumulators as the hook does, MAG:202-226)."""
        import numpy as np

        if self.calibrate or self.step < int(self.retention_ratio * self.n + 0.5):
            return True
        m = self.ratios[self.step] if self.step < len(self.ratios) else np.float32(1.0)
        self.ratio = np.float32(self.ratio * m)
        self.skips += 1
        self.err = np.float32(self.err + np.abs(np.float32(1.0) - self.ratio))
        if self.residual is not None and self.err <= np.float32(self.threshold) and self.skips <= self.max_skip_steps:
            return False
        self.ratio, self.skips, self.err = np.float32(1.0), 0, np.float32(0.0)
        return True

    def remember(self, residual: mx.array) -> None:
        """A computed step's residual (B, L_img, D); calibrating, the ratio of its magnitude to the last."""
        if self.calibrate:
            if self.residual is None:
                self.measured.append(1.0)
            else:
                norm = lambda r: mx.linalg.norm(r.astype(mx.float32), axis=-1)  # noqa: E731  (B, L)
                self.measured.append(mx.mean(norm(residual) / (norm(self.residual) + 1e-8)).item())
        self.residual = residual


def run_blocks(states: list[MagCache], img: mx.array, txt: mx.array,
               head: Callable[[mx.array, mx.array], Streams], rest: Callable[[mx.array, mx.array], Streams]) -> Streams:
    """The streams after all blocks (head = the first block, rest = the others) for a batch of
    len(states) equal slices, each its own context: the blocks run (on the whole batch) when any
    slice computes; a slice that skips gets its input + its own remembered residual, its text
    stream as it came in."""
    compute = [st.decide() for st in states]
    if any(compute):
        out_img, out_txt = rest(*head(img, txt))
    n = img.shape[0] // len(states)
    rows = [slice(g * n, (g + 1) * n) for g in range(len(states))]
    whole = len(states) == 1
    take = (lambda a, s: a) if whole else (lambda a, s: a[s])  # noqa: E731
    parts = []
    for st, s, run in zip(states, rows, compute):
        if run:
            st.remember(take(out_img, s) - take(img, s))
            parts.append(take(out_img, s))
        else:
            st.skipped.append(st.step)
            parts.append(take(img, s) + st.residual)
        st.step += 1
    if all(compute):
        return out_img, out_txt
    image = parts[0] if whole else mx.concatenate(parts)
    return image, (txt if not any(compute) else mx.concatenate(
        [take(out_txt, s) if run else take(txt, s) for s, run in zip(rows, compute)]))
