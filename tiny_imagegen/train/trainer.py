"""A small, exactly resumable training loop: AdamW, warmup + cosine learning rate, EMA weights,
a compiled step, a progress line, a loss log and periodic checkpoints.

Everything random in a step (which samples, the noise, the times t) is a pure function of the
step number: the caller's `batch_fn(step)` builds the batch from a seed and the step (e.g. an
epoch permutation and a key `mx.random.key` of (seed, step)). The loop itself draws nothing. So a
checkpoint needs no RNG state: model + EMA + optimizer (Adam moments and its step counter) + the
step number are the whole state, and a resumed run repeats the uninterrupted run bit for bit.

Data parallel (`group`, an `mx.distributed` group of N processes started by `mlx.launch`): every
process builds the same global batch from the step number, computes the loss and gradients of its
own 1/N of it (the caller's batch_fn slices), and the gradients are averaged with
`nn.average_gradients` (an all-reduce sum / N) before clipping and the AdamW update, so every
process takes the same step as one process on the whole batch would. Only rank 0 writes the
log and the checkpoints.

A checkpoint is a folder `step_000500/` with `model.safetensors`, `ema.safetensors`,
`optimizer.safetensors` and `state.json`; the loss log `loss.tsv` (step, loss, lr, grad norm,
seconds) lives beside them and is cut back to the checkpoint's step on resume.

Learning rate: linear warmup from lr/warmup to lr, then cosine decay to final_lr_fraction · lr
(Loshchilov & Hutter 2017). EMA (Polyak averaging): ema ← d · ema + (1 - d) · θ after every step,
starting from the initial weights θ_0. After t steps θ_0 still has the share d^t (16% for
d = 0.999 after 1800 steps: a short run's EMA is pulled towards the untrained model), so
`averaged_parameters()` removes it, (ema - d^t θ_0) / (1 - d^t), the same correction as Adam's
for its moments (Kingma & Ba 2015, §3): the weights that are shipped.
"""

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0  # max global gradient norm; None for none
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # older checkpoint folders are deleted
    log_every: int = 10  # steps per progress line (and per flush of the loss log)


def learning_rate_schedule(cfg: TrainConfig) -> Callable:
    warmup = max(cfg.warmup_steps, 1)
    decay = max(cfg.steps - warmup, 1)
    return optim.join_schedules(
        [
            optim.linear_schedule(cfg.learning_rate / warmup, cfg.learning_rate, warmup),
            optim.cosine_decay(cfg.learning_rate, decay, cfg.learning_rate * cfg.final_lr_fraction),
        ],
        [warmup],
    )


def save_tree(path: Path, tree) -> None:
    mx.save_safetensors(str(path), dict(tree_flatten(tree)))


def load_tree(path: Path):
    return tree_unflatten(list(mx.load(str(path)).items()))


def load_into(tree, path: Path) -> None:
    """Overwrite the leaves of `tree` (nested dicts and lists) in place from a file `save_tree`
    wrote. In place, because the compiled step holds these very dicts; and into the tree as built,
    because a flat file cannot bring back the empty subtree of a module without parameters (a
    RoPE), which the gradients still carry and tree_map then looks up."""
    loaded = mx.load(str(path))
    expected = {key for key, _ in tree_flatten(tree)}
    if loaded.keys() != expected:
        raise ValueError(f"{path} does not fit the model: missing {sorted(expected - loaded.keys())[:5]}, "
                         f"unexpected {sorted(loaded.keys() - expected)[:5]}")
    for key, value in loaded.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value


def checkpoint_folders(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("step_*") if (p / "state.json").is_file())


