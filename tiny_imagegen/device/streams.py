"""One MLX CPU stream per core, for work that MLX's CPU backend would otherwise run on one thread.

MLX runs the operations of different streams concurrently, each stream on a thread of its own. A
computation whose pieces are independent (the rows of a matmul, the heads of an attention) can be
cut into one piece per core, each piece put on its own stream, and the pieces joined: on a CPU with
n cores up to n times faster where the kernel itself is single-threaded (the softmax's exp in
attention, the reference BLAS's matmuls), and the same numbers, since every piece is computed by
the same kernel as before.
"""

import os

import mlx.core as mx

_streams: list = []


def cpu_streams() -> list:
    """One CPU stream per core (made once per process)."""
    while len(_streams) < (os.cpu_count() or 1):
        _streams.append(mx.new_stream(mx.cpu))
    return _streams


def pieces(n: int, parts: int) -> list[slice]:
    """range(n) cut into at most `parts` contiguous slices of (nearly) equal length."""
    step = -(-n // parts)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]
