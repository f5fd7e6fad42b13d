"""Loaded pipelines kept between jobs, the least recently used evicted when a new one would not fit.

A pipeline is keyed by what its loading depends on (model, dtype, quantization, LoRAs); a job with
the same key reuses it, with no reload. Its resident size is its denoiser's and VAE's weights
(known from their shapes); the text encoders follow the pipeline's release rule (freed after each
prompt's encoding unless --keep-text-encoders, re-loaded lazily), so they are not counted as
resident. Before loading, the registry's size estimate (sizes.py, where the model has published
configs) makes room; after loading the measured size evicts more if needed. The model being loaded
is never evicted for itself: one model larger than the budget still runs, alone.

Only the worker thread calls `get`; `loaded` is read by the /api/models route.
"""

import gc
import threading
from collections import OrderedDict

import mlx.core as mx
from mlx.utils import tree_flatten

from ..commands.rendering import load_pipeline


def resident_bytes(pipe) -> int:
    return sum(v.nbytes for module in (pipe.transformer, pipe.vae) if module is not None
               for _, v in tree_flatten(module.parameters()))


def estimated_bytes(args, keep_text_encoders: bool) -> int:
    """The registry's estimate of what stays loaded (0 where the model has no published configs):
    the denoiser and VAE, and the text encoders only where they are kept."""
    from .. import registry
    from ..checkpoints.components import COMPONENTS
    from ..registry.sizes import model_bytes
    from ..conditioning.t5_clip import default_dtype

    spec = registry.find(args.model)
    sizes = model_bytes(spec) if spec else {}
    setting = {None: "bf16", 8: "8-bit", 4: "4-bit"}[args.quantize]
    dtype = default_dtype() if args.dtype == "auto" else getattr(mx, args.dtype)
    scale = 2 if setting == "bf16" and dtype == mx.float32 else 1  # the estimate is of bf16 weights
    return scale * sum(b for name, b in sizes.get(setting, {}).items()
                       if keep_text_encoders or not COMPONENTS[name].source_folder.startswith("text_encoder"))


def pipeline_key(args) -> tuple:
    return (args.model, args.dtype, args.quantize, args.modulation_bits, tuple(args.lora or ()))


class ModelPool:
    def __init__(self, budget: int, keep_text_encoders: bool = False):
        self.budget, self.keep_text_encoders = budget, keep_text_encoders
        self._loaded: OrderedDict[tuple, tuple[object, int]] = OrderedDict()  # key -> (pipeline, bytes)
        self._lock = threading.Lock()
        self.loads = 0  # how many times a pipeline was loaded (tests: models stay loaded)

    def loaded(self) -> list[dict]:
        with self._lock:
            return [{"model": k[0], "dtype": k[1], "quantize": k[2], "loras": list(k[4]), "bytes": b}
                    for k, (_, b) in self._loaded.items()]

    def used(self) -> int:
        return sum(b for _, b in self._loaded.values())

    def get(self, args):
        """The pipeline for generate's arguments: the loaded one, or loaded now after making room."""
        key = pipeline_key(args)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key][0]
        self._evict(estimated_bytes(args, self.keep_text_encoders))
        pipe = load_pipeline(args, keep_text_encoders=self.keep_text_encoders)
        size = resident_bytes(pipe)
        self._evict(size)
        with self._lock:
            self._loaded[key] = (pipe, size)
            self.loads += 1
        return pipe

    def _evict(self, needed: int) -> None:
        """Drop the least recently used pipelines until `needed` more bytes fit the budget."""
        evicted = False
        with self._lock:
            while self._loaded and self.used() + needed > self.budget:
                self._loaded.popitem(last=False)
                evicted = True
        if evicted:
            gc.collect()
            mx.clear_cache()

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()
        gc.collect()
        mx.clear_cache()
