"""FLUX.2 [klein]: what is its own of the pipeline (diffusers' Flux2KleinPipeline, FP:616-930).
The shared loop is pipeline.py's.

- text: each prompt in Qwen3's chat template with thinking disabled, right-padded to 512 tokens;
  Qwen3 runs to layer 27 with the exact padding mask, and the hidden states after layers 9, 18 and
  27 are concatenated per token: (B, 512, 3 x hidden). Every position, pads included, reaches the
  transformer, which masks nothing.
- noise: drawn in the packed space, (1, H/16, W/16, 128) (a 2x2 patch of the 32-channel VAE
  latent per token); the tokens are that grid row-major.
- sampler: Euler on the flow, `sampling.flux2_schedule` (np.linspace(1, 1/n, n), the empirical
  exponential shift). The model sees t·1000 rounded to the latents' dtype, then / 1000 (bf16:
  968 for 967.38); latents stay in the model dtype between steps (`euler_step_in_model_dtype`).
- guidance: distilled klein runs one pass per step and ignores `guidance`; the base variants run
  classifier-free guidance against the negative prompt ("" by default, as diffusers fixes it),
  batched with the positive pass into one forward.
- decode: BatchNorm de-normalisation in the packed space, unpatchify, VAE (models/vae_flux2.py).
- editing (Flux2KleinPipeline(image=[...]), FKP:764-862): each reference is centre-cropped to
  multiples of 16 (LANCZOS-resized to 1024² pixels first if larger), encoded to the posterior's
  mode, patchified and BN-normalised like the latents; its tokens go after the noisy ones with ids
  (t = 10, 20, ..., row, col, 0), the same every step, and the output keeps the first N tokens.
  The output size defaults to the first reference's.
- inpainting (Flux2KleinInpaintPipeline, FKI): the size is the image's; the mask is binarised,
  then bilinear onto the token grid (soft edges); the image's latents are also a reference at
  t = 10 (references given beside it follow at t = 20, ...); masked sampling as every family
  (editing/masked_sampling.py).
"""

import json
from pathlib import Path

import mlx.core as mx

from ..editing.masked_sampling import KnownRegion, flow_noised, masked_steps
from ..layers.positions import flux2_image_ids
from .loading import load_parts
from .batch import Conditioning
from .pipeline import Pipeline
from ..registry import SamplingDefaults
from ..diffusion.flow_matching import (classifier_free_guidance, euler_step_in_model_dtype, flux2_schedule,
                                      img2img_schedule, timesteps_in_dtype)
from ..diffusion.step_cache import CacheConfig, for_generation

HIDDEN_LAYERS = (9, 18, 27)  # FP:222, text_encoder_out_layers
QUANTIZED_ON_LOAD = ("flux2_transformer", "qwen3")  # the VAE stays as it is
MAX_REFERENCES = 10  # our limit: every reference adds its tokens to each attention (FLUX.2 [dev] card: up to 10)
REFERENCE_T = 10  # reference k sits at t = 10 + 10 k on the first id axis (FKP:353)
DISTILLED = SamplingDefaults(steps=4, guidance=1.0, shift=True, text_length=512)
BASE = SamplingDefaults(steps=50, guidance=4.0, shift=True, text_length=512)  # FP:622-624


class KleinText:
    """prompts -> {"txt": (B, L, 3 x hidden)}: Qwen3 hidden states 9, 18, 27 of the chat prompt."""

    def __init__(self, tokenizer, encoder, max_length: int = 512, layers=HIDDEN_LAYERS):
        self.tokenizer, self.encoder, self.max_length, self.layers = tokenizer, encoder, max_length, tuple(layers)

    def __call__(self, prompts: list[str]) -> dict:
        ids, mask = self.tokenizer(prompts, self.max_length, enable_thinking=False)
        states = self.encoder.hidden_states(ids, mask, self.layers)
        return {"txt": mx.concatenate(states, axis=-1)}  # per token concat(h9, h18, h27), FP:249-261


