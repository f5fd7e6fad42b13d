"""Assembling a pipeline's parts from wherever the weights are.

`--model` may name:
  - a model shipped or converted into `weights/<name>/` (our format, checkpoints/convert.py),
  - a folder in our format anywhere,
  - flux1-schnell / flux1-dev or a hub repo id (downloaded into the Hugging Face cache, hub.py),
  - a local folder laid out like the hub repo (diffusers layout: transformer/, vae/, text_encoder/,
    text_encoder_2/, tokenizer/, tokenizer_2/); the transformer and the VAE may instead be the
    original single files at its top (flux1-*.safetensors, ae.safetensors).
"""

import json
from pathlib import Path

import mlx.core as mx

from .checkpoints.convert import load_component, quantize_component, read_manifest
from .checkpoints.flux import load_flux_transformer
from .checkpoints.text_encoders import load_clip_text_model, load_t5_encoder
from .checkpoints.vae import load_vae
from .hub import KNOWN_MODELS, ModelNotAvailable, is_converted, resolve_model
from .pipeline import DEFAULTS, SamplingDefaults
from .text import CLIPTokenizer, T5Tokenizer
from .text_conditioning import FluxTextEncoders, PooledT5Text

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


class FluxText:
    """prompts -> (T5 sequence, CLIP pooled), the pipeline's view of FLUX's two encoders."""

    def __init__(self, encoders: FluxTextEncoders):
        self.encoders = encoders

    def __call__(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        c = self.encoders(prompts)
        return c.t5_sequence, c.clip_pooled


def locate(model: str) -> Path:
    """A local folder for `model` (see the module docstring); downloads if it must."""
    shipped = WEIGHTS / model
    if "/" not in model and shipped.is_dir():
        return shipped
    if "/" not in model and model not in KNOWN_MODELS and not Path(model).expanduser().is_dir():
        ours = sorted(p.name for p in WEIGHTS.iterdir() if is_converted(p)) if WEIGHTS.is_dir() else []
        raise ModelNotAvailable(f"unknown model {model!r}: known names are {', '.join(ours + list(KNOWN_MODELS))}; "
                                "or pass a local folder (hub layout or converted) or a hub repo id org/name")
    return resolve_model(model)


def load_components(model: str, dtype: mx.Dtype, quantize: int | None = None, progress: bool = True,
                    verify: bool = False):
    """-> (name, text encoder, transformer, vae, sampling defaults). `verify` checks the SHA-256
    of a converted model's files (their sizes are always checked)."""
    folder = locate(model)
    if is_converted(folder):
        return _load_converted(model, folder, dtype, quantize, verify)
    return _load_hub_layout(model, folder, dtype, quantize)


def _defaults_for(name: str, transformer, folder: Path) -> SamplingDefaults:
    if name in DEFAULTS:
        return DEFAULTS[name]
    scheduler = folder / "scheduler" / "scheduler_config.json"
    dev_like = transformer.config.guidance_embed
    base = DEFAULTS["flux1-dev" if dev_like else "flux1-schnell"]
    if scheduler.is_file():
        shift = json.loads(scheduler.read_text()).get("use_dynamic_shifting", base.shift)
        base = SamplingDefaults(base.steps, base.guidance, shift, base.text_length)
    return base


def _load_hub_layout(model: str, folder: Path, dtype, quantize):
    name = model if model in KNOWN_MODELS else str(model)
    transformer_file = sorted(folder.glob("flux1-*.safetensors"))
    transformer = load_flux_transformer(
        folder / "transformer" if (folder / "transformer").is_dir() else transformer_file[0], dtype=dtype)
    vae = load_vae(folder / "vae" if (folder / "vae").is_dir() else folder / "ae.safetensors", dtype=dtype)
    defaults = _defaults_for(name, transformer, folder)
    t5 = load_t5_encoder(folder / "text_encoder_2", dtype)
    if quantize:
        quantize_component("transformer", transformer, quantize)
        quantize_component("t5", t5, quantize)
    text = FluxTextEncoders(
        CLIPTokenizer.from_folder(folder / "tokenizer"), load_clip_text_model(folder / "text_encoder", dtype),
        T5Tokenizer.from_folder(folder / "tokenizer_2", max_length=defaults.text_length), t5,
    )
    return name, FluxText(text), transformer, vae, defaults


def _load_converted(model: str, folder: Path, dtype, quantize, verify: bool = False):
    manifest = read_manifest(folder)
    recipe = manifest.get("pipeline", {})
    source = manifest.get("source", {})
    name = recipe.get("name") or source.get("repo_id") or folder.name
    parts = {n: load_component(folder, n, dtype=dtype, verify=verify) for n in manifest["components"]}
    if quantize and not manifest["quantization"]:
        for n in ("transformer", "t5"):
            quantize_component(n, parts[n], quantize)
    transformer, vae = parts["transformer"], parts["vae"]
    defaults = (SamplingDefaults(**recipe["defaults"]) if "defaults" in recipe
                else _defaults_for(_known_name(source), transformer, folder))
    t5_tokenizer = T5Tokenizer.from_folder(folder / "tokenizer_2", max_length=defaults.text_length)
    if recipe.get("text", "flux") == "t5-mean":
        text = PooledT5Text(t5_tokenizer, parts["t5"])
    else:
        text = FluxText(FluxTextEncoders(CLIPTokenizer.from_folder(folder / "tokenizer"), parts["clip"],
                                         t5_tokenizer, parts["t5"]))
    return name, text, transformer, vae, defaults


def _known_name(source: dict) -> str:
    for name, known in KNOWN_MODELS.items():
        if known.repo_id == source.get("repo_id"):
            return name
    return ""
