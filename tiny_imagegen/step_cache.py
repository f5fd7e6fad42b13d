"""Step caching: skip most of the transformer on steps where its input barely changed.

First-Block Cache (FBC; ParaAttention, after TeaCache, Liu et al. 2024), as diffusers' hook
(`FirstBlockCacheConfig`, hooks/first_block_cache.py) decides it, step for step:

1. run the first block; r = its image-stream output - its image-stream input;
2. on the first step, or when  mean|r - r_ref| / mean|r_ref| > threshold  (means over the whole
   tensor, batch included), run the remaining blocks and remember r_ref = r and the residual the
   remaining blocks added to both streams, (tail_img - head_img, tail_txt - head_txt);
3. otherwise skip them: each stream = the first block's output + that remembered residual.

The reference r_ref moves only on computed steps, so drift accumulates until a step is computed.
A skipped step costs the first block, two means and one host sync (`.item()`): in a 57-block
FLUX.1 that is ~2% of a full step (docs/performance.md).

Classifier-free guidance: diffusers runs the positive and negative passes in separate cache
contexts ("cond", "uncond"), each with its own decisions and residuals. We batch the two passes
into one forward, so the cache takes `groups=2`: the batch's halves decide independently (each
mean over its own half), the remaining blocks run when either half needs them, and a half that
skips takes its cached residual, as its own context would. State lives in one FirstBlockCache
object per generation (`new_generation` gives a fresh one), so reruns are identical.

Step-distilled models (FLUX.1-schnell, FLUX.2-klein, Z-Image-Turbo: 1-8 steps) gain nothing:
consecutive steps are far apart and every step is computed.
"""

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

METHODS = ("fbc",)
DEFAULT_THRESHOLD = {"fbc": 0.05}  # diffusers' FirstBlockCacheConfig default

Streams = tuple[mx.array, mx.array]  # (image stream (B, L_img, D), text stream (B, L_txt, D))


@dataclass(frozen=True)
class CacheConfig:
    """`--cache fbc[:THRESHOLD]`: the method and its threshold."""

    method: str = "fbc"
    threshold: float = DEFAULT_THRESHOLD["fbc"]

    def __str__(self) -> str:
        return f"{self.method}:{self.threshold:g}"

    @classmethod
    def parse(cls, spec: str | None) -> "CacheConfig | None":
        """"fbc" / "fbc:0.1" -> CacheConfig; None / "" / "none" / "off" -> None (no caching).
        A ValueError (one line) for anything else."""
        if spec is None or spec.strip().lower() in ("", "none", "off"):
            return None
        method, _, value = spec.strip().lower().partition(":")
        if method not in METHODS:
            raise ValueError(f"unknown cache method {method!r} in {spec!r}: use {' | '.join(m + '[:THRESHOLD]' for m in METHODS)}")
        if not value:
            return cls(method, DEFAULT_THRESHOLD[method])
        try:
            threshold = float(value)
        except ValueError:
            raise ValueError(f"cache threshold {value!r} in {spec!r} is not a number") from None
        if not 0.0 <= threshold < float("inf"):
            raise ValueError(f"cache threshold must be >= 0, got {threshold:g}")
        return cls(method, threshold)

    def new_generation(self, groups: int = 1) -> "FirstBlockCache":
        return FirstBlockCache(self.threshold, groups)


def relative_change(r: mx.array, reference: mx.array) -> float:
    """mean|r - reference| / mean|reference|, in float32, as a Python float (a host sync)."""
    r, reference = r.astype(mx.float32), reference.astype(mx.float32)
    return (mx.mean(mx.abs(r - reference)) / mx.mean(mx.abs(reference))).item()


@dataclass
class FirstBlockCache:
    """One generation's cache state. `groups`: how many independent contexts the batch holds
    (1; 2 for [positive; negative] guidance), equal slices along the batch axis."""

    threshold: float
    groups: int = 1
    step: int = 0  # forwards seen
    reference: list = field(default_factory=list)  # per group: head residual of its last computed step
    tail: list = field(default_factory=list)  # per group: (img, txt) residual of the remaining blocks
    skipped: list = field(default_factory=list)  # per group: the forward indices that skipped

    def __post_init__(self):
        self.reference, self.tail = [None] * self.groups, [None] * self.groups
        self.skipped = [[] for _ in range(self.groups)]

    def __call__(self, img: mx.array, txt: mx.array, head: Callable[[mx.array, mx.array], Streams],
                 rest: Callable[[mx.array, mx.array], Streams]) -> Streams:
        """The streams after all blocks: head = the first block, rest = all the others."""
        head_img, head_txt = head(img, txt)
        r = head_img - img
        n = img.shape[0] // self.groups
        rows = [slice(g * n, (g + 1) * n) for g in range(self.groups)]
        compute = [self.reference[g] is None or relative_change(r[s], self.reference[g]) > self.threshold
                   for g, s in enumerate(rows)]
        if any(compute):
            out_img, out_txt = rest(head_img, head_txt)
        parts = []
        for g, s in enumerate(rows):
            if compute[g]:
                o_img, o_txt = (out_img, out_txt) if self.groups == 1 else (out_img[s], out_txt[s])
                h_img, h_txt = (head_img, head_txt) if self.groups == 1 else (head_img[s], head_txt[s])
                self.reference[g] = r if self.groups == 1 else r[s]
                self.tail[g] = (o_img - h_img, o_txt - h_txt)
                parts.append((o_img, o_txt))
            else:
                self.skipped[g].append(self.step)
                h_img, h_txt = (head_img, head_txt) if self.groups == 1 else (head_img[s], head_txt[s])
                parts.append((self.tail[g][0] + h_img, self.tail[g][1] + h_txt))
        self.step += 1
        if self.groups == 1:
            return parts[0]
        return mx.concatenate([p[0] for p in parts]), mx.concatenate([p[1] for p in parts])

    @property
    def computed_fraction(self) -> float:
        """The share of forwards (over all groups) that ran the remaining blocks."""
        total = self.step * self.groups
        return 1.0 - sum(len(s) for s in self.skipped) / total if total else 1.0


class GenerationCache:
    """The cache states of one generation (one call of a family's `sample`), one per context as
    diffusers keeps one per `cache_context` name: a single state; with guidance batched into one
    forward, a single state with groups=2; with guidance as two forwards per step, a state for
    the positive and one for the negative pass, taken in turn. `states` stays readable after."""

    def __init__(self, config: CacheConfig, guidance: bool, batched: bool):
        if guidance and batched:
            self.states = [config.new_generation(groups=2)]
        else:
            self.states = [config.new_generation() for _ in range(1 + guidance)]
        self._calls = 0

    def next(self) -> FirstBlockCache:
        """The state for the next forward call (positive, negative, positive, ... when unbatched)."""
        state = self.states[self._calls % len(self.states)]
        self._calls += 1
        return state


def for_generation(cache: "str | CacheConfig | None", guidance: bool, batched: bool) -> GenerationCache | None:
    """A family's `cache=` option (a spec string, a CacheConfig or None) -> this generation's states."""
    config = CacheConfig.parse(cache) if isinstance(cache, str) or cache is None else cache
    return None if config is None else GenerationCache(config, guidance, batched)
