"""Stable Diffusion 3 / 3.5: what is SD3's own of the pipeline (the shared loop is pipeline.py's).

- text: CLIP-L + OpenCLIP bigG penultimate states and pooled vectors, T5-XXL's states
  (conditioning/sd3.py): {"txt": (B, 77 + 256, 4096), "pooled": (B, 2048)}. `t5=False` (--no-t5)
  never loads T5 and puts zeros in its place; `clip_skip` reads earlier CLIP layers, for the
  prompts only: negatives always use the penultimate layer (SP:496,503).
- noise: latents (1, H/8, W/8, 16) in the model's dtype (SP: prepare_latents in the prompt
  embeddings' dtype); the transformer patchifies them itself.
- sampler: Euler on the flow with SD3's static shift 3 (`sd3_sigmas`, the reference's schedule,
  low end shifted twice); the model gets σ (it takes the sinusoid of σ·1000 in float32).
- guidance: classifier-free iff `guidance` > 1, v = u + g (c - u), one batched forward
  [negative; positive]; skip-layer guidance (`slg`: layers, SD3.5 Medium's card says 7, 8, 9) adds a
  conditional pass without those blocks at steps n·start < i < n·stop and v += (c - c_skip)·scale
  (SP:1087-1109); only with CFG, as there.
- decode: the 16-channel SD3 VAE, latents / 1.5305 + 0.0609 (the repo's vae/config.json).
- image-to-image and inpainting (StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline):
  the init image's latents a sample of the VAE posterior (ε drawn before the noise), the start
  σ·ε + (1 - σ)·x0 at the truncated schedule's first σ in the model dtype; inpainting's mask nearest
  on the latent grid and the shared masked sampling (editing/masked_sampling.py), the blend in the
  model dtype. (StableDiffusion3InpaintPipeline decodes latents / scale without the VAE's shift,
  SD3I:1368, unlike its text-to-image and img2img siblings; here every SD3 image decodes with it.)
"""

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoints.quantize import quantize_component
from ..checkpoints.sd3 import load_sd3_transformer
from ..checkpoints.text_encoders import load_clip_text_model, load_t5_encoder
from ..checkpoints.vae import load_vae
from ..editing.masked_sampling import KnownRegion, flow_noised, masked_steps
from ..layers.attention import reading_out, reading_out_active
from .batch import Conditioning
from .pipeline import Pipeline
from ..registry import SamplingDefaults
from ..diffusion.flow_matching import euler_step_in_model_dtype, img2img_schedule, noise_image
from ..diffusion.step_cache import CacheConfig, for_generation, run_blocks
from ..conditioning.sd3 import SD3TextEncoders
from ..text import CLIPTokenizer, T5Tokenizer

TRANSFORMER, CLIP_L, CLIP_G, T5 = "sd3_transformer", "clip_l", "clip_g", "sd3_t5"
QUANTIZED_ON_LOAD = (TRANSFORMER, T5, CLIP_G)  # CLIP-L (0.25 GB) and the VAE stay as they are
SLG_LAYERS = (7, 8, 9)  # StableDiffusion3Pipeline's docstring, for SD3.5 Medium
# StableDiffusion3Pipeline's own defaults, for a folder the registry does not know (SP:680-700)
REFERENCE_DEFAULTS = SamplingDefaults(steps=28, guidance=7.0, shift=3.0, text_length=256)


def sd3_sigmas(steps: int, shift: float = 3.0, train_steps: int = 1000) -> list[float]:
    """The steps + 1 noise levels of FlowMatchEulerDiscreteScheduler(shift) as SD3 sets it (SCH:340-357):

        σ_max, σ_min = s(1), s(1/1000)      the scheduler's training sigmas, shifted at init (float32)
        σ_i = s(linspace(σ_max, σ_min, n))  shifted again (float64), s(σ) = shift σ / (1 + (shift - 1) σ)

    The low end is shifted twice (28 steps end at 0.00892857, not 0.002994): a quirk of the
    reference that the published sampling is tuned to, kept. Then float32 and a terminal 0."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    f32 = np.float32
    train = np.array([1.0, 1.0 / train_steps], f32)  # sigmas[0] and sigmas[-1] of linspace(1, T, T)[::-1] / T
    sigma_max, sigma_min = (f32(shift) * train / (f32(1) + f32(shift - 1) * train)).astype(np.float64)
    sigmas = np.linspace(sigma_max * train_steps, sigma_min * train_steps, steps) / train_steps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [float(s) for s in sigmas.astype(f32)] + [0.0]


def defaults_for_folder(folder: Path) -> SamplingDefaults:
    """An SD3 folder the registry does not know: the reference pipeline's defaults, with the shift
    its scheduler config says."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("use_dynamic_shifting"):
        raise ValueError(f"{path}: use_dynamic_shifting is not implemented for SD3 (no SD3 release uses it)")
    return replace(REFERENCE_DEFAULTS, shift=float(config.get("shift", REFERENCE_DEFAULTS.shift)))


