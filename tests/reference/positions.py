"""Reference fixture for absolute 2-D sin-cos position embeddings (diffusers' get_2d_sincos_pos_embed,
the MAE / DiT table). diffusers rescales positions by base_size / grid_size; with base_size equal
to the grid size the positions are the plain integers DiT uses."""

from pathlib import Path

from diffusers.models.embeddings import get_2d_sincos_pos_embed

from ._common import save


def make(out: Path) -> None:
    save(out / "positions" / "sincos.safetensors",
         {"sincos_2d_32_6x6": get_2d_sincos_pos_embed(32, 6, base_size=6)})
