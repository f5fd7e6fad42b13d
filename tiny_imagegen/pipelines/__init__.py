"""Encode -> denoise -> decode. pipeline.py holds the loop every family shares (loading.py: a converted
folder's components; memory.py: tiling and wired weights); one module per family holds what is its own."""

from .batch import Conditioning
from .pipeline import Pipeline

__all__ = ["Conditioning", "Pipeline"]
