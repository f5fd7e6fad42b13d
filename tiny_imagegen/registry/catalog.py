"""Every published model once: where its files are, its licence, its architecture, how to sample it.

Two tables, each listed once:

  FAMILIES  an architecture family: the pipeline class that runs it, the components of its
            diffusers-layout repo (keys of checkpoints/components.py's COMPONENTS, each read from its
            folder), the tokenizer files, and the `_class_name` of model_index.json that marks a
            folder as this family.
  MODELS    a published model: name and aliases, hub repo, gated or not, licence, its family,
            the published configs of its components, and the sampling defaults of its
            reference pipeline.

The hub (what to download), the loader (what a folder is), the pipeline (how to sample) and the
command line (`--model list`) all read these. Adding a family is one Family entry plus its
modules; adding a published model of a known family is one ModelSpec.

    from tiny_imagegen.registry import catalog as registry
    spec = registry.find("schnell")                 # aliases work; None for a folder or repo id
    registry.FAMILIES[spec.family].hub_folders()    # what to fetch from spec.repo_id
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from ..diffusion.mag_cache import RETENTION_RATIO
from . import published_configs


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model is meant to be sampled, as its reference pipeline does it."""

    steps: int
    guidance: float  # the family's guidance knob (see its pipeline); 1 = off for classifier-free scales
    shift: bool | float = False  # flow schedules: True = resolution-dependent shift (FLUX.1-dev), a number = static
    text_length: int = 512  # text tokens
    width: int = 1024
    height: int = 1024
    # MagCache (--cache mag): the model's per-step ratios |r_t| / |r_{t-1}| of the block stack's residual,
    # calibrated once at some number of steps and resampled to the steps run (diffusion/mag_cache.py)
    mag_ratios: tuple[float, ...] | None = None
    # ... and the share of a run's first steps it always computes (diffusers' default 0.2; see mag_cache.py)
    mag_retention: float = RETENTION_RATIO

    def __post_init__(self):
        if self.mag_ratios is not None:  # model.json holds a list
            object.__setattr__(self, "mag_ratios", tuple(float(r) for r in self.mag_ratios))


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str  # "module:Class", imported when used
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name` values of this family
    components: tuple[str, ...]  # checkpoints.components.COMPONENTS keys, read from their source folders
    tokenizers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # folder -> files it needs
    optional_components: tuple[str, ...] = ()  # read when present (e.g. a text encoder a variant lacks)

    def hub_folders(self) -> tuple[str, ...]:
        """The repo folders the family reads: component folders, then tokenizer folders."""
        from ..checkpoints.components import COMPONENTS

        weights = [COMPONENTS[c].source_folder for c in self.components]
        return tuple(dict.fromkeys(weights + list(self.tokenizers)))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    description: str
    licence: str
    defaults: SamplingDefaults
    repo_id: str | None = None  # None: shipped with the package (weights/<name>)
    gated: bool = False  # the licence must be accepted on the model page before the hub serves files
    aliases: tuple[str, ...] = ()
    # () -> {component: published config}; called when asked for, so that reading the registry does
    # not import every family's model modules (a first image of the tiny model needs none of them)
    make_configs: Callable[[], dict] | None = field(default=None, compare=False)
    recipe: str = ""  # family-specific variant of the pipeline (e.g. text "t5-mean")

    @property
    def shipped(self) -> bool:
        return self.repo_id is None

    @property
    def configs(self) -> dict:
        """component -> the published config of the model (empty for the shipped ones)."""
        return self.make_configs() if self.make_configs else {}


# ---- the families ---------------------------------------------------------------------------------

FAMILIES = {
    f.name: f
    for f in (
        Family(
            "flux1",
            pipeline="tiny_imagegen.pipelines.flux1:Flux1Pipeline",
            pipeline_classes=("FluxPipeline",),
            components=("transformer", "vae", "clip", "t5"),
            tokenizers={"tokenizer": ("vocab.json", "merges.txt"), "tokenizer_2": ("spiece.model",)},
        ),
        Family(  # FLUX.1 with a reference image on the sequence (pipelines/flux1_kontext.py)
            "flux1-kontext",
            pipeline="tiny_imagegen.pipelines.flux1_kontext:FluxKontextPipeline",
            pipeline_classes=("FluxKontextPipeline",),
            components=("transformer", "vae", "clip", "t5"),
            tokenizers={"tokenizer": ("vocab.json", "merges.txt"), "tokenizer_2": ("spiece.model",)},
        ),
        Family(
            "zimage",
            pipeline="tiny_imagegen.pipelines.zimage:ZImagePipeline",
            pipeline_classes=("ZImagePipeline",),
            components=("zimage_transformer", "vae", "qwen3"),
            tokenizers={"tokenizer": ("tokenizer_config.json",)},  # + tokenizer.json or vocab.json/merges.txt
        ),
        Family(
            "sd15",
            pipeline="tiny_imagegen.pipelines.sd15:SD15Pipeline",
            pipeline_classes=("StableDiffusionPipeline",),
            components=("unet", "vae", "clip"),
            tokenizers={"tokenizer": ("vocab.json", "merges.txt")},
        ),
        Family(
            "flux2",
            pipeline="tiny_imagegen.pipelines.flux2:Flux2KleinPipeline",
            pipeline_classes=("Flux2KleinPipeline",),
            components=("flux2_transformer", "flux2_vae", "qwen3"),
            tokenizers={"tokenizer": ("tokenizer_config.json",)},  # + tokenizer.json or vocab.json/merges.txt
        ),
        Family(  # SD3 / SD3.5: CLIP-L + OpenCLIP bigG + T5-XXL (text_encoder_3, left out with --no-t5)
            "sd3",
            pipeline="tiny_imagegen.pipelines.sd3:SD3Pipeline",
            pipeline_classes=("StableDiffusion3Pipeline",),
            components=("sd3_transformer", "vae", "clip_l", "clip_g", "sd3_t5"),
            tokenizers={"tokenizer": ("vocab.json", "merges.txt"), "tokenizer_2": ("vocab.json", "merges.txt"),
                        "tokenizer_3": ("spiece.model",)},
        ),
        # ---- Qwen-Image (issue 26) ----
        Family(
            "qwen_image",
            pipeline="tiny_imagegen.pipelines.qwen_image:QwenImagePipeline",
            pipeline_classes=("QwenImagePipeline",),
            components=("qwen_image_transformer", "qwen_vae", "qwen3"),
            tokenizers={"tokenizer": ("tokenizer_config.json",)},  # + vocab.json/merges.txt or tokenizer.json
        ),
        # ---- end Qwen-Image ----
        Family(  # class-conditioned: the "prompt" is an ImageNet class id or name (model_index.json id2label)
            "dit",
            pipeline="tiny_imagegen.pipelines.dit:DiTPipeline",
            pipeline_classes=("DiTPipeline",),
            components=("dit", "vae"),
        ),
    )
}


# ---- the published models (their components' configs: published_configs.py) ---------------------

# QwenImagePipeline's defaults (50 steps, 1024x1024, 512 text tokens) and the model cards'
# true_cfg_scale 4 (our `guidance`, with the negative prompt: pipelines/qwen_image.py)
_QWEN_IMAGE_DEFAULTS = SamplingDefaults(steps=50, guidance=4.0, shift=True, text_length=512)
_DIT_LICENCE = "CC-BY-NC-4.0 (facebookresearch/DiT weights; non-commercial)"


def _klein(size: str, text_encoder: str, licence: str, **spec) -> ModelSpec:
    """FLUX.2 [klein] 4B and 9B: the same sampling, another width, text encoder and licence."""
    return ModelSpec(
        f"flux2-klein-{size}", "flux2",
        description=f"FLUX.2 [klein] {size.upper()}, step-distilled (4 steps), {text_encoder} text, 32-channel VAE",
        licence=licence,
        defaults=SamplingDefaults(steps=4, guidance=1.0, shift=True, text_length=512),
        repo_id=f"black-forest-labs/FLUX.2-klein-{size.upper()}", make_configs=partial(published_configs.flux2, size), **spec)


def _dit_xl_2(pixels: int) -> ModelSpec:
    """DiT-XL/2 at 256 or 512 pixels: one architecture, latents of pixels / 8. DiTPipeline's defaults:
    50 steps (the hub's DDIMScheduler), guidance_scale 4.0 (the paper's sample images; its FID
    numbers use 1.5)."""
    return ModelSpec(
        f"dit-xl-2-{pixels}", "dit",
        description=f"DiT-XL/2, 675 M, class-conditional ImageNet {pixels}x{pixels} (prompt: a class id or name)",
        licence=_DIT_LICENCE,
        defaults=SamplingDefaults(steps=50, guidance=4.0, text_length=0, width=pixels, height=pixels),
        repo_id=f"facebook/DiT-XL-2-{pixels}", aliases=(f"dit-{pixels}",), make_configs=partial(published_configs.dit, pixels // 8))


# ---- SD3.5 (pipelines/sd3.py) --------------------------------------------------------------------

_SD3_LICENCE = "Stability AI Community License (free below USD 1M annual revenue; an enterprise licence above)"


def _sd35(size: str, description: str, steps: int, guidance: float, preset: str, alias: str) -> ModelSpec:
    """Stable Diffusion 3.5: one family, three published models (gated, one licence). Steps and
    guidance from the model cards' examples; the shift 3.0 of their scheduler_config.json;
    StableDiffusion3Pipeline's max_sequence_length 256."""
    return ModelSpec(
        f"sd3.5-{size}", "sd3", description=description, licence=_SD3_LICENCE,
        defaults=SamplingDefaults(steps=steps, guidance=guidance, shift=3.0, text_length=256),
        repo_id=f"stabilityai/stable-diffusion-3.5-{size}", gated=True, aliases=(alias,), make_configs=partial(published_configs.sd3, preset))


_SD3_MODELS = (
    _sd35("large", "Stable Diffusion 3.5 Large, 8.1 B MM-DiT, CLIP-L + bigG + T5-XXL text", 28, 3.5,
          "SD35_LARGE", "sd35-large"),
    _sd35("large-turbo", "Stable Diffusion 3.5 Large Turbo, 8.1 B, distilled for 4 steps without guidance", 4, 0.0,
          "SD35_LARGE", "sd35-turbo"),
    _sd35("medium", "Stable Diffusion 3.5 Medium, 2.5 B MMDiT-X (dual attention in blocks 0-12)", 40, 4.5,
          "SD35_MEDIUM", "sd35-medium"),
)

# MagCache's ratios (diffusion/mag_cache.py), 28 steps. FLUX.1: MagCache's published ones for FLUX.1-dev,
# which diffusers 0.42.1 ships as hooks/mag_cache.py FLUX_MAG_RATIOS "for Flux models (Dev/Schnell)"
# (https://github.com/Zehong-Ma/MagCache); the same numbers.
FLUX1_MAG_RATIOS = (1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344,
                    0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047,
                    0.98828, 0.96484, 0.95703, 0.93359, 0.89062)
# tiny-shapes, 20 steps: calibrated here (examples/calibrate_mag_cache.py --n 32: 32 train captions of
# stream 7, guidance 4, both passes averaged); also in weights/tiny-shapes/model.json, which the loader reads
TINY_SHAPES_MAG_RATIOS = (1.0, 1.15375, 0.93084, 0.96202, 0.96918, 0.96027, 0.95414, 0.95025, 0.9523, 0.94581,
                          0.94626, 0.941, 0.94026, 0.93624, 0.9322, 0.92582, 0.91856, 0.90423, 0.88985, 0.87677)

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "tiny-shapes", "flux1",
        description="the 9.9 MB hybrid MM-DiT trained here on coloured shapes (64x64), shipped with the package",
        licence="same as tiny_imagegen (trained here)",
        defaults=SamplingDefaults(steps=20, guidance=4.0, shift=False, text_length=16, width=64, height=64,
                                  mag_ratios=TINY_SHAPES_MAG_RATIOS),
        recipe="t5-mean",
    ),
    ModelSpec(
        "flux1-schnell", "flux1",
        description="FLUX.1 [schnell], 12 B, distilled for 1-4 steps",
        licence="Apache-2.0",
        defaults=SamplingDefaults(steps=4, guidance=1.0, shift=False, text_length=256, mag_ratios=FLUX1_MAG_RATIOS),
        repo_id="black-forest-labs/FLUX.1-schnell", aliases=("schnell", "flux-schnell"),
        make_configs=partial(published_configs.flux1, guidance_embed=False),
    ),
    ModelSpec(
        "flux1-dev", "flux1",
        description="FLUX.1 [dev], 12 B, guidance-distilled, 28-50 steps",
        licence="FLUX.1 [dev] Non-Commercial License",
        defaults=SamplingDefaults(steps=28, guidance=3.5, shift=True, text_length=512, mag_ratios=FLUX1_MAG_RATIOS),
        repo_id="black-forest-labs/FLUX.1-dev", gated=True, aliases=("dev", "flux-dev"),
        make_configs=partial(published_configs.flux1, guidance_embed=True),
    ),
    ModelSpec(
        "flux1-kontext-dev", "flux1-kontext",
        description="FLUX.1 Kontext [dev], 12 B, edits a reference image (--ref), guidance-distilled, 28 steps",
        licence="FLUX.1 [dev] Non-Commercial License",
        # FluxKontextPipeline's defaults: 28 steps, guidance_scale 3.5, 512 T5 tokens, the resolution
        # shift as FLUX.1-dev; the size: the reference's (resized to a trained resolution, ~1024²)
        defaults=SamplingDefaults(steps=28, guidance=3.5, shift=True, text_length=512),
        repo_id="black-forest-labs/FLUX.1-Kontext-dev", gated=True, aliases=("kontext", "flux1-kontext"),
        make_configs=partial(published_configs.flux1, guidance_embed=True),
    ),
    ModelSpec(
        "z-image-turbo", "zimage",
        description="Z-Image-Turbo, 6 B single-stream DiT with a Qwen3-4B text encoder, distilled for 8 steps",
        licence="Apache-2.0",
        # ZImagePipeline's docstring for Turbo: 8 steps, guidance_scale 0 (no CFG), 1024x1024, 512
        # text tokens; FlowMatchEulerDiscreteScheduler(shift=3.0), static
        defaults=SamplingDefaults(steps=8, guidance=0.0, shift=3.0, text_length=512),
        repo_id="Tongyi-MAI/Z-Image-Turbo", aliases=("zimage-turbo", "z-image"),
        make_configs=published_configs.zimage,
    ),
    ModelSpec(
        "sd15", "sd15",
        description="Stable Diffusion 1.5, 0.86 B U-Net on CLIP ViT-L/14 text, 512x512, DDIM or Euler",
        licence="CreativeML OpenRAIL-M",
        # StableDiffusionPipeline's defaults: guidance 7.5, 512x512 (unet sample_size 64 x 8), 50 steps
        defaults=SamplingDefaults(steps=50, guidance=7.5, text_length=77, width=512, height=512),
        repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5", aliases=("sd1.5", "stable-diffusion-1.5"),
        make_configs=published_configs.sd15,
    ),
    _klein("4b", "Qwen3-4B", "Apache-2.0", aliases=("klein-4b", "klein")),
    _klein("9b", "Qwen3-8B", "FLUX Non-Commercial License, non-commercial use only", gated=True, aliases=("klein-9b",)),
    # ---- Qwen-Image (issue 26) ----
    ModelSpec(
        "qwen-image", "qwen_image",
        description="Qwen-Image, 20 B dual-stream MM-DiT with MSRoPE, Qwen2.5-VL-7B text, 50 steps, true CFG",
        licence="Apache-2.0",
        defaults=_QWEN_IMAGE_DEFAULTS,
        repo_id="Qwen/Qwen-Image", aliases=("qwen",),
        make_configs=published_configs.qwen_image,
    ),
    ModelSpec(
        "qwen-image-2512", "qwen_image",
        description="Qwen-Image-2512 (December 2025 update of Qwen-Image), 20 B, same architecture",
        licence="Apache-2.0",
        defaults=_QWEN_IMAGE_DEFAULTS,
        repo_id="Qwen/Qwen-Image-2512", aliases=("qwen-2512",),
        make_configs=published_configs.qwen_image,
    ),
    # ---- end Qwen-Image ----
    _dit_xl_2(256),
    _dit_xl_2(512),
    *_SD3_MODELS,
)

_BY_NAME = {n: m for m in MODELS for n in (m.name, *m.aliases)}
assert len(_BY_NAME) == sum(1 + len(m.aliases) for m in MODELS), "a model name or alias is listed twice"
assert all(m.family in FAMILIES for m in MODELS), "a model names an unknown family"


def find(name: str) -> ModelSpec | None:
    """The registered model called `name` (or one of its aliases), else None."""
    return _BY_NAME.get(name)


def by_repo(repo_id: str | None) -> ModelSpec | None:
    return next((m for m in MODELS if repo_id and m.repo_id == repo_id), None)


def names() -> list[str]:
    return [m.name for m in MODELS]


def family_for_pipeline_class(class_name: str) -> Family | None:
    """The family whose model_index.json says `_class_name: class_name`."""
    return next((f for f in FAMILIES.values() if class_name in f.pipeline_classes), None)
