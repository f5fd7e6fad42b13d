"""Where one MM-DiT step's time goes: each op of a category evaluated on its own and timed.

The functions below are wrapped for one step: first the wrapper evaluates the op's inputs (what
was still pending, the elementwise glue between ops, is timed as "other"), then the op itself.
Evaluating op by op removes MLX's overlap between ops, so the sum is a little above a normal step.
Used by benchmarks/transformer_step.py --profile.
"""

import time
from collections import defaultdict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def _targets():
    from tiny_imagegen.layers import attention, rope
    from tiny_imagegen.models import mmdit

    targets = [
        (nn.Linear, "__call__", "linears"),
        (attention.mx.fast, "scaled_dot_product_attention", "attention (sdpa)"),
        (attention.RMSNorm, "__call__", "norms + modulation"),
    ]
    for name in ("layer_norm", "modulate", "modulated_norm"):
        if hasattr(mmdit, name):
            targets.append((mmdit, name, "norms + modulation"))
    for module in (attention, rope, mmdit):
        for name in ("apply_rope", "rope_q_k"):
            if hasattr(module, name):
                targets.append((module, name, "rope"))
    for name in ("split_heads", "heads"):
        if hasattr(attention, name):
            targets.append((attention, name, "head layout"))
    return targets


def profile_step(model, x: dict) -> dict[str, float]:
    spent = defaultdict(float)
    depth = [0]

    def wrap(fn, category, method):
        def timed(*args, **kwargs):
            if depth[0]:  # an op inside another timed op belongs to the outer one
                return fn(*args, **kwargs)
            given = list(args[1:] if method else args) + list(kwargs.values())
            mx.eval([v for _, v in tree_flatten(given) if isinstance(v, mx.array)])  # the glue: "other"
            depth[0] += 1
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            mx.eval(out)
            spent[category] += time.perf_counter() - start
            depth[0] -= 1
            return out

        return timed

    saved = []
    for owner, name, category in _targets():
        fn = getattr(owner, name)
        saved.append((owner, name, fn))
        setattr(owner, name, wrap(fn, category, method=isinstance(owner, type)))
    try:
        start = time.perf_counter()
        out = model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["g"])
        mx.eval(out)
        total = time.perf_counter() - start
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    spent["other (elementwise glue, concat, embedders' activations)"] = total - sum(spent.values())
    return dict(spent)
