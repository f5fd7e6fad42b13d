"""Text to image, for every family: encode the prompts, free the text encoders, denoise, decode.

    pipe = Pipeline.from_pretrained("flux1-schnell")          # registered name, hub id or folder
    images = pipe.generate("a lighthouse at dusk", width=1024, height=1024, seed=0)

`Pipeline` holds what every family shares; a family's subclass (pipelines/<family>.py, named by
its registry entry) adds what is its own: how a folder is loaded, how prompts become
conditioning, the noise shape, the sampler and its guidance, the decoding. The steps and where
memory goes (FLUX.1-schnell, bf16):

1. text: T5-XXL (9.5 GB) and CLIP-L turn each *distinct* prompt into a sequence (256, 4096) and a
   pooled vector (768), once, however many images use it. Then the encoders are released (the
   default; `keep_text_encoders=True` keeps them), before the 24 GB transformer runs, so they never
   sit in memory together with its activations; the next `generate` re-loads them lazily.
2. noise: seeded Gaussian latents, one seed per image, so any image can be remade alone.
3. denoise: the family's sampler, one step at a time (`mx.eval` per step, so memory does not grow
   with the number of steps); `batch_size` splits the images into micro-batches that give the
   same images as one batch.
4. decode: latents -> VAE decoder (in overlapping tiles above 768x768 pixels) -> PIL images.
"""

import gc
import importlib
import inspect
import time
from functools import wraps
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from ..editing.inputs import EditingInputs
from ..device.blas import single_threaded
from ..device.compilation import compile_scope
from ..layers.attention import reading_out_active
from ..layers.linear import split_rows_across_cores
from .batch import Conditioning, expand_seeds
from .memory import auto_tiling, wired_weights
from ..registry import FAMILIES, ModelSpec, SamplingDefaults
from ..diffusion.flow_matching import sample_noise
from ..conditioning.t5_clip import default_dtype

COLLECT_ABOVE = 2**30  # bytes of MLX arrays alive when a text encoder is released: collect garbage
MAX_SIDE = 4096  # pixels; FLUX.1 was trained up to ~2 MP, beyond this only memory is gained

Progress = Callable[[int, int, float], None]  # (step, steps, seconds so far)


def _in_compile_scope(method):
    """A Pipeline method run with compilation on or off as it pays for this model (compilation.py)."""
    @wraps(method)
    def run(self, *args, **kwargs):
        with compile_scope(self.n_params):
            return method(self, *args, **kwargs)

    return run


