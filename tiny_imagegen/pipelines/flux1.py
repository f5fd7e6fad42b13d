"""FLUX.1 (and the tiny-shapes model, trained with FLUX's code paths): what is FLUX's own of the
pipeline. The shared loop is pipeline.py's.

- text: T5-XXL's token states (the MM-DiT's text stream) and CLIP-L's pooled vector (into the
  adaLN conditioning); tiny-shapes: one small T5 and its masked mean (recipe "t5-mean").
- noise: latents (1, H/8, W/8, 16), packed into 2x2 patches -> (1, HW/256, 64) tokens.
- sampler: Euler on the flow, FLUX's schedule (resolution-shifted for dev), diffusion/flow_matching.py.
- guidance: FLUX.1-dev's distilled guidance is a model input (`guidance`, one pass per step);
  true classifier-free guidance (`true_cfg` on dev, `guidance` > 1 elsewhere) adds a pass with
  the negative prompt, batched with the positive one into a single forward ([pos; neg]) unless
  `batch_cfg=False` (which halves the activations for the same work).
"""

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

from ..checkpoints.flux import load_flux_transformer
from ..checkpoints.quantize import quantize_component
from ..checkpoints.text_encoders import load_clip_text_model, load_t5_encoder
from ..checkpoints.vae import load_vae
from ..editing.masked_sampling import KnownRegion, flow_noised, masked_steps
from ..layers.attention import reading_out_active
from ..device.compilation import compile_pays
from ..layers.embeddings import pack_latents, unpack_latents
from .loading import load_converted_parts, reloading
from .batch import Conditioning
from .pipeline import Pipeline
from ..registry import SamplingDefaults, find
from ..diffusion.flow_matching import classifier_free_guidance, euler_step, flux_schedule, img2img_schedule, noise_image
from ..diffusion.step_cache import CacheConfig, for_generation
from ..text import CLIPTokenizer, T5Tokenizer
from ..conditioning.t5_clip import FluxTextEncoders, PooledT5Text

QUANTIZED_ON_LOAD = ("transformer", "t5")  # CLIP (0.25 GB) and the VAE stay as they are


class FluxText:
    """prompts -> {"txt": T5 sequence (B, L, 4096), "vec": CLIP pooled (B, 768)}."""

    def __init__(self, encoders: FluxTextEncoders):
        self.encoders = encoders

    def __call__(self, prompts: list[str]) -> dict:
        c = self.encoders(prompts)
        return {"txt": c.t5_sequence, "vec": c.clip_pooled}


class PooledT5(PooledT5Text):
    """tiny-shapes: one T5 for both inputs."""

    def __call__(self, prompts: list[str]) -> dict:
        txt, vec = super().__call__(prompts)
        return {"txt": txt, "vec": vec}


def defaults_for_folder(folder: Path, guidance_embed: bool) -> SamplingDefaults:
    """A FLUX folder the registry does not know: schnell's or dev's defaults by whether the model
    takes a guidance input, with the shift its scheduler config says."""
    base = find("flux1-dev" if guidance_embed else "flux1-schnell").defaults
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        shift = json.loads(scheduler.read_text()).get("use_dynamic_shifting", base.shift)
        base = replace(base, shift=shift)  # the rest (steps, mag_ratios, ...) as the registry's
    return base


