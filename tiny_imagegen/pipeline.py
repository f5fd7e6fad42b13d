"""Text to image: encode the prompt, free the text encoders, denoise, decode.

    pipe = Pipeline.from_pretrained("flux1-schnell")          # hub id, local folder or weights/<name>
    images = pipe.generate("a lighthouse at dusk", width=1024, height=1024, seed=0)

The steps and where memory goes (FLUX.1-schnell, bf16):
1. text: T5-XXL (9.5 GB) and CLIP-L turn the prompt into a sequence (B, 256, 4096) and a pooled
   vector (B, 768). Then both are released (unless `keep_text_encoders`), before the 24 GB
   transformer runs, so they never sit in memory together with its activations.
2. noise: seeded Gaussian latents (B, H/8, W/8, 16), packed into 2x2 patches -> (B, HW/256, 64).
3. denoise: Euler steps of the flow (sampling.py); each step's graph is evaluated on its own
   (`mx.eval` per step) so memory does not grow with the number of steps.
4. decode: latents -> VAE decoder (in overlapping tiles above 768x768 pixels, which bounds the
   decoder's activations: 13.2 GiB -> 4.6 GiB at 1024x1024 in fp32) -> uint8 images.
"""

import gc
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from .layers.embeddings import pack_latents, unpack_latents
from .text_conditioning import default_dtype
from .sampling import (
    classifier_free_guidance, denoise, flux_schedule, img2img_schedule, noise_image, sample_noise,
)