class Pipeline(EditingInputs):
    family = ""  # the registry's family name, set by each subclass

    def __init__(self, name: str, transformer, vae, text_encoder, defaults: SamplingDefaults,
                 dtype: mx.Dtype = mx.float32, keep_text_encoders: bool = False,
                 load_text_encoder: Callable[[], object] | None = None, spec: ModelSpec | None = None):
        """text_encoder: the family's prompts -> conditioning callable; load_text_encoder re-creates
        it after a release (None: it cannot be re-loaded)."""
        self.name, self.transformer, self.vae, self.text_encoder = name, transformer, vae, text_encoder
        self.defaults, self.dtype, self.keep_text_encoders, self.spec = defaults, dtype, keep_text_encoders, spec
        self._load_text_encoder = load_text_encoder
        self.timings: dict[str, float] = {}  # phase -> seconds of the last generate
        self.peak_memory: dict[str, int] = {}  # phase -> peak bytes (mx.get_peak_memory)

    # ---- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str, dtype: mx.Dtype | None = None, quantize: int | None = None,
                        keep_text_encoders: bool = False, progress: bool = True, verify: bool = False,
                        loras: list[tuple[str, float]] | None = None) -> "Pipeline":
        """`model`: a registered name or alias, a hub repo id, a hub-layout or converted folder.
        `quantize`: 4 or 8 bits for the transformer and the text encoders on load (an error for a
        folder that is already quantized). `verify`: check the SHA-256 of a converted folder's files
        (their sizes are always checked). `loras`: [(file, weight)], see `apply_loras`."""
        from ..registry.hub import family_of_folder
        from ..registry.where import locate

        folder, spec = locate(model)
        family = FAMILIES[spec.family] if spec else family_of_folder(folder)
        module, name = family.pipeline.split(":")
        pipeline_cls = getattr(importlib.import_module(module), name)
        kw = dict(spec=spec, name=spec.name if spec else str(model), dtype=dtype or default_dtype(),
                  quantize=quantize, keep_text_encoders=keep_text_encoders, verify=verify)
        if loras and "loras" in inspect.signature(pipeline_cls.load).parameters:
            pipe = pipeline_cls.load(folder, loras=loras, **kw)  # merged before quantizing on load
        else:
            pipe = pipeline_cls.load(folder, **kw)
            if loras:
                pipe.apply_loras(loras)
        if mx.default_device() == mx.cpu and single_threaded():  # MLX's one-thread reference BLAS:
            split_rows_across_cores(pipe.transformer)  # the denoiser's matmul rows on every core (layers/linear.py)
        return pipe

    def apply_loras(self, loras: list[tuple[str, float]]) -> list[dict]:
        """LoRA files (local or `org/name/file.safetensors`) with their weights, on the transformer and
        (where the file has them) on CLIP: merged into full-precision weights, a branch beside
        quantized ones (checkpoints/lora.py). A re-loaded text encoder gets its CLIP parts again.
        The records (name, weight, format, sha256, ...) accumulate in `self.loras`."""
        from ..checkpoints.lora import apply_loras
        from ..registry.hub import resolve_file

        clip = getattr(getattr(self.text_encoder, "encoders", None), "clip", None)
        records = apply_loras({"transformer": self.transformer, "clip": clip}, loras, skip_clip=clip is None,
                              resolve=resolve_file)
        self.loras = getattr(self, "loras", []) + records
        load = self._load_text_encoder
        if clip is not None and load is not None:
            def reload():
                encoder = load()
                apply_loras({"transformer": self.transformer, "clip": encoder.encoders.clip}, loras, only=("clip",),
                            resolve=resolve_file)
                return encoder

            self._load_text_encoder = reload
        return records

    @classmethod
    def load(cls, folder, *, spec, name, dtype, quantize, keep_text_encoders, verify) -> "Pipeline":
        raise NotImplementedError(f"{cls.__name__} does not load folders")

    # ---- what a family supplies -------------------------------------------------------------------

    def uses_negative(self, guidance: float, options: dict) -> bool:
        """Whether this guidance needs the negative prompt's conditioning (a second pass)."""
        raise NotImplementedError

    def latent_shape(self, width: int, height: int) -> tuple[int, ...]:
        """The shape of one image's initial noise."""
        raise NotImplementedError

    def sample(self, noise: mx.array, cond: Conditioning, *, steps: int, guidance: float, width: int, height: int,
               init: mx.array | None, strength: float, run: Callable, **options) -> mx.array:
        """Denoise a micro-batch: noise -> final latents; `run(step_fn, x, n)` drives the steps."""
        raise NotImplementedError

    def decode(self, latents: mx.array, tiled: bool | None = None) -> mx.array:
        """Final latents -> images (B, H, W, 3) in [-1, 1]."""
        return self.vae.decode_latents(latents.astype(self.dtype), tiled=tiled)

    def preview_latents(self, x: mx.array) -> mx.array:
        """The sampler's state after a step -> latents `decode` takes (for per-step previews)."""
        return x

    def tokens_cut(self, prompt: str) -> int:
        """How many tokens of `prompt` the text encoder's length cuts off (0: none)."""
        return 0

    # ---- shared steps -----------------------------------------------------------------------------

    def check_size(self, width: int, height: int) -> None:
        multiple = self.size_multiple
        for side, value in (("width", width), ("height", height)):
            if value % multiple:
                raise ValueError(f"{side} {value} is not a multiple of {multiple} (VAE x{self.vae.config.downscale}, "
                                 f"2x2 patches): try {max(multiple, round(value / multiple) * multiple)}")
            if not multiple <= value <= MAX_SIDE:
                raise ValueError(f"{side} {value} is outside {multiple}..{MAX_SIDE} pixels")

    @property
    def weight_bytes(self) -> int:
        """The denoiser's weights in memory (known from shapes, also before they are read)."""
        return sum(v.nbytes for _, v in tree_flatten(self.transformer.parameters()))

    @property
    def n_params(self) -> int:
        """The denoiser's parameter count (what decides whether compiling pays: compilation.py)."""
        return sum(v.size for _, v in tree_flatten(self.transformer.parameters()))

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae.config.downscale  # VAE downscale x the 2x2 patch

    def encode(self, prompts: list[str]) -> dict:
        """Distinct prompts are encoded once; the rows are then gathered for every image."""
        if self.text_encoder is None:
            if self._load_text_encoder is None:
                raise RuntimeError("the text encoders were released and cannot be re-loaded: "
                                   "build the pipeline with keep_text_encoders=True to reuse it")
            self.text_encoder = self._load_text_encoder()
        distinct = list(dict.fromkeys(prompts))
        cond = self.text_encoder(distinct)
        cond = tree_map(lambda a: a.astype(self.dtype) if mx.issubdtype(a.dtype, mx.floating) else a, cond)
        mx.eval(cond)
        if len(distinct) == len(prompts):
            return cond
        index = mx.array([distinct.index(p) for p in prompts])
        return tree_map(lambda a: a[index], cond)

    def release_text_encoder(self) -> None:
        if not self.keep_text_encoders:
            self.text_encoder = None
            if mx.get_active_memory() > COLLECT_ABOVE:  # what reference cycles may still hold is worth
                gc.collect()  # a full collection (T5-XXL: GBs); below, it would only cost the first image ~7 ms
            mx.clear_cache()

    def condition(self, prompts: str | list[str], negative_prompt: str | list[str] = "", guidance: float | None = None,
                  **options) -> Conditioning:
        """Encode once, generate many times: `generate(conditioning=pipe.condition([...]))`.
        `negative_prompt`: one for every prompt, or a list with one per prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one per prompt")
        guidance = self.defaults.guidance if guidance is None else guidance
        start = self._phase()
        cond = Conditioning(prompts, self.encode(prompts))
        if self.uses_negative(guidance, options):
            cond.negative = self.encode(negatives)
        self.release_text_encoder()
        self._phase("text", start)
        return cond

    def _phase(self, name: str | None = None, start: float | None = None) -> float:
        """Start a phase (no arguments: -> its start time) or close one: add its time and peak memory."""
        if name is not None:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            self.peak_memory[name] = max(self.peak_memory.get(name, 0), mx.get_peak_memory())
        mx.reset_peak_memory()
        return time.perf_counter()

    def run_steps(self, step: Callable[[int, mx.array], mx.array], x: mx.array, n: int,
                  progress: Progress | None = None, preview: Callable[[int, mx.array], None] | None = None):
        """x -> step(0, x) -> ... n steps, each evaluated on its own, reported and previewed. Step
        i + 1's graph is built while step i computes (mx.async_eval), and step i is waited for
        before step i + 2 is built: at most two steps in flight, the same numbers."""
        start = time.perf_counter()
        ahead = not reading_out_active()  # the attention-map read-out counts steps by the progress calls
        x = step(0, x) if n else x
        for i in range(1, n + 1):
            if ahead and i < n:
                mx.async_eval(x)
                following = step(i, x)  # built on the unevaluated x, queued behind it
                mx.async_eval(following)
            mx.eval(x)
            if progress:
                progress(i, n, time.perf_counter() - start)
            if preview:
                preview(i, x)
            if i < n:
                x = following if ahead else step(i, x)
        return x

    @_in_compile_scope
    def generate(
        self,
        prompt: str | list[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | list[int] = 0,
        n_images: int = 1,
        negative_prompt: str | list[str] = "",
        image=None,
        strength: float = 0.75,
        mask=None,
        references: list | None = None,
        posterior_noise: mx.array | None = None,
        progress: Progress | None = None,
        latents: mx.array | None = None,
        vae_tiling: bool | None = None,
        conditioning: Conditioning | None = None,
        batch_size: int | None = None,
        preview: Callable[[int, mx.array], None] | None = None,
        **options,
    ):
        """Images (PIL) for each prompt x n_images; image i of a prompt uses seed + i, so any image
        can be remade alone; a list of seeds gives every output image its own (and implies the
        number of images per prompt). `conditioning` (from `condition`) replaces the prompts.
        `guidance`: the family's guidance knob (see its class). `image`/`strength`: image-to-image;
        with `mask` (white = repaint): inpainting (editing/masked_sampling.py). `references`:
        images the model edits from (families with `max_references`). Images are PIL images or
        paths. `latents` replaces the seeded noise; `posterior_noise` the ε that samples the init
        image's VAE posterior (families with init_posterior "sample"; default: from each seed). `batch_size`: images per denoising pass (default all).
        `vae_tiling`: None decodes in tiles above 768x768 pixels or where the untiled decode would
        not fit the device's memory (memory.py); True / False force it.
        `preview(step, latents)` is called after every step; `self.decode` turns them into images.
        Family options (e.g. FLUX's `true_cfg`) pass through `options`."""
        self.timings, self.peak_memory = {}, {}
        d = self.defaults
        self.check_editing(image, mask, references)
        width, height = self.output_size(width, height, image, references)
        steps, guidance = steps or d.steps, d.guidance if guidance is None else guidance
        self.check_size(width, height)
        if conditioning is None:
            if prompt is None:
                raise ValueError("give a prompt (or conditioning from Pipeline.condition)")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            conditioning = self.condition(prompts, negative_prompt, guidance, **options)
        seeds = expand_seeds(len(conditioning.prompts), n_images, seed)
        n_images = len(seeds) // len(conditioning.prompts)
        if n_images > 1:  # one row per image
            conditioning = conditioning.rows([r for r in range(len(conditioning.prompts)) for _ in range(n_images)])
        B = len(seeds)
        # the images are encoded once, not per image
        posterior = self.encode_image(image, width, height) if image is not None else None
        edit = {}
        if mask is not None:
            edit["mask"] = self.read_mask(mask, image, width, height)
        if references:
            edit["references"] = self.encode_references(references, width, height)
        if vae_tiling is None:
            vae_tiling = auto_tiling(width, height, self.vae.config.block_out_channels[0], self.dtype)

        out, finals = [], []
        for phase in ("denoise", "decode"):
            self.timings[phase], self.peak_memory[phase] = 0.0, 0
        batch_size = batch_size or B
        for s in range(0, B, batch_size):
            rows = list(range(s, min(s + batch_size, B)))
            noise = (latents[s:rows[-1] + 1] if latents is not None
                     else mx.concatenate([self.noise(seeds[i], width, height) for i in rows]))
            init = None
            if posterior is not None:
                eps = None
                if self.init_posterior == "sample":
                    eps = (posterior_noise[s:rows[-1] + 1] if posterior_noise is not None
                           else mx.concatenate([self.posterior_noise(seeds[i], posterior.mean.shape) for i in rows]))
                init = self.init_latents(posterior, eps)
            start = self._phase()
            with wired_weights(self.weight_bytes):
                x = self.sample(noise, conditioning.rows(rows), steps=steps, guidance=guidance, width=width,
                                height=height, init=init, strength=strength, **edit,
                                run=lambda step, x, n: self.run_steps(step, x, n, progress, preview), **options)
            finals.append(x)
            start = self._phase("denoise", start)
            pixels = self.decode(x, tiled=vae_tiling)
            mx.eval(pixels)
            self._phase("decode", start)
            out.append(pixels)
        self.last_latents = mx.concatenate(finals) if len(finals) > 1 else finals[0]
        from ..models.pixels import to_pil

        return to_pil(mx.concatenate(out) if len(out) > 1 else out[0])

    def noise(self, seed: int, width: int, height: int) -> mx.array:
        """One image's noise (1, ...), from its seed alone."""
        return sample_noise(seed, (1, *self.latent_shape(width, height)))