class SD3Text:
    """prompts -> SD3TextEncoders' dict, with the options SD3Pipeline.condition sets in `options`
    (a dict shared with the pipeline, so that a re-loaded encoder sees them too)."""

    def __init__(self, encoders: SD3TextEncoders, options: dict):
        self.encoders, self.options = encoders, options

    def __call__(self, prompts: list[str]) -> dict:
        return self.encoders(prompts, **self.options)


class SD3Pipeline(Pipeline):
    family = "sd3"
    batch_cfg = True  # negative and positive in one forward
    inpaint = True  # StableDiffusion3InpaintPipeline on the 16-channel transformer
    init_posterior = "sample"  # retrieve_latents' default sample_mode (SD3I:751)
    negative_first = True  # that batch is [negative; positive] (SP:998): attention maps read its last rows

    @classmethod
    def load(cls, folder, *, spec, name, dtype, quantize, keep_text_encoders, verify):
        from ..registry.hub import is_converted
        from .loading import load_converted_parts, reloading

        folder = Path(folder)
        if is_converted(folder):
            parts, _ = load_converted_parts(folder, dtype, quantize, verify, QUANTIZED_ON_LOAD)
            transformer, vae = parts[TRANSFORMER], parts["vae"]
            present = set(parts)
            component = reloading(parts, folder, dtype, quantize, QUANTIZED_ON_LOAD)
        else:
            transformer = load_sd3_transformer(folder / "transformer", dtype=dtype)
            vae = load_vae(folder / "vae", dtype=dtype)
            if quantize:
                quantize_component(TRANSFORMER, transformer, quantize)
            present = {T5} if (folder / "text_encoder_3").is_dir() else set()
            loaders = {CLIP_L: lambda: load_clip_text_model(folder / "text_encoder", dtype),
                       CLIP_G: lambda: load_clip_text_model(folder / "text_encoder_2", dtype),
                       T5: lambda: load_t5_encoder(folder / "text_encoder_3", dtype)}

            def component(part):
                model = loaders[part]()
                if quantize and part in QUANTIZED_ON_LOAD:
                    quantize_component(part, model, quantize)
                return model
        defaults = spec.defaults if spec else defaults_for_folder(folder)
        options = {}

        def text():
            t5 = (lambda: component(T5)) if T5 in present else None  # loaded when first needed, not with --no-t5
            return SD3Text(SD3TextEncoders(
                CLIPTokenizer.from_folder(folder / "tokenizer"), component(CLIP_L),
                CLIPTokenizer.from_folder(folder / "tokenizer_2"), component(CLIP_G),
                T5Tokenizer.from_folder(folder / "tokenizer_3") if t5 else None, t5,
                joint_dim=transformer.config.context_dim, t5_length=defaults.text_length), options)

        pipe = cls(name, transformer, vae, text(), defaults, dtype, keep_text_encoders, load_text_encoder=text,
                   spec=spec)
        pipe._text_options = options
        if (folder / "tokenizer_3").is_dir():
            pipe.prompt_tokenizer = T5Tokenizer.from_folder(folder / "tokenizer_3")  # to count what is cut off
        return pipe

    # ---- SD3's own steps --------------------------------------------------------------------------

    def condition(self, prompts, negative_prompt="", guidance=None, clip_skip: int | None = None, t5: bool = True,
                  **options) -> Conditioning:
        """As Pipeline.condition, with `clip_skip` for the prompts only (the reference encodes
        negatives with clip_skip=None, SP:496,503) and `t5=False` for zeros in T5's place."""
        self._text_options.update(clip_skip=clip_skip, use_t5=t5)
        return super().condition(prompts, negative_prompt, guidance, **options)

    def encode(self, prompts: list[str]) -> dict:
        out = super().encode(prompts)
        self._text_options["clip_skip"] = None  # what follows are the negatives
        return out

    def uses_negative(self, guidance, options) -> bool:
        return guidance > 1.0

    def latent_shape(self, width, height):
        f = self.vae.config.downscale
        return (height // f, width // f, self.vae.config.latent_channels)  # (h, w, 16)

    def check_size(self, width: int, height: int) -> None:
        super().check_size(width, height)
        largest = self.transformer.config.max_image_size
        if max(width, height) > largest:
            raise ValueError(f"{width}x{height}: {self.name}'s position table covers images up to {largest} pixels a side")

    def forward(self, skip_layers: tuple[int, ...] = ()):
        """The transformer's forward, compiled once per set of skipped layers (see Flux1Pipeline.forward)."""
        tr = self.transformer
        if reading_out_active():  # attention maps: the read-out is Python, which a trace would skip
            return lambda x, txt, t, pooled: tr(x, txt, t, pooled, skip_layers)
        cache = getattr(self, "_forwards", None)
        if cache is None or cache[0] is not tr:
            cache = self._forwards = (tr, {})
        if skip_layers not in cache[1]:
            cache[1][skip_layers] = mx.compile(lambda x, txt, t, pooled: tr(x, txt, t, pooled, skip_layers), inputs=tr.state)
        return cache[1][skip_layers]

    def sample(self, noise, cond: Conditioning, *, steps, guidance, width, height, init, strength, run,
               slg: tuple[int, ...] | None = None, slg_scale: float = 2.8, slg_start: float = 0.01,
               slg_stop: float = 0.2, shift: float | None = None, clip_skip: int | None = None, t5: bool = True,
               batch_cfg: bool | None = None, mask: mx.array | None = None, cache: str | CacheConfig | None = None):
        """Family options: `slg` the blocks skip-layer guidance leaves out (None: off; True: 7, 8, 9)
        with its scale and step window; `shift` overrides the schedule's; `batch_cfg=False` runs the
        negative prompt as a second forward. `clip_skip` and `t5` act in `condition`.
        `cache`: step caching, "fbc[:T]" / "mag[:T]" (step_cache.py; diffusers' hook cannot run on SD3,
        the same rule as on FLUX.1 here): the positive and negative passes in contexts of their own
        (batched or not), the skip-layer pass uncached; contexts kept in `self.step_cache`."""
        B, dtype = noise.shape[0], self.dtype
        sigmas = sd3_sigmas(steps, self.defaults.shift if shift is None else shift)
        x, region = noise.astype(dtype), None  # the latents live in the prompt embeddings' dtype (SP:1038)
        if init is not None:
            sigmas = img2img_schedule(sigmas, strength)
            x0, eps = init.astype(dtype), x
            x = noise_image(x0, eps, sigmas[0])  # scale_noise (SCH:234)
            if mask is not None:  # the known region put back after every step, in the model dtype (SD3I:1320-1333)
                region = KnownRegion(x0, eps, mask.astype(dtype), flow_noised)
        n = len(sigmas) - 1
        cfg = guidance > 1.0
        skip = tuple(SLG_LAYERS if slg is True else slg or ())
        if skip and not cfg:
            raise ValueError("skip-layer guidance (--slg) acts only with classifier-free guidance: use --guidance > 1")
        if any(not 0 <= i < self.transformer.config.depth for i in skip):
            raise ValueError(f"--slg layers {skip}: the transformer has blocks 0..{self.transformer.config.depth - 1}")
        txt, pooled = cond.positive["txt"], cond.positive["pooled"]
        batched = cfg and (self.batch_cfg if batch_cfg is None else batch_cfg)
        if batched:  # [negative; positive], as SP:998
            txt_b = mx.concatenate([cond.negative["txt"], txt])
            pooled_b = mx.concatenate([cond.negative["pooled"], pooled])

        caches = self.step_cache = for_generation(cache, guidance=cfg, steps=len(sigmas) - 1,
                                                   mag_ratios=self.defaults.mag_ratios,
                                                   mag_retention=self.defaults.mag_retention)

        def forward(context: str):
            """A pass's forward: compiled without a cache; with one, uncompiled (its decision reads a
            value mid-forward, `.item()`) in the pass's context; a batch [negative; positive] runs
            each slice in its own."""
            if caches is None:
                return self.forward()
            state = {"positive": caches.positive, "negative": caches.negative,
                     "batched": lambda *a: run_blocks([caches.negative, caches.positive], *a)}[context]
            return lambda x, txt, t, pooled: self.transformer(x, txt, t, pooled, cache=state)

        def step(i, x):
            t = mx.full((B,), sigmas[i], dtype=mx.float32)  # σ stays float32 in every dtype (SP:1069)
            if not cfg:
                v = forward("positive")(x, txt, t, pooled)
            else:
                if batched:
                    out = forward("batched")(mx.concatenate([x, x]), txt_b, mx.concatenate([t, t]), pooled_b)
                    uncond, text = out[:B], out[B:]
                else:
                    with reading_out(None):  # the negative's own pass: not read into the maps
                        uncond = forward("negative")(x, cond.negative["txt"], t, cond.negative["pooled"])
                    text = forward("positive")(x, txt, t, pooled)
                v = uncond + guidance * (text - uncond)
                if skip and n * slg_start < i < n * slg_stop:  # strict, as SP:1087-1092
                    with reading_out(None):  # a guidance pass, not one the maps average
                        v = v + (text - self.forward(skip)(x, txt, t, pooled)) * slg_scale
            return euler_step_in_model_dtype(x, v, sigmas[i], sigmas[i + 1])

        return run(masked_steps(step, region, sigmas), x, n)

    def tokens_cut(self, prompt):
        tokenizer = getattr(self, "prompt_tokenizer", None)
        return max(0, len(tokenizer.encode(prompt)) - self.defaults.text_length) if tokenizer else 0
