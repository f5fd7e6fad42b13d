"""The tiny-shapes recipe, stage by stage: tokenizer, then the VAE, then the T5 + MM-DiT on its
latents (`tiny-imagegen train` is its command line; the ablations reuse its stages).

Every stage checkpoints under `args.out` and resumes bit-identically; the final EMA weights are
written to `args.weights`.
"""

import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..layers.embeddings import pack_latents
from ..models.vae import AutoencoderKL, DiagonalGaussian
from ..text.t5_sentencepiece import T5Tokenizer
from . import tiny_shapes as ts
from .objectives import sample_t
from .shapes_dataset import make_batch
from .trainer import Trainer, TrainConfig


def step_key(seed: int, stage: int, step: int) -> mx.array:
    """The key of one training step: a pure function of (seed, stage, step), so resuming needs no RNG state."""
    return mx.random.key((seed * 7919 + stage) * 1_000_003 + step)


# ---- stage 1: the VAE ---------------------------------------------------------------------------


def vae_loss(vae: AutoencoderKL, x: mx.array, eps: mx.array, kl_weight: float) -> mx.array:
    """L1 + L2 reconstruction of a posterior sample z = μ + σ ε, plus kl_weight · KL(q(z|x) || N(0, I))
    (all means over elements)."""
    # the modules directly: AutoencoderKL.encode/decode evaluate eagerly, which a compiled step cannot
    moments = vae.encoder(x)
    q = DiagonalGaussian(vae.quant_conv(moments) if "quant_conv" in vae else moments)
    z = q.mean + q.std * eps
    reconstruction = vae.decoder(vae.post_quant_conv(z) if "post_quant_conv" in vae else z)
    err = reconstruction - x
    kl = 0.5 * mx.mean(mx.square(q.mean) + mx.exp(q.logvar) - 1.0 - q.logvar)
    return mx.mean(mx.abs(err)) + mx.mean(mx.square(err)) + kl_weight * kl


def train_vae(args, folder: Path) -> AutoencoderKL:
    mx.random.seed(args.seed)
    vae = AutoencoderKL(ts.vae_config())
    # The posterior's log-variance starts near 0 (σ = 1, as large as the signal), which drowns the
    # latents in noise until the encoder learns to shrink it; colour, the subtler signal, then comes
    # late. Starting at log σ² = -6 (σ = 0.05) skips that phase.
    C = vae.config.latent_channels
    bias = vae.encoder.conv_out.bias
    vae.encoder.conv_out.bias = mx.concatenate([bias[:C], mx.full((C,), args.vae_logvar_init)])
    n = ts.IMAGE_SIZE // vae.config.downscale
    B = args.vae_batch

    def batch(step):
        images, _, _ = make_batch(args.seed, B, "train", ts.IMAGE_SIZE, as_float=True, start=step * B)
        eps = mx.random.normal((B, n, n, vae.config.latent_channels), key=step_key(args.seed, 1, step))
        return mx.array(images), eps

    cfg = TrainConfig(steps=args.vae_steps, learning_rate=args.vae_lr, warmup_steps=50, ema_decay=0.99,
                      checkpoint_every=100, log_every=10)
    trainer = Trainer(vae, lambda m, x, e: vae_loss(m, x, e, args.kl_weight), batch, cfg, folder, "vae")
    trainer.resume()
    if trainer.step < cfg.steps:
        if args.export_only:
            raise SystemExit(f"--export-only: the VAE stage is not finished ({trainer.step}/{cfg.steps} steps)")
        print(f"vae: final loss {trainer.train():.4f}", file=sys.stderr)
    vae.update(trainer.ema)  # after 1500 steps at d = 0.99 the initial weights' share is 3e-7: no correction needed
    return vae


# ---- stage 2: latents of the training pool ---------------------------------------------------------


