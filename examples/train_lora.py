"""Train a LoRA on the shipped tiny-shapes model: teach it a colour-shape pair it never saw.

    python examples/train_lora.py --concept "purple circle" --output weights/lora-purple-circle.safetensors
    python examples/evaluate_tiny.py --prompt "a purple circle" --n 50 --lora weights/lora-purple-circle.safetensors

Data parallel over processes or machines (mx.distributed, ring backend), the same global batch:

    mlx.launch --backend ring -n 2 --python .venv/bin/python examples/train_lora.py ...      # two processes here
    mlx.launch --backend ring --hostfile hosts.json --python .venv/bin/python examples/train_lora.py ...

`--tiny-random` trains a small random model on random data instead (seconds; the test of the
distributed loop). Set `LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0` on x86-64 Linux.
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_imagegen.layers.embeddings import pack_latents  # noqa: E402
from tiny_imagegen.train import tiny_shapes as ts  # noqa: E402
from tiny_imagegen.train.objectives import sample_t  # noqa: E402
from tiny_imagegen.train.lora import add_lora, concept_scenes, epoch_order, save_lora, shard  # noqa: E402
from tiny_imagegen.train.shapes_dataset import render, sample_scene, to_float  # noqa: E402
from tiny_imagegen.train.trainer import Trainer, TrainConfig  # noqa: E402


def tiny_shapes_pool(args):
    """The shipped model and its training pool: half scenes with the concept, half of the train split."""
    pipe = ts.load_pipeline(args.weights)
    colour, shape = args.concept.split()
    half = args.pool // 2
    scenes = concept_scenes(args.seed, half, colour, shape) + [sample_scene(args.seed + 1, i, "train") for i in range(half)]
    x0 = []
    for start in range(0, len(scenes), 128):
        images = to_float(np.stack([render(s) for s in scenes[start : start + 128]]))
        x0.append(pack_latents(pipe.vae.to_latents(pipe.vae.encode(mx.array(images)).mean), ts.PATCH))
        mx.eval(x0[-1])
    ids, mask = pipe.text_encoder.tokenizer([s.caption for s in scenes])
    empty = pipe.text_encoder.tokenizer([""])
    return ts.TinyDenoiser(pipe.text_encoder.t5, pipe.transformer), mx.concatenate(x0), ids, mask, empty


def tiny_random_pool(args):
    """A small random denoiser and random data: for testing the loop, in seconds."""
    from dataclasses import replace

    mx.random.seed(args.seed)
    t5 = replace(ts.t5_config(50), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    mmdit = replace(ts.mmdit_config(4, 32), head_dim=16, depth_double=1, depth_single=1)
    denoiser = ts.TinyDenoiser.from_configs(t5, mmdit)
    k1, k2 = mx.random.split(mx.random.key(args.seed))
    x0 = mx.random.normal((args.pool, 64, 16), key=k1)
    ids = mx.random.randint(3, 50, (args.pool, ts.MAX_LENGTH), key=k2)
    mask = mx.ones((args.pool, ts.MAX_LENGTH), dtype=mx.int32)
    return denoiser, x0, ids, mask, (ids[:1] * 0, mask[:1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="weights/tiny-shapes")
    p.add_argument("--concept", default="purple circle", help="the colour and shape to teach")
    p.add_argument("--output", default="weights/lora-purple-circle.safetensors")
    p.add_argument("--out", default="runs/lora", help="checkpoints and the loss log")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="scale = alpha / rank (default alpha = rank)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32, help="the global batch, split over the processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=1024, help="training images: half with the concept")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--tiny-random", action="store_true", help="a small random model on random data (tests)")
    args = p.parse_args(argv)

    group = mx.distributed.init()
    t0 = time.perf_counter()
    denoiser, x0_all, ids_all, mask_all, (empty_ids, empty_mask) = (tiny_random_pool if args.tiny_random
                                                                    else tiny_shapes_pool)(args)
    denoiser.freeze()
    paths = add_lora(denoiser.transformer, args.rank, alpha=args.alpha)
    N, B = x0_all.shape[0], args.batch

    def batch(step):  # the global batch of `step`, the same in every process; then this process's share
        epoch, pos = divmod(step * B, N)
        idx = mx.array(epoch_order(args.seed, epoch, N)[pos : pos + B])
        k_noise, k_t, k_drop = mx.random.split(mx.random.key(args.seed * 1_000_003 + step), 3)
        drop = mx.random.uniform(shape=(B, 1), key=k_drop) < args.caption_dropout
        x0 = x0_all[idx]
        return shard((x0, mx.where(drop, empty_ids, ids_all[idx]), mx.where(drop, empty_mask, mask_all[idx]),
                      mx.random.normal(x0.shape, key=k_noise), sample_t(k_t, B, "logit_normal")), group)

    cfg = TrainConfig(steps=args.steps, learning_rate=args.lr, warmup_steps=min(50, args.steps // 10),
                      checkpoint_every=args.checkpoint_every, log_every=10)
    trainer = Trainer(denoiser, ts.denoiser_loss, batch, cfg, args.out, "lora", group=group)
    if trainer.is_main:
        n_params = sum(m.lora_a.size + m.lora_b.size for _, m in denoiser.transformer.named_modules()
                       if hasattr(m, "lora_a"))
        print(f"LoRA rank {args.rank} on {len(paths)} layers: {n_params:,} parameters; {group.size()} process(es), "
              f"global batch {B}; data ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    trainer.resume()
    final = trainer.train()
    if trainer.is_main:
        out = save_lora(denoiser.transformer, args.output)
        print(f"final loss {final:.4f}; wrote {out} ({out.stat().st_size / 1e3:.0f} kB)", file=sys.stderr)


if __name__ == "__main__":
    main()
