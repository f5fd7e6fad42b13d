"""Key tables and the loader for Qwen3 text encoders, as the diffusers-layout repos store them.

A `text_encoder/` folder holds config.json and safetensors shards with an index json, keys as
transformers saves the model class the repo names:

- Qwen3Model (Z-Image-Turbo): `embed_tokens.weight`, `layers.{i}.…`, `norm.weight`;
- Qwen3ForCausalLM (FLUX.2 klein): the same under `model.`, plus `lm_head.weight` (absent from
  files of tied models such as Qwen3-4B), which we never use;
- Qwen2_5_VLForConditionalGeneration (Qwen-Image): as `save_pretrained` writes it, the language
  model under `model.` beside `visual.*` and `lm_head.weight`; as the class names it in memory
  (and transformers 5 may write it), under `model.language_model.` beside `model.visual.*`. The
  vision tower and the LM head are never used.

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


QWEN2_5_VL = _qwen3_table("Qwen2.5-VL language model (transformers, save_pretrained layout)", "model.",
                         ignore=("lm_head.weight", "visual.{rest:*}"))
QWEN2_5_VL_NESTED = _qwen3_table("Qwen2.5-VL language model (transformers, model.language_model.)",
                                 "model.language_model.", ignore=("lm_head.weight", "model.visual.{rest:*}"))


def qwen3_table(source: dict) -> KeyTable:
    if "model.language_model.embed_tokens.weight" in source:
        return QWEN2_5_VL_NESTED
    if any(k.startswith("visual.") for k in source):
        return QWEN2_5_VL
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


_LAYER = re.compile(r"(?:model\.)?(?:language_model\.)?layers\.(\d+)\.")


def _without_layers_from(source: dict, first: int, total: int) -> dict:
    """`source` without the tensors of layers first..total-1 (only layers the config has: a
    tensor of a layer beyond the config stays, and the table reports it as unexpected)."""
    return {k: v for k, v in source.items() if not ((m := _LAYER.match(k)) and first <= int(m[1]) < total)}
