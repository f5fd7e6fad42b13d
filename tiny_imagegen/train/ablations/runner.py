"""The lecture's claims, measured on tiny-shapes: conditioning, position encoding, architecture and
objective ablations, each variant trained by the shipped recipe's code at one budget.

Every row is a `Variant` (data: a backbone config, an objective, whether it is also scored at
128x128); a run is a variant and a seed (`RunSpec`), two seeds a row. All runs share:

- the data: the shipped model's 16,384 training images (stream 1 of the dataset, as `tiny-imagegen
  train` draws them), encoded once by the shipped VAE (weights/tiny-shapes; never retrained) and
  cached; the shipped tokenizer; captions dropped to "" 10% of the time;
- the recipe: AdamW 1e-3, 200 warmup steps then cosine to 1e-4, weight decay 0.01, gradient clip
  1, EMA 0.999 with bias correction (trainer.py), batch 64, `Budget.steps` steps; the batches
  (which images, ε, t) are those of `tiny-imagegen train` for the run's seed;
- a text encoder trained from scratch with the backbone (T5, 2 layers, width 128: 341 k);
- backbones with 1.82 M ± 10% parameters (the shipped MM-DiT's 1,818,768; `check_parameters`).

The shipped recipe's variant is `mmdit`; it appears in every group. A finished run is one JSON
record in the results file (config, seed, budget, metrics, wall time, machine); a rerun skips
it. Checkpoints and the loss log of a run in progress live under `work/<run>/` and resume.
"""

import contextlib
import fcntl
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from ..recipe import encode_pool, make_denoiser_batches, step_key
from ...models.t5 import T5Encoder
from ...text.t5_sentencepiece import T5Tokenizer
from .. import tiny_shapes as ts
from .scoring import LOSSES, ddpm_steps, score_denoiser
from .backbones import (
    AblationDenoiser, DiTBackboneConfig, MMDiTBackboneConfig, UNetBackboneConfig, build_backbone, count_parameters,
)
from ..trainer import Trainer, TrainConfig, load_tree, save_tree

SHIPPED_PARAMETERS = 1_818_768  # the shipped MM-DiT (weights/tiny-shapes/model.json)
PARAMETER_TOLERANCE = 0.10
REFERENCE = "mmdit"  # the shipped recipe's variant
SHIPPED_TRAIN_OBJECT = 0.27  # the shipped model's train-split object accuracy (docs/tiny-shapes.md); the budget must reach half
SEEDS = (0, 1)


def _mmdit(rope: str = "mixed", positions: str = "rope-centred") -> MMDiTBackboneConfig:
    cfg = ts.mmdit_config()  # hybrid 2 + 2 blocks, 2 heads x 64, as shipped
    if rope == "axial":  # (row, col) ids, half the channel pairs each: the same ids as mixed
        cfg = replace(cfg, rope="axial", axes_dim=(32, 32))
    return MMDiTBackboneConfig(cfg, positions)


def _dit(conditioning: str, depth: int) -> DiTBackboneConfig:
    from ...models.dit import DiTConfig

    return DiTBackboneConfig(DiTConfig(
        in_channels=4, out_channels=4, sample_size=16, patch_size=2, num_heads=2, head_dim=64, depth=depth,
        num_classes=None, text_dim=128, context_dim=None if conditioning == "adaln-zero" else 128,
        conditioning=conditioning))


def _unet() -> UNetBackboneConfig:
    from ...models.unet import UNetConfig

    down = ("CrossAttnDownBlock2D",) * 3
    return UNetBackboneConfig(UNetConfig(
        block_out_channels=(32, 64, 64), down_block_types=down, up_block_types=tuple(t.replace("Down", "Up") for t in down),
        layers_per_block=1, attention_heads=(1, 2, 2), cross_attention_dim=128, norm_num_groups=8, sample_size=16))


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    backbone: object  # one of ablation_models' *BackboneConfig
    objective: str = "flow"
    extrapolate: bool = False  # also scored at 128x128 (the position rows)


@dataclass(frozen=True)
class RunSpec:
    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.name}-seed{self.seed}"


VARIANTS = {v.name: v for v in (
    Variant("mmdit", "MM-DiT hybrid, joint attention, mixed RoPE, centred ids (the shipped recipe)", _mmdit(),
            extrapolate=True),
    Variant("dit-adaln", "DiT adaLN-Zero, pooled text vector only, 6 blocks", _dit("adaln-zero", 6)),
    Variant("dit-in-context", "DiT in-context: t, pooled text and T5 tokens in the sequence, 9 blocks",
            _dit("in-context", 9)),
    Variant("dit-cross", "DiT cross-attention to the T5 tokens, 6 blocks", _dit("cross-attention", 6)),
    Variant("mmdit-ape-learned", "MM-DiT, learned absolute positions, no RoPE", _mmdit(positions="ape-learned"),
            extrapolate=True),
    Variant("mmdit-ape-sincos", "MM-DiT, 2-D sin-cos absolute positions, no RoPE", _mmdit(positions="ape-sincos"),
            extrapolate=True),
    Variant("mmdit-axial", "MM-DiT, axial RoPE, ids from the top-left corner", _mmdit("axial", "rope-corner"),
            extrapolate=True),
    Variant("mmdit-axial-centred", "MM-DiT, axial RoPE, centred ids", _mmdit("axial"), extrapolate=True),
    Variant("mmdit-mixed-corner", "MM-DiT, mixed RoPE, ids from the top-left corner", _mmdit(positions="rope-corner"),
            extrapolate=True),
    Variant("unet", "U-Net (SD 1.5 blocks) 32/64/64, cross-attention to the T5 tokens", _unet()),
    Variant("mmdit-ddpm", "MM-DiT as shipped, DDPM eps-prediction, 20 DDIM steps", _mmdit(), objective="ddpm"),
)}

