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
into one forward, so `run_blocks` takes one state per slice of the batch: the halves decide
independently (each mean over its own half), the remaining blocks run when either half needs them,
and a half that skips takes its own cached residual, as its own context would. The states are new
for every generation (`GenerationCache`), so reruns are identical.

Step-distilled models (FLUX.1-schnell, FLUX.2-klein, Z-Image-Turbo: 1-8 steps) gain nothing:
consecutive steps are far apart and every step is computed.

The second method, MagCache (`--cache mag[:THRESHOLD]`, mag_cache.py), decides from a schedule of
ratios calibrated per model (the model's defaults, `SamplingDefaults.mag_ratios`) and skips the whole
stack; it shares this module's configuration and per-generation contexts.
"""

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from . import mag_cache
from .mag_cache import MAX_SKIP_STEPS, RETENTION_RATIO, MagCache, nearest_interp

METHODS = ("fbc", "mag")
DEFAULT_THRESHOLD = {"fbc": 0.05, "mag": 0.06}  # diffusers' FirstBlockCacheConfig / MagCacheConfig defaults

Streams = tuple[mx.array, mx.array]  # (image stream (B, L_img, D), text stream (B, L_txt, D))


@dataclass(frozen=True)
class CacheConfig:
    """`--cache fbc[:THRESHOLD]` / `mag[:THRESHOLD]`: the method and its threshold. MagCache's other
    knobs (diffusers' defaults: K = 3 skips in a row at most, the first 20% of steps always computed)
    and its calibration mode (`mag:calibrate`: skip nothing, record the ratios) are set here;
    `mag_ratios` and `retention_ratio` None = the model's own (its defaults)."""

    method: str = "fbc"
    threshold: float | None = None  # None: the method's default
    max_skip_steps: int = MAX_SKIP_STEPS
    retention_ratio: float | None = None  # None: the model's (its defaults' mag_retention)
    calibrate: bool = False
    mag_ratios: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.threshold is None:
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD[self.method])

    def __str__(self) -> str:
        return f"{self.method}:calibrate" if self.calibrate else f"{self.method}:{self.threshold:g}"

    @classmethod
    def parse(cls, spec: str | None) -> "CacheConfig | None":
        """"fbc" / "fbc:0.1" / "mag" / "mag:0.1" / "mag:calibrate" -> CacheConfig; None / "" / "none"
        / "off" -> None (no caching). A ValueError (one line) for anything else."""
        if spec is None or spec.strip().lower() in ("", "none", "off"):
            return None
        method, _, value = spec.strip().lower().partition(":")
        if method not in METHODS:
            raise ValueError(f"unknown cache method {method!r} in {spec!r}: use {' | '.join(m + '[:THRESHOLD]' for m in METHODS)}")
        if not value:
            return cls(method, DEFAULT_THRESHOLD[method])
        if method == "mag" and value == "calibrate":
            return cls(method, DEFAULT_THRESHOLD[method], calibrate=True)
        try:
            threshold = float(value)
        except ValueError:
            raise ValueError(f"cache threshold {value!r} in {spec!r} is not a number") from None
        if not 0.0 <= threshold < float("inf"):
            raise ValueError(f"cache threshold must be >= 0, got {threshold:g}")
        return cls(method, threshold)

    def new_generation(self, steps: int = 0, mag_ratios=None,
                       mag_retention: float = RETENTION_RATIO) -> "FirstBlockCache | MagCache":
        """A fresh context for a generation of `steps` forwards; MagCache resamples `mag_ratios`
        (the model's, unless the config carries its own) to them, and computes the first
        `mag_retention` of them (the model's, unless the config sets `retention_ratio`)."""
        if self.method == "fbc":
            return FirstBlockCache(self.threshold)
        if steps < 1:  # its schedule is laid over the generation's steps
            raise ValueError("MagCache needs the number of steps of the generation")
        ratios = self.mag_ratios if self.mag_ratios is not None else mag_ratios
        if not (ratios is not None and len(ratios)) and not self.calibrate:
            raise ValueError(MISSING_RATIOS)
        retention = mag_retention if self.retention_ratio is None else self.retention_ratio
        return MagCache(self.threshold, None if self.calibrate else nearest_interp(ratios, steps), steps,
                        self.max_skip_steps, retention, self.calibrate)


MISSING_RATIOS = ("mag needs this model's calibrated magnitude ratios (mag_ratios in its registry defaults), "
                  "which it has not: use fbc, or calibrate with --cache mag:calibrate --verbose")


def check_method(cache: "str | CacheConfig | None", mag_ratios) -> None:
    """A ValueError (one line) before any work when `cache` asks for MagCache on a model without ratios."""
    config = CacheConfig.parse(cache) if isinstance(cache, str) or cache is None else cache
    if config and config.method == "mag" and not config.calibrate and not (config.mag_ratios or mag_ratios):
        raise ValueError(MISSING_RATIOS)


def relative_change(r: mx.array, reference: mx.array, sync: bool = True):
    """mean|r - reference| / mean|reference|, in float32: a Python float (a host sync), or with
    sync=False the scalar array."""
    r, reference = r.astype(mx.float32), reference.astype(mx.float32)
    change = mx.mean(mx.abs(r - reference)) / mx.mean(mx.abs(reference))
    return change.item() if sync else change


@dataclass
class FirstBlockCache:
    """One cache context's state for one generation (diffusers keeps one per `cache_context` name:
    the positive pass's, the negative pass's). Called as the model's `cache=`."""

    threshold: float
    step: int = 0  # forwards seen
    reference: mx.array | None = None  # the head residual of the last computed step
    tail: Streams | None = None  # what the remaining blocks added to (img, txt) on that step
    skipped: list = field(default_factory=list)  # the forward indices that skipped

    def __call__(self, img, txt, head, rest) -> Streams:
        return run_blocks([self], img, txt, head, rest)


def run_blocks(states: list, img: mx.array, txt: mx.array,
               head: Callable[[mx.array, mx.array], Streams], rest: Callable[[mx.array, mx.array], Streams]) -> Streams:
    """A batch of len(states) equal slices, each its own context, through the block stack by the
    contexts' method (First-Block Cache below, or MagCache)."""
    if isinstance(states[0], MagCache):
        return mag_cache.run_blocks(states, img, txt, head, rest)
    return first_block_cache(states, img, txt, head, rest)


Block = Callable[[mx.array, mx.array], Streams]  # (img, txt) -> (img, txt) through some of the blocks


def first_block_cache(states: list[FirstBlockCache], img: mx.array, txt: mx.array, head: Block, rest: Block) -> Streams:
    """The streams after all blocks (head = the first block, rest = all the others) for a batch made
    of len(states) equal slices, each its own context: each slice decides on its own mean; the
    remaining blocks run (on the whole batch) when any slice needs them; a slice that skips takes
    its own cached residual."""
    head_img, head_txt = head(img, txt)
    r = head_img - img
    n = img.shape[0] // len(states)
    rows = [slice(g * n, (g + 1) * n) for g in range(len(states))]
    whole = len(states) == 1
    take = (lambda a, s: a) if whole else (lambda a, s: a[s])  # noqa: E731
    compute = [st.reference is None for st in states]
    if not all(compute):  # one host sync for all contexts
        changes = mx.stack([relative_change(take(r, s), st.reference, sync=False)
                            for st, s, c in zip(states, rows, compute) if not c]).tolist()
        changes = iter(changes)
        compute = [c or next(changes) > st.threshold for st, c in zip(states, compute)]
    if any(compute):
        out_img, out_txt = rest(head_img, head_txt)
    parts = []
    for st, s, run in zip(states, rows, compute):
        h_img, h_txt = take(head_img, s), take(head_txt, s)
        if run:
            o_img, o_txt = take(out_img, s), take(out_txt, s)
            st.reference, st.tail = take(r, s), (o_img - h_img, o_txt - h_txt)
            parts.append((o_img, o_txt))
        else:
            st.skipped.append(st.step)
            parts.append((st.tail[0] + h_img, st.tail[1] + h_txt))
        st.step += 1
    if whole:
        return parts[0]
    if all(compute):  # nothing to splice
        return out_img, out_txt
    return mx.concatenate([p[0] for p in parts]), mx.concatenate([p[1] for p in parts])


class GenerationCache:
    """The cache contexts of one generation (one call of a family's `sample`): `positive` and, with
    guidance, `negative`, as diffusers' "cond" and "uncond". `batched` is the `cache=` of a forward
    whose batch is [positive; negative]; `states` stays readable after the generation."""

    def __init__(self, config: CacheConfig, guidance: bool, steps: int = 0, mag_ratios=None,
                 mag_retention: float = RETENTION_RATIO):
        self.positive = config.new_generation(steps, mag_ratios, mag_retention)
        self.negative = config.new_generation(steps, mag_ratios, mag_retention) if guidance else None
        self.states = [self.positive] + ([self.negative] if guidance else [])

    def batched(self, img, txt, head, rest) -> Streams:
        return run_blocks([self.positive, self.negative], img, txt, head, rest)


def for_generation(cache: "str | CacheConfig | None", guidance: bool, steps: int = 0,
                   mag_ratios=None, mag_retention: float = RETENTION_RATIO) -> GenerationCache | None:
    """A family's `cache=` option (a spec string, a CacheConfig or None) -> the contexts of this
    generation of `steps` forwards per context; `mag_ratios`, `mag_retention`: the model's (its
    defaults), for MagCache."""
    config = CacheConfig.parse(cache) if isinstance(cache, str) or cache is None else cache
    return None if config is None else GenerationCache(config, guidance, steps, mag_ratios, mag_retention)


def computed_fraction(states: list) -> float:
    """The share of forwards (over all contexts) that ran the remaining blocks."""
    total = sum(st.step for st in states)
    return 1.0 - sum(len(st.skipped) for st in states) / total if total else 1.0