def scheduler_shift(folder: Path) -> bool | float:
    """The scheduler config's shift: True for the dynamic (empirical mu) exponential shift, else
    the static shift value (1.0 = none)."""
    path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {"use_dynamic_shifting": True}
    if cfg.get("use_dynamic_shifting", False):
        if cfg.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"{path}: time_shift_type {cfg['time_shift_type']!r} is not implemented (exponential is)")
        return True
    return float(cfg.get("shift", 1.0))


def is_distilled(folder: Path) -> bool:
    index = folder / "model_index.json"
    return bool(json.loads(index.read_text()).get("is_distilled", False)) if index.is_file() else True


class Flux2KleinPipeline(Pipeline):
    family = "flux2"
    batch_cfg = True  # positive and negative in one forward
    img2img = False  # no Flux2Klein image-to-image pipeline: references (editing) or a mask (inpainting)
    inpaint = True
    max_references = MAX_REFERENCES

    def __init__(self, *args, distilled: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.distilled = distilled

    @classmethod
    def load(cls, folder, *, spec, name, dtype, quantize, keep_text_encoders, verify):
        from ..text import QwenTokenizer

        folder = Path(folder)
        names = ("flux2_transformer", "flux2_vae", "qwen3")
        transformer, vae, encoder, manifest = load_parts(folder, names, dtype, quantize, verify, QUANTIZED_ON_LOAD,
                                                         num_layers=max(HIDDEN_LAYERS))
        distilled = is_distilled(folder) if manifest is None else manifest.get("pipeline", {}).get("is_distilled", True)
        defaults = spec.defaults if spec else (DISTILLED if distilled else BASE)
        shift = scheduler_shift(folder)
        defaults = SamplingDefaults(defaults.steps, defaults.guidance, shift, defaults.text_length,
                                    defaults.width, defaults.height)

        def text():
            return KleinText(QwenTokenizer.from_folder(folder / "tokenizer"), encoder(), defaults.text_length)

        return cls(name, transformer, vae, text(), defaults, dtype, keep_text_encoders, load_text_encoder=text,
                   spec=spec, distilled=distilled)

    # ---- FLUX.2's own steps -----------------------------------------------------------------------

    def uses_negative(self, guidance, options) -> bool:
        return not self.distilled and guidance > 1.0  # FP:594-596

    def latent_shape(self, width, height):
        f = self.size_multiple
        return (height // f, width // f, self.vae.config.packed_channels)  # (h, w, 128), packed

    def output_size(self, width, height, image=None, references=None):
        """Inpainting: the image's size (LANCZOS to 1024² pixels first if larger, FKI:997-1009);
        editing: the first reference's processed size (FKP:783); else as asked / the default."""
        from ..editing.images import MAX_REFERENCE_AREA, image_size, klein_reference, open_image

        if width is None or height is None:
            if image is not None:
                w, h = image_size(open_image(image, "init image"), self.size_multiple, MAX_REFERENCE_AREA)
                return width or w, height or h
            if references:
                first, _ = klein_reference(open_image(references[0], "reference"), self.size_multiple)
                return width or first.size[0], height or first.size[1]
        return super().output_size(width, height)

    def encode_image(self, image, width, height):
        from ..editing.images import MAX_REFERENCE_AREA, open_image, resize_to_area

        image = open_image(image, "init image")
        if image.size[0] * image.size[1] > MAX_REFERENCE_AREA:  # resized twice, as FKI:997-1020
            image = resize_to_area(image, MAX_REFERENCE_AREA)
        return super().encode_image(image, width, height)

    def init_latents(self, q, eps):
        """The posterior's mode (sample_mode="argmax"), patchified and BN-normalised, in the model
        dtype (FKI:590-597)."""
        return self.vae.to_latents(q.mode()).astype(self.dtype)

    def latent_mask(self, mask, width, height):
        """Binarised pixels, then bilinear onto the packed token grid (FKI:680): soft edges."""
        from ..editing import masks

        f = self.size_multiple
        m = masks.bilinear(masks.pixel_mask(mask, width, height), height // f, width // f)
        return mx.array(m)[None, :, :, None]

    def encode_references(self, references, width, height):
        """References -> (tokens (1, N_ref, 128), ids (N_ref, 4)), reference k at t = 10 + 10 k."""
        from ..editing.images import klein_reference, open_image
        from ..models.pixels import from_pil

        tokens, ids = [], []
        for k, ref in enumerate(references):
            image, _ = klein_reference(open_image(ref, f"reference {k + 1}"), self.size_multiple)
            z = self.vae.to_latents(self.vae.encode(from_pil(image).astype(self.dtype)).mode())  # (1, h, w, 128)
            _, h, w, C = z.shape
            tokens.append(z.reshape(1, h * w, C))
            ids.append(flux2_image_ids(h, w, t=REFERENCE_T * (k + 1)))
        return mx.concatenate(tokens, axis=1), mx.concatenate(ids)

    def sample(self, noise, cond: Conditioning, *, steps, guidance, width, height, init, strength, run,
               batch_cfg: bool | None = None, mask: mx.array | None = None, references=None,
               cache: str | CacheConfig | None = None):
        """`cache`: step caching, "fbc[:T]" / "mag[:T]" (step_cache.py; diffusers' hook fails on FLUX.2,
        the same rule as on FLUX.1 here); its contexts are kept in `self.step_cache`."""
        B, h, w, C = noise.shape
        dtype = self.dtype  # the latents take the text encoder's dtype, FP:796
        x = noise.astype(dtype).reshape(B, h * w, C)  # tokens: the packed grid row-major, FP:388-397
        shift = self.defaults.shift
        schedule = flux2_schedule(steps, h * w, dynamic_shift=shift is True, shift=1.0 if shift is True else shift)
        region = None
        if init is not None:  # inpainting: the image is noised to the start, and is reference 1
            schedule = img2img_schedule(schedule, strength)
            x0, eps = init.astype(dtype).reshape(1, h * w, C), x
            x = flow_noised(x0, eps, schedule[0])
            region = KnownRegion(x0, eps, mask.astype(dtype).reshape(1, h * w, 1), flow_noised)
            own = (x0, flux2_image_ids(h, w, t=REFERENCE_T))
            references = own if references is None else (  # the others move one place along t
                mx.concatenate([x0, references[0]], axis=1),
                mx.concatenate([own[1], references[1] + mx.array([REFERENCE_T, 0, 0, 0], mx.float32)]))
        cfg = self.uses_negative(guidance, {})
        batched = cfg and (self.batch_cfg if batch_cfg is None else batch_cfg)
        txt = mx.concatenate([cond.positive["txt"], cond.negative["txt"]]) if batched else cond.positive["txt"]
        txt_ids, img_ids = self.transformer.position_ids(h, w, txt.shape[1])
        n = h * w
        if references is not None:  # clean tokens after the noisy ones, at their own t (FKP:847-850)
            ref_tokens = references[0].astype(dtype)
            img_ids = mx.concatenate([img_ids, references[1]])
        caches = self.step_cache = for_generation(cache, guidance=cfg, steps=len(schedule) - 1,
                                                   mag_ratios=self.defaults.mag_ratios,
                                                   mag_retention=self.defaults.mag_retention)

        def forward(xs, txt, ts, cache):
            if references is not None:
                xs = mx.concatenate([xs, mx.broadcast_to(ref_tokens, (xs.shape[0], *ref_tokens.shape[1:]))], axis=1)
            return self.transformer(xs, img_ids, txt, txt_ids, ts, cache=cache)[:, :n]  # the noisy tokens' output, FKP:862

        def velocity(x, t):
            xs = mx.concatenate([x, x]) if batched else x
            ts = timesteps_in_dtype(t, xs.shape[0], dtype)
            v = forward(xs, txt, ts, caches and (caches.batched if batched else caches.positive))
            if batched:
                return classifier_free_guidance(v[:B], v[B:], guidance)
            if cfg:  # unbatched guidance: a second forward
                v = classifier_free_guidance(v, forward(x, cond.negative["txt"], ts, caches and caches.negative), guidance)
            return v

        def step(i, x):
            return euler_step_in_model_dtype(x, velocity(x, schedule[i]), schedule[i], schedule[i + 1])

        x = run(masked_steps(step, region, schedule), x, len(schedule) - 1)
        return x.reshape(B, h, w, C)