class Trainer:
    """Trains `model` on `loss_fn(model, *batch_fn(step))` for `config.steps` steps.

    folder: where checkpoints and the loss log go. Call `resume()` first to continue from the
    latest checkpoint there (or a given one), then `train()`."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batch_fn: Callable[[int], tuple], config: TrainConfig,
                 folder: str | Path, name: str = "train", group=None):
        self.model, self.loss_fn, self.batch_fn, self.config = model, loss_fn, batch_fn, config
        self.group = group if group is not None and group.size() > 1 else None
        self.is_main = self.group is None or self.group.rank() == 0
        self.folder, self.name = Path(folder), name
        self.optimizer = optim.AdamW(learning_rate_schedule(config), weight_decay=config.weight_decay)
        self.optimizer.init(model.trainable_parameters())
        self.ema = tree_map(lambda p: mx.array(p), model.trainable_parameters())
        self.ema_start = self.ema  # θ_0, for the bias correction (not saved: rebuild the same initial model to resume)
        self.step = 0
        self._compiled = None

    # -- the step --

    def _build_step(self):
        model, optimizer, clip, group = self.model, self.optimizer, self.config.grad_clip, self.group
        loss_and_grad = nn.value_and_grad(model, self.loss_fn)
        state = [model.state, optimizer.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(*batch):
            loss, grads = loss_and_grad(model, *batch)
            if group is not None:  # the mean over the global batch: average the processes' shares
                grads = nn.average_gradients(grads, group=group)
                loss = mx.distributed.all_sum(loss, group=group) / group.size()
            if clip is not None:
                grads, norm = optim.clip_grad_norm(grads, clip)
            else:
                norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
            optimizer.update(model, grads)
            return loss, norm

        d = self.config.ema_decay

        @mx.compile
        def ema_update(ema, params):
            return tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)

        return step, ema_update

    def train_step(self) -> tuple[float, float]:
        """One optimisation step; returns (loss, gradient norm before clipping)."""
        if self._compiled is None:
            self._compiled = self._build_step()
        step, ema_update = self._compiled
        loss, norm = step(*self.batch_fn(self.step))
        self.ema = ema_update(self.ema, self.model.trainable_parameters())
        mx.eval(loss, norm, self.model.state, self.optimizer.state, self.ema)
        self.step += 1
        return loss.item(), norm.item()

    def averaged_parameters(self):
        """The bias-corrected EMA: the average of θ_1 .. θ_t with weights (1 - d) d^(t-k) / (1 - d^t)."""
        c = self.config.ema_decay ** self.step
        if self.step == 0:
            return self.ema
        return tree_map(lambda e, e0: (e - c * e0) / (1 - c), self.ema, self.ema_start)

    # -- checkpoints --

    def save(self) -> Path:
        out = self.folder / f"step_{self.step:06d}"
        if not self.is_main:
            return out
        out = self.folder / f"step_{self.step:06d}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_tree(tmp / "model.safetensors", self.model.parameters())
        save_tree(tmp / "ema.safetensors", self.ema)
        save_tree(tmp / "optimizer.safetensors", self.optimizer.state)
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "config": asdict(self.config)}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)  # a checkpoint folder is complete or absent
        for old in checkpoint_folders(self.folder)[: -self.config.keep_checkpoints]:
            shutil.rmtree(old)
        return out

    def resume(self, checkpoint: str | Path | None = None) -> bool:
        """Load a checkpoint folder (default: the latest under `folder`); False if there is none."""
        if checkpoint is None:
            found = checkpoint_folders(self.folder)
            if not found:
                return False
            checkpoint = found[-1]
        checkpoint = Path(checkpoint)
        if self._compiled is not None:
            raise RuntimeError("resume before the first step: the compiled step holds the state it started with")
        state = json.loads((checkpoint / "state.json").read_text())
        self.model.update(load_tree(checkpoint / "model.safetensors"))
        self.ema = tree_map(lambda p: p, self.ema_start)  # new dicts: ema_start stays θ_0
        load_into(self.ema, checkpoint / "ema.safetensors")
        load_into(self.optimizer.state, checkpoint / "optimizer.safetensors")
        mx.eval(self.model.parameters(), self.ema, self.optimizer.state)
        self.step = state["step"]
        self._truncate_log()
        return True

    # -- the loop --

    @property
    def log_path(self) -> Path:
        return self.folder / f"{self.name}_loss.tsv"

    def _truncate_log(self):
        if self.log_path.is_file():
            lines = self.log_path.read_text().splitlines(keepends=True)
            keep = [ln for ln in lines if ln.startswith("step") or int(ln.split("\t")[0]) <= self.step]
            self.log_path.write_text("".join(keep))

    def train(self, until: int | None = None) -> float:
        """Run to step `until` (default: config.steps), checkpointing on the way and at the end.
        Returns the mean loss of the last logging window."""
        until = self.config.steps if until is None else until
        self.folder.mkdir(parents=True, exist_ok=True)
        new_log = not self.log_path.is_file()
        log = self.log_path.open("a") if self.is_main else open(os.devnull, "w")
        if new_log:
            log.write("step\tloss\tlr\tgrad_norm\tseconds\n")
        window, t_window, t_start, start_step = [], time.perf_counter(), time.perf_counter(), self.step
        tty = sys.stderr.isatty()
        while self.step < until:
            lr = self.optimizer.learning_rate.item()
            loss, norm = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"{self.name}: loss is {loss} at step {self.step}")
            window.append(loss)
            log.write(f"{self.step}\t{loss:.6f}\t{lr:.3e}\t{norm:.4f}\t{time.perf_counter() - t_start:.1f}\n")
            if self.step % self.config.log_every == 0 or self.step == until:
                log.flush()
                now = time.perf_counter()
                per_step = (now - t_window) / len(window)
                eta = per_step * (until - self.step)
                line = (f"{self.name} {self.step:6d}/{until} |{_bar(self.step / until)}| loss {sum(window) / len(window):.4f} "
                        f"lr {lr:.2e} {per_step:.2f} s/step eta {eta / 60:.1f} min")
                if self.is_main:
                    print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
                last_window, window, t_window = window, [], now
            if self.step % self.config.checkpoint_every == 0 or self.step == until:
                self.save()
        log.close()
        if tty:
            print(file=sys.stderr)
        done = self.step - start_step
        if done and self.is_main:
            print(f"{self.name}: {done} steps in {(time.perf_counter() - t_start) / 60:.1f} min", file=sys.stderr)
        return sum(last_window) / len(last_window) if done else float("nan")


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(fraction * width))
    return "#" * filled + "." * (width - filled)