def encode_pool(args, vae: AutoencoderKL, tokenizer: T5Tokenizer, path: Path):
    """The posterior means of `pool` training images and their caption tokens, cached in `path`."""
    if not path.is_file():
        t0, latents, ids, masks = time.perf_counter(), [], [], []
        for start in range(0, args.pool, 256):
            images, captions, _ = make_batch(args.seed + 1, min(256, args.pool - start), "train", ts.IMAGE_SIZE,
                                             as_float=True, start=start)
            latents.append(vae.encode(mx.array(images)).mean)
            i, m = tokenizer(captions)
            ids.append(i), masks.append(m)
            mx.eval(latents[-1])
        z = mx.concatenate(latents)
        mx.save_safetensors(str(path), {"z": z, "ids": mx.concatenate(ids), "mask": mx.concatenate(masks)})
        print(f"encoded {args.pool} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    data = mx.load(str(path))
    return data["z"], data["ids"], data["mask"]


def with_latent_statistics(vae: AutoencoderKL, z: mx.array) -> AutoencoderKL:
    """Set shift_factor / scaling_factor so the diffusion model sees zero-mean, unit-variance
    latents, as FLUX's 0.1159 / 0.3611 were measured on its training set."""
    mean, std = mx.mean(z).item(), mx.sqrt(mx.var(z)).item()
    vae.config = replace(vae.config, shift_factor=round(mean, 4), scaling_factor=round(1.0 / std, 4))
    return vae


# ---- stage 3: T5 + MM-DiT -------------------------------------------------------------------------


def make_denoiser_batches(args, x0_all: mx.array, ids_all: mx.array, mask_all: mx.array, tokenizer: T5Tokenizer):
    N, B = x0_all.shape[0], args.batch
    if N % B:
        raise ValueError(f"--pool {N} must be a multiple of --batch {B}")
    empty_ids, empty_mask = tokenizer([""])
    cache = {}

    def batch(step):
        epoch, pos = divmod(step * B, N)
        if epoch not in cache:  # a fresh permutation of the pool per epoch
            cache.clear()
            cache[epoch] = np.random.default_rng([args.seed, epoch]).permutation(N)
        idx = mx.array(cache[epoch][pos : pos + B])
        k_noise, k_t, k_drop = mx.random.split(step_key(args.seed, 3, step), 3)
        x0 = x0_all[idx]
        drop = (mx.random.uniform(shape=(B, 1), key=k_drop) < args.caption_dropout)
        ids = mx.where(drop, empty_ids, ids_all[idx])
        mask = mx.where(drop, empty_mask, mask_all[idx])
        return x0, ids, mask, mx.random.normal(x0.shape, key=k_noise), sample_t(k_t, B, "logit_normal")

    return batch


def build_denoiser(args, tokenizer: T5Tokenizer, vae: AutoencoderKL) -> ts.TinyDenoiser:
    mx.random.seed(args.seed + 2)
    t5 = ts.t5_config(tokenizer.sp.get_piece_size())
    return ts.init_for_training(ts.TinyDenoiser.from_configs(t5, ts.mmdit_config(vae.config.latent_channels, t5.d_model),
                                                ts.IMAGE_SIZE // vae.config.downscale))


def export(args, out: Path, vae: AutoencoderKL, tokenizer_dir: Path, denoiser: ts.TinyDenoiser, step: int):
    log = (out / "denoiser" / "denoiser_loss.tsv").read_text().splitlines()[1:]
    last = [float(line.split("\t")[1]) for line in log[-50:]]
    command = (f"python examples/train_tiny.py --seed {args.seed} --vae-steps {args.vae_steps} --vae-batch {args.vae_batch} "
               f"--pool {args.pool} --steps {args.steps} --batch {args.batch}")
    training = {
        "command": command,
        "vae_steps": args.vae_steps, "vae_batch": args.vae_batch, "steps": step, "batch": args.batch,
        "pool": args.pool, "seed": args.seed, "t_distribution": "logit_normal",
        "caption_dropout": args.caption_dropout,
    }
    if last:
        training["final_loss_mean_last_50_steps"] = round(sum(last) / len(last), 5)
    ts.save_tiny_shapes(args.weights, vae, denoiser, tokenizer_dir, training=training)
    print(f"wrote {args.weights}", file=sys.stderr)


def run(args) -> None:
    """All stages, resumed from `args.out` where they stopped (args: the train command's flags)."""
    out = Path(args.out)

    t0 = time.perf_counter()
    tokenizer_dir = out / "tokenizer"
    tokenizer = ts.train_tokenizer(tokenizer_dir)

    vae = train_vae(args, out / "vae")
    z, ids, mask = encode_pool(args, vae, tokenizer, out / "pool.safetensors")
    vae = with_latent_statistics(vae, z)
    x0 = pack_latents(vae.to_latents(z), ts.PATCH)  # (N, 64, 16)
    mx.eval(x0)

    denoiser = build_denoiser(args, tokenizer, vae)
    cfg = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=200, ema_decay=0.999,
                      checkpoint_every=args.checkpoint_every, log_every=10)
    trainer = Trainer(denoiser, ts.denoiser_loss, make_denoiser_batches(args, x0, ids, mask, tokenizer), cfg,
                      out / "denoiser", "denoiser")
    trainer.resume()
    if args.export_only:
        denoiser.update(trainer.averaged_parameters())
        export(args, out, vae, tokenizer_dir, denoiser, trainer.step)
        return
    final = trainer.train()
    denoiser.update(trainer.averaged_parameters())
    export(args, out, vae, tokenizer_dir, denoiser, trainer.step)
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min, final denoiser loss {final:.4f}", file=sys.stderr)