GROUPS = {  # the table's sections: which rows each claim compares
    "Conditioning": ("dit-adaln", "dit-in-context", "dit-cross", "mmdit"),
    "Position encoding (MM-DiT)": ("mmdit-ape-learned", "mmdit-ape-sincos", "mmdit-axial", "mmdit-axial-centred",
                                   "mmdit-mixed-corner", "mmdit"),
    "Architecture": ("unet", "dit-cross", "mmdit"),
    "Objective (MM-DiT)": ("mmdit", "mmdit-ddpm"),
}


@dataclass(frozen=True)
class Budget:
    steps: int = 3000
    batch: int = 64
    pool: int = 16384  # training images
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    eval_captions: int = 200  # train-split captions scored (64x64, and 128x128 for the position rows)
    binding_captions: int = 100
    sample_steps: int = 20
    guidance: float = 4.0

    def key(self) -> dict:
        return asdict(self)


SMOKE = Budget(steps=2, batch=2, pool=4, warmup_steps=1, eval_captions=1, binding_captions=1, sample_steps=1)


# ---- parameters ----------------------------------------------------------------------------------


def build_denoiser(variant: Variant, vocab_size: int, seed: int) -> AblationDenoiser:
    """The initial model of a run: a pure function of (variant, seed), so a resumed run rebuilds it."""
    mx.random.seed(seed)
    t5 = T5Encoder(ts.t5_config(vocab_size))
    return AblationDenoiser(t5, build_backbone(variant.backbone, seed))


def backbone_parameters(variant: Variant) -> int:
    return count_parameters(build_backbone(variant.backbone))


def check_parameters(variants=None, verbose: bool = False) -> dict[str, int]:
    """Backbone parameter counts; a ValueError names any variant off the shipped count by more than 10%."""
    counts = {v.name: backbone_parameters(v) for v in (variants or VARIANTS.values())}
    if verbose:
        for name, n in counts.items():
            print(f"{name:22s} {n:>10,d} backbone parameters ({n / SHIPPED_PARAMETERS - 1:+.1%})", file=sys.stderr)
    off = {k: n for k, n in counts.items() if abs(n / SHIPPED_PARAMETERS - 1) > PARAMETER_TOLERANCE}
    if off:
        raise ValueError(f"backbones not within 10% of the shipped {SHIPPED_PARAMETERS:,d} parameters: {off}")
    return counts


# ---- the shared data -----------------------------------------------------------------------------


@dataclass
class ShapesData:
    vae: object
    tokenizer: T5Tokenizer
    x0: mx.array  # (N, 16, 16, 4) diffusion-space latents of the pool
    ids: mx.array  # (N, 16) caption tokens
    mask: mx.array


def load_data(weights: Path, work: Path, pool: int) -> ShapesData:
    """The shipped VAE and tokenizer, and the pool encoded by that VAE (cached under `work`)."""
    from ...checkpoints.convert import load_component

    weights, work = Path(weights), Path(work)
    vae = load_component(weights, "vae", dtype=mx.float32)
    tokenizer = T5Tokenizer.from_folder(weights / "tokenizer_2", max_length=ts.MAX_LENGTH)
    work.mkdir(parents=True, exist_ok=True)
    with file_lock(work / f"pool-{pool}.lock"):  # parallel runners: one encodes, the others read its cache
        z, ids, mask = encode_pool(SimpleNamespace(seed=0, pool=pool), vae, tokenizer, work / f"pool-{pool}.safetensors")
    x0 = vae.to_latents(z)
    mx.eval(x0)
    return ShapesData(vae, tokenizer, x0, ids, mask)


def make_batches(spec: RunSpec, data: ShapesData, budget: Budget):
    """The shipped recipe's batches for the run's seed; DDPM draws its own steps k instead of t."""
    args = SimpleNamespace(seed=spec.seed, batch=budget.batch, caption_dropout=budget.caption_dropout)
    flow = make_denoiser_batches(args, data.x0, data.ids, data.mask, data.tokenizer)
    if spec.variant.objective == "flow":
        return flow

    def batch(step):
        x0, ids, mask, noise, _ = flow(step)
        return x0, ids, mask, noise, ddpm_steps(step_key(spec.seed, 4, step), budget.batch)

    return batch


