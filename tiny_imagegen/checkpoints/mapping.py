"""Checkpoint key tables: how a published checkpoint's tensors become our parameters.

Every model has one table per checkpoint layout. A table is a list of `Rule`s, read top to bottom:

    Rule("double_blocks.{i}.img_attn.qkv.{p}",                     # our parameter
         ("transformer_blocks.{i}.attn.to_q.{p}",                  # the tensors it is made of
          "transformer_blocks.{i}.attn.to_k.{p}",
          "transformer_blocks.{i}.attn.to_v.{p}"),
         concat)                                                   # how they combine

`{name}` matches one dotted segment, `{name:*}` any dotted rest. For each of our parameters the first
rule whose left side matches is used; source keys are filled in from the same placeholders. A source
pattern may also count an index down, `{3-i}` = 3 minus the index matched by `{i}`, for layouts that
number the same blocks in opposite orders (the VAE decoder's up blocks: BFL `up.3` is diffusers
`up_blocks.0`).

`map_checkpoint` checks the whole checkpoint before anything is loaded: every source tensor that is
needed and absent, every one left over, and every shape that does not fit is reported by name in
one `CheckpointError`. Because MLX arrays are lazy, the same code checks a full-size key/shape
manifest with `mx.zeros` placeholders at no memory cost.
"""

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: lists every missing, unexpected or mis-shaped key."""


# ---- transforms: list of source tensors -> our tensor -------------------------------------------


def take(xs: list[mx.array]) -> mx.array:
    """One tensor, as it is."""
    return xs[0]


def concat(xs: list[mx.array]) -> mx.array:
    """Fuse separately stored projections (q, k, v, ...) along the output dimension."""
    return mx.concatenate(xs, axis=0)


def swap_halves(xs: list[mx.array]) -> mx.array:
    """(scale, shift) <-> (shift, scale): diffusers' AdaLayerNormContinuous orders its chunks
    the other way round from the original FLUX final layer."""
    a, b = mx.split(xs[0], 2, axis=0)
    return mx.concatenate([b, a], axis=0)


def conv_channels_last(xs: list[mx.array]) -> mx.array:
    """PyTorch conv weights are (O, I, *k); MLX convolutions want (O, *k, I)."""
    w = xs[0]
    return mx.moveaxis(w, 1, -1) if w.ndim > 2 else w


# ---- rules and tables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: str | tuple[str, ...]
    transform: Callable[[list[mx.array]], mx.array] = take

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.theirs,) if isinstance(self.theirs, str) else self.theirs


@dataclass(frozen=True)
class KeyTable:
    """One checkpoint layout of one model: the rules, plus source keys that are known and unused
    (buffers such as `position_ids`, or parts of a bigger model such as a T5 decoder)."""

    name: str
    rules: Sequence[Rule]
    ignore: Sequence[str] = field(default_factory=tuple)

    @cached_property
    def _compiled(self) -> list[tuple[re.Pattern, Rule]]:
        # compiled on first use, not at import: every family's tables are defined when the package is
        # imported, and compiling them all took ~15 ms of a first image that reads none of them
        return [(_regex(r.ours), r) for r in self.rules]

    @cached_property
    def _ignored(self) -> list[re.Pattern]:
        return [_regex(p) for p in self.ignore]

    def rule_for(self, key: str) -> tuple[Rule, dict[str, str]]:
        for regex, rule in self._compiled:
            m = regex.fullmatch(key)
            if m:
                return rule, m.groupdict()
        raise KeyError(f"{self.name}: no rule in the key table produces our parameter {key!r}")

    def ignored(self, key: str) -> bool:
        return any(r.fullmatch(key) for r in self._ignored)


_PLACEHOLDER = re.compile(r"\{(\w+)(:\*)?\}")


def _regex(pattern: str) -> re.Pattern:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m[1]}>.+)" if m[2] else f"(?P<{m[1]}>[^.]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out))


_COUNTDOWN = re.compile(r"\{(\d+)-(\w+)\}")  # {3-i}: only in source patterns


def _fill(pattern: str, values: dict[str, str]) -> str:
    pattern = _COUNTDOWN.sub(lambda m: str(int(m[1]) - int(values[m[2]])), pattern)
    return _PLACEHOLDER.sub(lambda m: values[m[1]], pattern)


def source_keys(table: KeyTable, key: str) -> tuple[list[str], Callable[[list[mx.array]], mx.array]]:
    """The checkpoint keys our parameter `key` is made of, and how they combine (the table read
    forwards: e.g. a LoRA file names the pieces of our fused projections by these keys)."""
    rule, values = table.rule_for(key)
    return [_fill(p, values) for p in rule.sources], rule.transform


# ---- applying a table -----------------------------------------------------------------------------


def map_checkpoint(
    table: KeyTable, expected: dict[str, tuple[int, ...]], source: dict[str, mx.array]
) -> dict[str, mx.array]:
    """Map `source` (checkpoint key -> array) onto our parameters `expected` (key -> shape).

    Returns our key -> array (still lazy). Raises CheckpointError naming every problem."""
    out, used, missing, misshaped = {}, set(), [], []
    for key, shape in expected.items():
        rule, values = table.rule_for(key)
        names = [_fill(p, values) for p in rule.sources]
        absent = [n for n in names if n not in source]
        if absent:
            missing += [f"{n} (for our {key}, shape {tuple(shape)})" for n in absent]
            continue
        used.update(names)
        value = rule.transform([source[n] for n in names])
        if tuple(value.shape) != tuple(shape):
            found = ", ".join(f"{n} {tuple(source[n].shape)}" for n in names)
            misshaped.append(f"{key}: expected {tuple(shape)}, found {tuple(value.shape)} from {found}")
            continue
        out[key] = value
    unexpected = [
        f"{k} {tuple(v.shape)}" for k, v in source.items() if k not in used and not table.ignored(k)
    ]
    problems = [("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)]
    if any(items for _, items in problems):
        raise CheckpointError(_report(table.name, problems))
    return out


def _report(name: str, problems, limit: int = 12) -> str:
    lines = [f"checkpoint does not fit {name}:"]
    for kind, items in problems:
        if items:
            lines.append(f"  {len(items)} {kind} key(s):")
            lines += [f"    {item}" for item in items[:limit]]
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)


def parameter_shapes(model) -> dict[str, tuple[int, ...]]:
    """Our model's parameters, flattened: key -> shape. MLX initialises lazily, so this is free
    even for a full-size model that was never evaluated."""
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def check_dtype(model, dtype) -> None:
    """Refuse a compute dtype the model cannot run in: a model class may name one, with the
    reason, in `unsupported_dtypes` (the MM-DiT and T5 refuse float16, whose range they overflow)."""
    reason = getattr(model, "unsupported_dtypes", {}).get(dtype)
    if reason:
        raise ValueError(f"{type(model).__name__} cannot run in {str(dtype).split('.')[-1]}: {reason}")


def load_checkpoint(model, table: KeyTable, source: dict[str, mx.array], dtype=None):
    """Check `source` against `table` and load it into `model` (in `dtype` if given)."""
    check_dtype(model, dtype)
    weights = map_checkpoint(table, parameter_shapes(model), source)
    if dtype is not None:
        weights = {k: v.astype(dtype) for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))
    return model


def shape_placeholders(manifest: dict[str, Sequence[int]]) -> dict[str, mx.array]:
    """Stand-ins for a key/shape manifest: lazy zeros, never allocated unless evaluated."""
    return {k: mx.zeros(tuple(s)) for k, s in manifest.items()}
