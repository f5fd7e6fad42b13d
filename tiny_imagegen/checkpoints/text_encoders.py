"""Key tables and loaders for the text encoders, as transformers and the FLUX repositories store them.

T5 (FLUX's `text_encoder_2/`: T5EncoderModel, sharded with an index json). The token embedding
is one tensor tied under two names, `shared.weight` and `encoder.embed_tokens.weight`; a file
may hold either or both, so there is a table for each (`t5_table` picks). Decoder tensors of a
full T5 checkpoint are known and left unused.

CLIP (FLUX's `text_encoder/`: CLIPTextModel). Files on the hub name every tensor under
`text_model.`; transformers 5 saves a CLIPTextModel without that prefix (`clip_table` picks).
CLIPModel / CLIPTextModel extras (vision tower, projections) are left unused; a
CLIPTextModelWithProjection (SD3's text_encoder/ and text_encoder_2/, by its config's
`architectures`) loads its `text_projection` (`*_PROJECTION` tables).
"""

import json
from pathlib import Path

import mlx.core as mx

from ..models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from ..models.t5 import T5Config, T5Encoder
from .mapping import KeyTable, Rule, load_checkpoint
from .safetensors_io import read_checkpoint

_T5_LAYERS = [
    Rule("relative_attention_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    Rule("blocks.{i}.attn_norm.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
    Rule("blocks.{i}.attn.{p}.weight", "encoder.block.{i}.layer.0.SelfAttention.{p}.weight"),
    Rule("blocks.{i}.ff_norm.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
    Rule("blocks.{i}.ff.{p}.weight", "encoder.block.{i}.layer.1.DenseReluDense.{p}.weight"),
    Rule("final_norm.weight", "encoder.final_layer_norm.weight"),
]
_T5_DECODER = ("decoder.{x:*}", "lm_head.weight")

T5_SHARED = KeyTable(
    "T5 encoder (transformers, embedding as shared.weight)",
    [Rule("embed_tokens.weight", "shared.weight"), *_T5_LAYERS],
    ignore=("encoder.embed_tokens.weight", *_T5_DECODER),  # the same tied tensor, when listed too
)
T5_ENCODER_EMBED = KeyTable(
    "T5 encoder (transformers, embedding as encoder.embed_tokens.weight)",
    [Rule("embed_tokens.weight", "encoder.embed_tokens.weight"), *_T5_LAYERS],
    ignore=_T5_DECODER,
)


def _clip_table(name: str, prefix: str, projection: bool = False) -> KeyTable:
    return KeyTable(
        name,
        [
            Rule("token_embedding.weight", f"{prefix}embeddings.token_embedding.weight"),
            Rule("position_embedding.weight", f"{prefix}embeddings.position_embedding.weight"),
            Rule("layers.{rest:*}", f"{prefix}encoder.layers.{{rest}}"),
            Rule("final_layer_norm.{p}", f"{prefix}final_layer_norm.{{p}}"),
            *([Rule("text_projection.weight", "text_projection.weight")] if projection else []),
        ],
        ignore=(
            f"{prefix}embeddings.position_ids",  # a buffer older checkpoints saved
            *(() if projection else ("text_projection.weight",)),  # CLIPTextModelWithProjection / CLIPModel heads
            "visual_projection.weight",
            "logit_scale",
            "vision_model.{x:*}",
        ),
    )


CLIP_HUB = _clip_table("CLIP text model (hub files, text_model. prefix)", "text_model.")
CLIP_TRANSFORMERS5 = _clip_table("CLIP text model (transformers 5, no prefix)", "")
CLIP_HUB_PROJECTION = _clip_table("CLIP text model with projection (text_model. prefix)", "text_model.", True)
CLIP_TRANSFORMERS5_PROJECTION = _clip_table("CLIP text model with projection (no prefix)", "", True)


def t5_table(source: dict) -> KeyTable:
    return T5_SHARED if "shared.weight" in source else T5_ENCODER_EMBED


def clip_table(source: dict, projection: bool = False) -> KeyTable:
    hub = any(k.startswith("text_model.") for k in source)
    if projection:
        return CLIP_HUB_PROJECTION if hub else CLIP_TRANSFORMERS5_PROJECTION
    return CLIP_HUB if hub else CLIP_TRANSFORMERS5


def load_t5_encoder(folder: str | Path, dtype: mx.Dtype | None = None) -> T5Encoder:
    """A T5EncoderModel folder (config.json + safetensors, sharded or not), lazily: weights are
    read when first evaluated. `dtype` None keeps the stored one."""
    folder = Path(folder)
    model = T5Encoder(T5Config.from_config_json(_config_file(folder)))
    source = read_checkpoint(folder)
    return load_checkpoint(model, t5_table(source), source, dtype)


def load_clip_text_model(folder: str | Path, dtype: mx.Dtype | None = None) -> CLIPTextModel:
    """A CLIPTextModel or CLIPTextModelWithProjection folder (config.json + safetensors), lazily;
    which one its config's `architectures` says."""
    folder = Path(folder)
    config = json.loads(_config_file(folder).read_text())
    projection = "CLIPTextModelWithProjection" in config.get("architectures", ())
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig.from_dict(config))
    source = read_checkpoint(folder)
    return load_checkpoint(model, clip_table(source, projection), source, dtype)


def _config_file(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return folder / "config.json"