# ---- one run ---------------------------------------------------------------------------------------


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "device": str(mx.default_device()), "mlx": mx.__version__,
            "openblas_preloaded": "openblas" in os.environ.get("LD_PRELOAD", ""),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def train_seconds(log: Path) -> float:
    """Training wall time over every sitting: the loss log's seconds restart at each resume."""
    total, last = 0.0, 0.0
    for line in log.read_text().splitlines()[1:]:
        s = float(line.split("\t")[4])
        if s < last:
            total += last
        last = s
    return total + last


def final_loss(log: Path, n: int = 50) -> float:
    losses = [float(line.split("\t")[1]) for line in log.read_text().splitlines()[1:][-n:]]
    return sum(losses) / len(losses)


def train_run(spec: RunSpec, data: ShapesData, budget: Budget, folder: Path) -> AblationDenoiser:
    """Train (or resume, or reload) one run; its EMA weights end in folder/final.safetensors."""
    denoiser = build_denoiser(spec.variant, data.tokenizer.sp.get_piece_size(), spec.seed)
    final = folder / "final.safetensors"
    if final.is_file():
        denoiser.update(load_tree(final))
        return denoiser
    cfg = TrainConfig(steps=budget.steps, learning_rate=budget.learning_rate, warmup_steps=budget.warmup_steps,
                      ema_decay=0.999, checkpoint_every=max(1, min(250, budget.steps // 4)), keep_checkpoints=1,
                      log_every=max(1, min(50, budget.steps // 10)))
    trainer = Trainer(denoiser, LOSSES[spec.variant.objective], make_batches(spec, data, budget), cfg, folder, spec.name)
    trainer.resume()
    trainer.train()
    denoiser.update(trainer.averaged_parameters())
    save_tree(final, denoiser.trainable_parameters())
    for old in folder.glob("step_*"):  # the run is done: its optimizer state is no longer needed
        shutil.rmtree(old)
    return denoiser


def _plain(x):
    """JSON without NaN: metrics that do not apply to a caption set are null."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run_one(spec: RunSpec, data: ShapesData, budget: Budget, work: Path, samples_dir: Path) -> dict:
    """Train and score one run -> its results record; its grid samples go to samples_dir."""
    from PIL import Image

    folder = work / spec.name
    t0 = time.perf_counter()
    denoiser = train_run(spec, data, budget, folder)
    t1 = time.perf_counter()
    metrics, samples = score_denoiser(denoiser, spec.variant.objective, data.vae, data.tokenizer, budget.eval_captions,
                                      budget.binding_captions, budget.sample_steps, budget.guidance,
                                      spec.variant.extrapolate)
    eval_seconds = time.perf_counter() - t1
    samples_dir.mkdir(parents=True, exist_ok=True)
    strip = np.concatenate([samples["train"], samples["binding"]])  # (K, 64, 64, 3)
    path = samples_dir / f"{spec.name}.png"
    Image.fromarray(np.concatenate(list(strip), axis=1)).save(path)  # one row
    log = folder / f"{spec.name}_loss.tsv"
    v = spec.variant
    return _plain({
        "variant": v.name, "seed": spec.seed, "description": v.description,
        "config": {"objective": v.objective, "extrapolate": v.extrapolate, "backbone": type(v.backbone).__name__,
                   **asdict(v.backbone), "backbone_parameters": count_parameters(denoiser.backbone),
                   "text_encoder_parameters": count_parameters(denoiser.text_encoder)},
        "budget": budget.key(), "metrics": metrics, "final_loss": final_loss(log),
        "wall_time_s": {"train": round(train_seconds(log), 1), "evaluate": round(eval_seconds, 1),
                        "this_sitting": round(time.perf_counter() - t0, 1)},
        "samples": path.name, "machine": machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


# ---- the results file ----------------------------------------------------------------------------


def read_results(path: Path) -> list[dict]:
    path = Path(path)
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def write_results(path: Path, records: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": "tiny_imagegen ablations", "version": 1, "runs": records}, indent=1) + "\n")
    tmp.replace(path)  # a crash never leaves half a file


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True):
    """An advisory lock on `path` (fcntl: macOS and Linux), held by one process at a time; the
    kernel drops it when the process dies, so a crashed run never leaves a stale lock. Yields
    whether it was taken (always, when `wait`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_result(path: Path, record: dict) -> None:
    """Add one record; processes running other rows of the same table append in turn."""
    with file_lock(Path(path).with_suffix(".lock")):
        write_results(path, read_results(path) + [record])


def find_record(records: list[dict], spec: RunSpec, budget: Budget) -> dict | None:
    for r in records:
        if r["variant"] == spec.variant.name and r["seed"] == spec.seed and r["budget"] == budget.key():
            return r
    return None


def plan_runs(only: list[str] | None = None, seeds=SEEDS) -> list[RunSpec]:
    """Every run, the shipped recipe's first (its seed 0 checks the budget); `only` picks variants."""
    names = list(VARIANTS)
    if only:
        unknown = [n for n in only if n not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}: choose from {names}")
        names = [n for n in names if n in only]
    names.sort(key=lambda n: n != REFERENCE)
    return [RunSpec(VARIANTS[n], s) for s in seeds for n in names]
