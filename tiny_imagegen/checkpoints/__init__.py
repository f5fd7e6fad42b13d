"""Reading published checkpoints: one key table per model and layout (see mapping.py)."""

from .mapping import CheckpointError, KeyTable, Rule, load_checkpoint, map_checkpoint
from .safetensors_io import read_checkpoint
