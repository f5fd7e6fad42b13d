"""Reference fixture for nearest-neighbour resizing: torch's F.interpolate(mode="nearest") on
(1, 1, n_in, m_in) ramps to many sizes, down and up, including ratios whose float32 rounding
decides the index (the U-Net's skip connections at odd latent sizes use it).

Writes out/resize/nearest.safetensors: "<n_in>x<m_in>-><n_out>x<m_out>" -> the resized ramp
(values i * m_in + j, so each output names the input element it read)."""

from pathlib import Path

import torch
import torch.nn.functional as F

from ._common import save

CASES = [((4, 6), (7, 6)), ((3, 5), (5, 9)), ((2, 3), (4, 6)), ((5, 7), (10, 14)), ((7, 3), (3, 7)),
         ((9, 11), (13, 17)), ((13, 21), (6, 10)), ((33, 49), (67, 97)), ((97, 5), (96, 3))]


def name(src, dst) -> str:
    return f"{src[0]}x{src[1]}->{dst[0]}x{dst[1]}"


def make(out: Path) -> None:
    tensors = {}
    for src, dst in CASES:
        ramp = torch.arange(src[0] * src[1], dtype=torch.float32).reshape(1, 1, *src)
        tensors[name(src, dst)] = F.interpolate(ramp, size=dst, mode="nearest")[0, 0]
    save(out / "resize" / "nearest.safetensors", tensors)
