"""Encode -> denoise -> decode. pipeline.py holds the loop every family shares (loading.py: a converted
folder's components; memory.py: tiling and wired weights); one module per family holds what is its own."""

from .pipeline import Conditioning, Pipeline

__all__ = ["Conditioning", "Pipeline"]
