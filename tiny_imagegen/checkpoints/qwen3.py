"""Key tables and the loader for Qwen3 text encoders, as the diffusers-layout repos store them.

A `text_encoder/` folder holds config.json and safetensors shards with an index json, keys as
transformers saves the model class the repo names:

- Qwen3Model (Z-Image-Turbo): `embed_tokens.weight`, `layers.{i}.…`, `norm.weight`;
- Qwen3ForCausalLM (FLUX.2 klein): the same under `model.`, plus `lm_head.weight` (absent from
  files of tied models such as Qwen3-4B), which we never use.

Our parameter names are transformers' own, so each table is one rule per part, differing only
in the prefix; `qwen3_table` picks by the embedding's key.
"""

import re
from pathlib import Path

import mlx.core as mx

from ..models.qwen3 import Qwen3Config, Qwen3Model
from .mapping import KeyTable, Rule, load_checkpoint
from .safetensors_io import read_checkpoint


def _qwen3_table(name: str, prefix: str, ignore: tuple[str, ...] = ()) -> KeyTable:
    return KeyTable(
        name,
        [
            Rule("embed_tokens.weight", f"{prefix}embed_tokens.weight"),
            Rule("layers.{i}.{rest:*}", f"{prefix}layers.{{i}}.{{rest}}"),
            Rule("norm.weight", f"{prefix}norm.weight"),
        ],
        ignore=ignore,
    )


QWEN3_MODEL = _qwen3_table("Qwen3Model (transformers)", "")
QWEN3_CAUSAL_LM = _qwen3_table("Qwen3ForCausalLM (transformers, model. prefix)", "model.", ignore=("lm_head.weight",))


def qwen3_table(source: dict) -> KeyTable:
    return QWEN3_CAUSAL_LM if "model.embed_tokens.weight" in source else QWEN3_MODEL


def load_qwen3(folder: str | Path, dtype: mx.Dtype | None = None, num_layers: int | None = None) -> Qwen3Model:
    """A Qwen3Model / Qwen3ForCausalLM folder (config.json + safetensors, sharded or not), lazily:
    weights are read when first evaluated. `dtype` None keeps the stored one. `num_layers` builds
    only the first decoder layers (e.g. 27 for FLUX.2 klein's hidden_states[27], N - 1 for
    Z-Image's [-2]); the layers after them are left unread, checked by name only."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    config = Qwen3Config.from_config_json(folder / "config.json")
    model = Qwen3Model(config, num_layers=num_layers)
    source = read_checkpoint(folder)
    table = qwen3_table(source)
    if num_layers is not None:
        source = _without_layers_from(source, num_layers, config.num_hidden_layers)
    return load_checkpoint(model, table, source, dtype)


_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")


def _without_layers_from(source: dict, first: int, total: int) -> dict:
    """`source` without the tensors of layers first..total-1 (only layers the config has: a
    tensor of a layer beyond the config stays, and the table reports it as unexpected)."""
    return {k: v for k, v in source.items() if not ((m := _LAYER.match(k)) and first <= int(m[1]) < total)}