class Flux1Pipeline(Pipeline):
    family = "flux1"
    batch_cfg = True  # positive and negative in one forward
    inpaint = True  # FluxInpaintPipeline: the mask nearest on the latent grid, no blur
    init_posterior = "sample"  # FluxImg2ImgPipeline / FluxInpaintPipeline sample the posterior (FI:476)

    @classmethod
    def load(cls, folder, *, spec, name, dtype, quantize, keep_text_encoders, verify, loras=None):
        """`loras` are merged into the full-precision transformer before it is quantized on load."""
        from ..registry.hub import is_converted

        folder = Path(folder)
        on_load = ("t5",) if loras else QUANTIZED_ON_LOAD  # the transformer after the LoRAs are merged
        if is_converted(folder):
            parts, manifest = load_converted_parts(folder, dtype, quantize, verify, on_load)
            transformer, vae = parts["transformer"], parts["vae"]
            recipe = manifest.get("pipeline", {})
            if "defaults" in recipe:
                defaults = SamplingDefaults(**recipe["defaults"])
            else:
                defaults = spec.defaults if spec else defaults_for_folder(folder, transformer.config.guidance_embed)
            text_kind = recipe.get("text", spec.recipe if spec else "") or "flux"
            name = recipe.get("name") or name

            component = reloading(parts, folder, dtype, quantize, QUANTIZED_ON_LOAD)

            def text():
                t5_tokenizer = T5Tokenizer.from_folder(folder / "tokenizer_2", max_length=defaults.text_length)
                if text_kind == "t5-mean":
                    return PooledT5(t5_tokenizer, component("t5"))
                return FluxText(FluxTextEncoders(CLIPTokenizer.from_folder(folder / "tokenizer"), component("clip"),
                                                 t5_tokenizer, component("t5")))
        else:
            single = sorted(folder.glob("flux1-*.safetensors"))
            transformer = load_flux_transformer(
                folder / "transformer" if (folder / "transformer").is_dir() else single[0], dtype=dtype)
            vae = load_vae(folder / "vae" if (folder / "vae").is_dir() else folder / "ae.safetensors", dtype=dtype)
            defaults = spec.defaults if spec else defaults_for_folder(folder, transformer.config.guidance_embed)
            if quantize and not loras:
                quantize_component("transformer", transformer, quantize)

            def text():
                t5 = load_t5_encoder(folder / "text_encoder_2", dtype)
                if quantize:
                    quantize_component("t5", t5, quantize)
                return FluxText(FluxTextEncoders(
                    CLIPTokenizer.from_folder(folder / "tokenizer"), load_clip_text_model(folder / "text_encoder", dtype),
                    T5Tokenizer.from_folder(folder / "tokenizer_2", max_length=defaults.text_length), t5))
        pipe = cls(name, transformer, vae, text(), defaults, dtype, keep_text_encoders, load_text_encoder=text,
                   spec=spec)
        pipe.prompt_tokenizer = T5Tokenizer.from_folder(folder / "tokenizer_2")  # to count what is cut off
        if loras:
            pipe.apply_loras(loras)  # merged: nothing is quantized yet (a quantized folder gets branches)
            if quantize:
                quantize_component("transformer", pipe.transformer, quantize)
        return pipe

    # ---- FLUX's own steps -------------------------------------------------------------------------

    @property
    def distilled(self) -> bool:
        return self.transformer.config.guidance_embed

    def cfg_scale(self, guidance: float, options: dict) -> float:
        return options.get("true_cfg", 1.0) if self.distilled else guidance

    def uses_negative(self, guidance, options) -> bool:
        # FluxPipeline: do_true_cfg = true_cfg_scale > 1 (a scale of 0, as schnell's docs pass, is off)
        return self.cfg_scale(guidance, options) > 1.0

    def latent_shape(self, width, height):
        f = self.vae.config.downscale
        return (height // f, width // f, self.vae.config.latent_channels)  # (h, w, C)

    def forward(self):
        """The transformer's forward, compiled where it pays (compilation.py: on a GPU, and on the
        CPU for full-width models; the tiny model runs op by op, as building its fused kernels
        would cost the first image 10-40 s for no warm gain): traced once per input shape, then
        each step runs as one graph with its elementwise ops fused. The weights are inputs of the
        compiled function, not constants, so LoRAs merged or quantization applied later are seen;
        a new transformer object gets a new trace."""
        tr = self.transformer
        if reading_out_active():  # attention maps: the read-out is Python, which a trace would skip
            return lambda img, txt, t, y, g, rope: tr(img, None, txt, None, t, y, g, rope=rope)
        if getattr(self, "_forward", (None,))[0] is not tr:
            fn = lambda img, txt, t, y, g, rope: tr(img, None, txt, None, t, y, g, rope=rope)  # noqa: E731
            if compile_pays(self.n_params):
                fn = mx.compile(fn, inputs=tr.state)
            self._forward = (tr, fn)
        return self._forward[1]

    def sample(self, noise, cond: Conditioning, *, steps, guidance, width, height, init, strength, run,
               true_cfg: float = 1.0, batch_cfg: bool | None = None, mask: mx.array | None = None,
               references=None, cache: str | CacheConfig | None = None):
        """`references` (Kontext, pipelines/flux1_kontext.py): (tokens (1, N_ref, 4C), ids (N_ref, 3)),
        clean tokens after the noisy ones, the same every step; the output keeps the first N.
        `cache`: step caching, "fbc[:T]" / "mag[:T]" (step_cache.py); its contexts (decisions) are kept
        in `self.step_cache` (new for every micro-batch, as diffusers resets them per call)."""
        B, h, w, C = noise.shape
        x = pack_latents(noise.astype(mx.float32))  # (B, h/2 * w/2, 4C)
        schedule = flux_schedule(steps, x.shape[1], shift=self.defaults.shift)
        region = None
        if init is not None:
            schedule = img2img_schedule(schedule, strength)
            x0, eps = pack_latents(init), x
            x = noise_image(x0, eps, schedule[0])  # scale_noise at sigmas[t_start] (FI:678)
            if mask is not None:  # the mask over every channel, packed like the latents (FI:708-716)
                region = KnownRegion(x0, eps, pack_latents(mx.broadcast_to(mask, (1, h, w, C))), flow_noised)
        txt, vec = cond.positive["txt"], cond.positive["vec"]
        scale = self.cfg_scale(guidance, {"true_cfg": true_cfg})
        cfg = scale > 1.0  # as uses_negative
        batched = cfg and (self.batch_cfg if batch_cfg is None else batch_cfg)
        if batched:
            txt = mx.concatenate([txt, cond.negative["txt"]])
            vec = mx.concatenate([vec, cond.negative["vec"]])
        txt_ids, img_ids = self.transformer.position_ids(h // 2, w // 2, txt.shape[1])
        n = x.shape[1]
        if references is not None:  # KX:962, 1038: tokens [noisy; reference], ids concatenated
            ref_tokens = references[0].astype(mx.float32)
            img_ids = mx.concatenate([img_ids, references[1]])
        rope = self.transformer.rope_table(img_ids, txt_ids)  # once per generation, not once per forward
        # t and g stay float32: the model takes their sinusoids in float32 before its own cast (a bf16 t
        # would round t * 1000 first, 312.5 -> 312, as diffusers' bf16 FLUX does)
        g = mx.full((txt.shape[0],), guidance, dtype=mx.float32) if self.distilled else None
        forward = self.forward()
        caches = self.step_cache = for_generation(cache, guidance=cfg, steps=len(schedule) - 1,
                                                   mag_ratios=self.defaults.mag_ratios,
                                                   mag_retention=self.defaults.mag_retention)
        if caches is not None:  # its decision reads a value mid-forward (.item()): no whole-forward compile
            tr = self.transformer
            forward = lambda img, txt, t, y, g, rope, cache: tr(img, None, txt, None, t, y, g, rope=rope,  # noqa: E731
                                                                cache=cache)
        else:
            compiled = forward
            forward = lambda *args, cache: compiled(*args)  # noqa: E731

        def transformer(x, *args, cache):
            if references is None:
                return forward(x, *args, cache=cache)
            x = mx.concatenate([x, mx.broadcast_to(ref_tokens, (x.shape[0], *ref_tokens.shape[1:])).astype(x.dtype)], 1)
            return forward(x, *args, cache=cache)[:, :n]  # the noisy tokens' output (KX:1052)

        def velocity(x, t):
            xs = mx.concatenate([x, x]) if batched else x
            ts = mx.full((xs.shape[0],), t, dtype=mx.float32)
            context = caches and (caches.batched if batched else caches.positive)
            v = transformer(xs.astype(self.dtype), txt, ts, vec, g, rope, cache=context)
            if batched:
                return classifier_free_guidance(v[:B], v[B:], scale)
            if cfg:  # unbatched guidance: a second forward
                v_neg = transformer(xs.astype(self.dtype), cond.negative["txt"], ts, cond.negative["vec"], g, rope,
                                    cache=caches and caches.negative)
                v = classifier_free_guidance(v, v_neg, scale)
            return v

        def step(i, x):
            return euler_step(x, velocity(x, schedule[i]), schedule[i], schedule[i + 1])

        self._grid = (h, w)
        x = run(masked_steps(step, region, schedule), x, len(schedule) - 1)
        return unpack_latents(x, h, w)

    def preview_latents(self, x):
        return unpack_latents(x, *self._grid)

    def tokens_cut(self, prompt):
        return max(0, len(self.prompt_tokenizer.encode(prompt)) - self.defaults.text_length)