MAX_SIDE = 4096  # pixels; FLUX.1 was trained up to ~2 MP, beyond this only memory is gained


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model is meant to be sampled (as its reference pipeline does)."""

    steps: int
    guidance: float  # distilled guidance input (guidance models) or classifier-free scale (1 = off)
    shift: bool  # resolution-dependent time shift of the schedule
    text_length: int  # T5 tokens
    width: int = 1024
    height: int = 1024


DEFAULTS = {
    "flux1-schnell": SamplingDefaults(steps=4, guidance=1.0, shift=False, text_length=256),
    "flux1-dev": SamplingDefaults(steps=28, guidance=3.5, shift=True, text_length=512),
}


class Pipeline:
    def __init__(self, name: str, text_encoder, transformer, vae, defaults: SamplingDefaults,
                 dtype: mx.Dtype = mx.float32, keep_text_encoders: bool = False):
        """text_encoder: prompts -> (txt (B, L, D_txt), pooled (B, D_vec)); transformer: an MMDiT;
        vae: an AutoencoderKL."""
        self.name, self.text_encoder, self.transformer, self.vae = name, text_encoder, transformer, vae
        self.defaults, self.dtype, self.keep_text_encoders = defaults, dtype, keep_text_encoders

    @classmethod
    def from_pretrained(cls, model: str, dtype: mx.Dtype | None = None, quantize: int | None = None,
                        keep_text_encoders: bool = False, progress: bool = True, verify: bool = False) -> "Pipeline":
        """`verify`: check the SHA-256 of a converted model's files (sizes are always checked)."""
        from .loading import load_components

        dtype = dtype or default_dtype()  # bf16 on GPUs, fp32 on the CPU
        name, text, transformer, vae, defaults = load_components(model, dtype, quantize, progress, verify)
        return cls(name, text, transformer, vae, defaults, dtype, keep_text_encoders)

    # -- the steps --

    def encode(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        if self.text_encoder is None:
            raise RuntimeError("the text encoders were released after the last prompt: "
                               "build the pipeline with keep_text_encoders=True to reuse it")
        txt, pooled = self.text_encoder(prompts)
        mx.eval(txt, pooled)
        return txt.astype(self.dtype), pooled.astype(self.dtype)

    def release_text_encoder(self) -> None:
        if not self.keep_text_encoders:
            self.text_encoder = None
            gc.collect()
            mx.clear_cache()

    def check_size(self, width: int, height: int) -> None:
        multiple = 2 * self.vae.config.downscale  # VAE downscale x the 2x2 patch
        for side, value in (("width", width), ("height", height)):
            if value % multiple:
                raise ValueError(f"{side} {value} is not a multiple of {multiple} (VAE x{self.vae.config.downscale}, "
                                 f"2x2 patches): try {max(multiple, round(value / multiple) * multiple)}")
            if not multiple <= value <= MAX_SIDE:
                raise ValueError(f"{side} {value} is outside {multiple}..{MAX_SIDE} pixels")

    def generate(
        self,
        prompt: str | list[str],
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | list[int] = 0,
        n_images: int = 1,
        negative_prompt: str = "",
        true_cfg: float = 1.0,
        image=None,
        strength: float = 0.75,
        progress: Callable[[int, int, float], None] | None = None,
        latents: mx.array | None = None,
        vae_tiling: bool | None = None,
    ):
        """Images (PIL) for each prompt x n_images; image i of a prompt uses seed + i, so any image
        can be remade alone; a list of seeds gives every output image its own instead.
        `guidance` is the distilled-guidance input of guidance models (FLUX.1-dev) and the
        classifier-free scale of the others (> 1 runs a second pass with `negative_prompt`);
        `true_cfg` > 1 adds classifier-free guidance to guidance models. `image`/`strength`:
        image-to-image. `latents` (B, h, w, C) replaces the seeded noise.
        `vae_tiling`: None decodes in tiles above 768x768 pixels, True / False force it."""
        d = self.defaults
        width, height = width or d.width, height or d.height
        steps, guidance = steps or d.steps, d.guidance if guidance is None else guidance
        self.check_size(width, height)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(n_images)]
        B = len(prompts)
        if isinstance(seed, int):
            seeds = [seed + i for _ in range(B // n_images) for i in range(n_images)]
        elif len(seed) == B:
            seeds = list(seed)
        else:
            raise ValueError(f"{len(seed)} seeds for {B} images: give one seed per image, or one int")

        distilled = self.transformer.config.guidance_embed
        cfg_scale = true_cfg if distilled else guidance
        txt, pooled = self.encode(prompts)
        if cfg_scale != 1.0:
            neg_txt, neg_pooled = self.encode([negative_prompt] * B)
        self.release_text_encoder()

        f = self.vae.config.downscale
        h, w, C = height // f, width // f, self.vae.config.latent_channels
        if latents is None:
            latents = mx.concatenate([sample_noise(s, (1, h, w, C)) for s in seeds])
        noise = pack_latents(latents.astype(mx.float32))
        schedule = flux_schedule(steps, noise.shape[1], shift=d.shift)
        if image is None:
            x = noise
        else:
            schedule = img2img_schedule(schedule, strength)
            x0 = pack_latents(self.vae.encode_latents(self._image_batch(image, width, height, B), sample=False))
            x = noise_image(x0.astype(mx.float32), noise, schedule[0])

        txt_ids, img_ids = self.transformer.position_ids(h // 2, w // 2, txt.shape[1])
        g = mx.full((B,), guidance, dtype=self.dtype) if distilled else None

        def velocity(x, t):
            ts = mx.full((B,), t, dtype=self.dtype)
            v = self.transformer(x.astype(self.dtype), img_ids, txt, txt_ids, ts, pooled, g)
            if cfg_scale != 1.0:
                v_neg = self.transformer(x.astype(self.dtype), img_ids, neg_txt, txt_ids, ts, neg_pooled, g)
                v = classifier_free_guidance(v, v_neg, cfg_scale)
            return v

        start = time.perf_counter()
        for i, x in enumerate(denoise(velocity, x, schedule)):
            if progress:
                progress(i + 1, len(schedule) - 1, time.perf_counter() - start)
        self.last_latents = unpack_latents(x, h, w)
        pixels = self.vae.decode_latents(self.last_latents.astype(self.dtype), tiled=vae_tiling)
        mx.eval(pixels)
        from .models.vae import to_pil

        return to_pil(pixels)

    def _image_batch(self, image, width: int, height: int, batch: int) -> mx.array:
        from PIL import Image

        from .models.vae import from_pil

        if not isinstance(image, Image.Image):
            image = Image.open(image)
        image = image.convert("RGB").resize((width, height), Image.LANCZOS)
        return mx.repeat(from_pil(image), batch, axis=0).astype(self.dtype)
