"""layers/attention.sdpa: the CPU attention cut into pieces on concurrent streams must equal one
mx.fast.scaled_dot_product_attention call bit for bit, whichever way it cuts and whatever mask."""

import mlx.core as mx
import numpy as np
import pytest

from tiny_imagegen.layers import attention


def one_call(q, k, v, scale, mask=None):
    """One call; low precision in float32, rounded once (sdpa's float32 island on the CPU)."""
    up = [a.astype(mx.float32) for a in (q, k, v)]
    return mx.fast.scaled_dot_product_attention(*up, scale=scale, mask=mask).astype(q.dtype)


CASES = {
    # name: (q heads, kv heads, Lq, Lk, mask shape or None, mask kind)
    "heads": (4, 4, 24, 24, None, None),
    "grouped-query heads": (8, 4, 20, 20, (1, 1, 20, 20), "bool"),
    "queries, one head (the VAE)": (1, 1, 37, 37, None, None),
    "queries, additive per-head bias (T5)": (3, 3, 19, 19, (1, 3, 19, 19), "additive"),
    "key padding mask": (4, 4, 16, 16, (2, 1, 1, 16), "bool"),
}


@pytest.mark.parametrize("cores", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_pieces_equal_one_call(monkeypatch, name, cores, dtype):
    H, H_kv, Lq, Lk, mask_shape, kind = CASES[name]
    monkeypatch.setattr(attention, "PARALLEL_MIN_SCORES", 0)  # cut even these tiny problems
    monkeypatch.setattr(attention.os, "cpu_count", lambda: cores)
    keys = mx.random.split(mx.random.key(0), 4)
    q = mx.random.normal((2, H, Lq, 16), key=keys[0]).astype(dtype)
    k = mx.random.normal((2, H_kv, Lk, 16), key=keys[1]).astype(dtype)
    v = mx.random.normal((2, H_kv, Lk, 16), key=keys[2]).astype(dtype)
    mask = None
    if kind == "bool":
        mask = mx.random.uniform(shape=mask_shape, key=keys[3]) > 0.3
        mask = mask | (mx.arange(Lk) == 0)  # every query keeps a key
    elif kind == "additive":
        mask = mx.random.normal(mask_shape, key=keys[3]).astype(dtype)
    with mx.stream(mx.cpu):
        expected = one_call(q, k, v, 0.25, mask)
        real, streams = mx.fast.scaled_dot_product_attention, []
        monkeypatch.setattr(attention.mx.fast, "scaled_dot_product_attention",
                            lambda *a, **kw: streams.append(kw.get("stream")) or real(*a, **kw))
        got = attention.sdpa(q, k, v, 0.25, mask)
    assert len(set(streams)) == len(streams) > 1, "the problem was not cut onto separate streams"
    assert got.shape == expected.shape and got.dtype == dtype
    diff = mx.abs(got.astype(mx.float32) - expected.astype(mx.float32)).max().item()
    # bit-identical on MLX's own kernels; OpenBLAS (loaded by tiny_imagegen/device/blas.py) picks its
    # GEMM kernels by shape, so a piece's products may round differently: a few float32 ulps
    from tiny_imagegen.device import blas

    bound = 0.0 if not blas.describe().startswith("OpenBLAS") or dtype != mx.float32 else \
        4 * np.finfo(np.float32).eps * mx.abs(expected).max().item()
    assert diff <= bound, f"{name}, {cores} pieces, {dtype}: max |pieces - one call| = {diff} > {bound}"


def test_small_problems_and_other_devices_take_one_call(monkeypatch):
    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(attention.mx.fast, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(kw.get("stream")) or real(*a, **kw))
    q = mx.ones((1, 2, 8, 4))
    attention.sdpa(q, q, q, 0.5)  # 128 scores: far below the threshold
    assert calls == [None]


def test_gradients_flow_through_the_pieces(monkeypatch):
    """Training (LoRA, the ablations) differentiates through attention: the cut must too."""
    monkeypatch.setattr(attention, "PARALLEL_MIN_SCORES", 0)
    monkeypatch.setattr(attention.os, "cpu_count", lambda: 2)
    q, k, v = (mx.random.normal((1, 4, 12, 8), key=mx.random.key(i)) for i in range(3))

    def loss(fn, q):
        return (fn(q, k, v, 0.3) ** 2).sum()

    with mx.stream(mx.cpu):
        g_one = mx.grad(lambda q: loss(one_call, q))(q)
        g_cut = mx.grad(lambda q: loss(attention.sdpa, q))(q)
    assert mx.allclose(g_one, g_cut, rtol=1e-6, atol=1e-6).item()
