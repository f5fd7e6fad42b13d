"""Training machinery and the shipped tiny-shapes model.

- the flow-matching path and its velocity;
- one optimisation step lowers the loss on a fixed batch;
- a run interrupted at a checkpoint and resumed ends bit-identical to an uninterrupted one
  (parameters, EMA, optimizer state, loss log);
- the shipped weights load (size/SHA-256 checked) and draw what a simple prompt asks for, judged
  by the scene parser (colour and shape of the object found), not by a pixel snapshot.
"""

import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tiny_imagegen.checkpoints.convert import ConvertedModelError
from tiny_imagegen.layers.rope import AxialRoPE
from tiny_imagegen.models.mmdit import MMDiTConfig
from tiny_imagegen.models.t5 import T5Config
from tiny_imagegen.train import tiny_shapes as ts
from tiny_imagegen.train.objectives import interpolate, sample_t, velocity_target
from tiny_imagegen.train.scene_parser import parse_image
from tiny_imagegen.train.trainer import Trainer, TrainConfig

WEIGHTS = Path(__file__).parents[1] / "weights" / "tiny-shapes"


def test_flow_matching_path():
    x0, noise = mx.random.normal((3, 4, 5), key=mx.random.key(0)), mx.random.normal((3, 4, 5), key=mx.random.key(1))
    assert np.array_equal(np.array(interpolate(x0, noise, mx.zeros(3))), np.array(x0))
    assert np.array_equal(np.array(interpolate(x0, noise, mx.ones(3))), np.array(noise))
    t, dt = mx.array([0.2, 0.5, 0.7]), 1e-2  # x_t is linear in t with slope ε - x0
    slope = (interpolate(x0, noise, t + dt) - interpolate(x0, noise, t)) / dt
    assert np.allclose(np.array(slope), np.array(velocity_target(x0, noise)), atol=1e-3)
    t = np.array(sample_t(mx.random.key(0), 10_000, "logit_normal"))
    assert 0 < t.min() and t.max() < 1 and abs(np.median(t) - 0.5) < 0.02  # sigmoid(N(0, 1)): median 1/2
    with pytest.raises(ValueError, match="unknown t distribution"):
        sample_t(mx.random.key(0), 4, "beta")


def small_denoiser(seed: int = 0) -> ts.TinyDenoiser:
    """The TinyDenoiser classes at a test size: T5 width 32, MM-DiT width 32, 1 double + 1 single."""
    mx.random.seed(seed)
    t5 = T5Config(vocab_size=20, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16)
    mm = MMDiTConfig(in_channels=16, num_heads=1, head_dim=32, depth_double=1, depth_single=1, mlp_ratio=2.0,
                     context_dim=32, vec_dim=32, rope="mixed")
    return ts.init_for_training(ts.TinyDenoiser.from_configs(t5, mm, latent_size=8))  # 16 image tokens


def batch(step: int, B: int = 4):
    """Random but a pure function of the step, as train_tiny.py's batches are."""
    k = mx.random.split(mx.random.key(100 + step), 4)
    x0 = mx.random.normal((B, 16, 16), key=k[0])
    ids = mx.random.randint(3, 20, (B, ts.MAX_LENGTH), key=k[1])
    mask = (mx.arange(ts.MAX_LENGTH)[None] < mx.array([5, 9, 16, 3])[:, None]).astype(mx.int32)
    return x0, ids, mask, mx.random.normal(x0.shape, key=k[2]), sample_t(k[3], B)


def test_one_step_lowers_the_loss(tmp_path):
    model, fixed = small_denoiser(), batch(0)
    trainer = Trainer(model, ts.denoiser_loss, lambda step: fixed, TrainConfig(steps=1, learning_rate=1e-2,
                      warmup_steps=1), tmp_path, "test")
    before = ts.denoiser_loss(model, *fixed).item()
    loss, _ = trainer.train_step()
    after = ts.denoiser_loss(model, *fixed).item()
    assert loss == pytest.approx(before, rel=1e-6)
    assert after < before - 1e-3, (before, after)


def state_of(trainer: Trainer) -> dict[str, np.ndarray]:
    trees = {"model": trainer.model.parameters(), "ema": trainer.ema, "opt": trainer.optimizer.state}
    return {f"{k}.{name}": np.array(v) for k, tree in trees.items() for name, v in tree_flatten(tree)}


def with_empty_subtree(model: nn.Module) -> nn.Module:
    """A module without parameters (the ablations' axial RoPE) sits in the gradients as an empty
    dict, which a flat checkpoint file cannot bring back: resume must keep it."""
    model.transformer.positions = AxialRoPE((8, 12, 12), 10_000)  # nested, as in the ablation models
    return model


@pytest.mark.parametrize("build", [small_denoiser, lambda: with_empty_subtree(small_denoiser())], ids=["plain", "empty-subtree"])
def test_resume_is_bit_identical(tmp_path, build):
    cfg = TrainConfig(steps=4, learning_rate=3e-3, warmup_steps=2, ema_decay=0.9, checkpoint_every=2, log_every=2)
    straight = Trainer(build(), ts.denoiser_loss, batch, cfg, tmp_path / "a", "test")
    straight.train()

    first = Trainer(build(), ts.denoiser_loss, batch, cfg, tmp_path / "b", "test")
    first.train(until=2)
    del first  # "interrupted"; a new process would start from the same fresh model
    resumed = Trainer(build(), ts.denoiser_loss, batch, cfg, tmp_path / "b", "test")
    assert resumed.resume() and resumed.step == 2
    resumed.train()

    a, b = state_of(straight), state_of(resumed)
    assert a.keys() == b.keys() and len(a) > 20
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    losses = lambda t: [ln.split("\t")[:2] for ln in t.log_path.read_text().splitlines()]  # noqa: E731
    assert losses(straight) == losses(resumed)


def test_averaged_parameters_remove_the_initial_weights(tmp_path):
    """The bias-corrected EMA is the (1 - d) d^(t-k) / (1 - d^t)-weighted average of θ_1 .. θ_t."""
    d, steps = 0.9, 3
    trainer = Trainer(small_denoiser(), ts.denoiser_loss, batch, TrainConfig(steps=steps, ema_decay=d), tmp_path, "test")
    thetas = []
    for _ in range(steps):
        trainer.train_step()
        thetas.append(dict(tree_flatten(trainer.model.trainable_parameters())))
    averaged = dict(tree_flatten(trainer.averaged_parameters()))
    weights = [(1 - d) * d ** (steps - k) / (1 - d**steps) for k in range(1, steps + 1)]
    for name, value in averaged.items():
        expected = sum(w * np.array(theta[name]) for w, theta in zip(weights, thetas))
        assert np.allclose(np.array(value), expected, atol=1e-5), name


@pytest.fixture(scope="module")
def shipped():
    if not (WEIGHTS / "model.json").is_file():
        pytest.fail(f"the shipped weights are missing: {WEIGHTS} (see examples/train_tiny.py)")
    return ts.load_pipeline(WEIGHTS)


def test_shipped_weights_draw_the_prompt(shipped):
    """'a red circle' (the README's first example; one object), seeds 0-3, sampled by the generic
    pipeline as the CLI samples it, judged by the parser: every image holds a red circle and
    nothing that is not red (the shipped model: 49 of seeds 0-49 exactly one red circle)."""
    images = ts.generate_images(shipped, ["a red circle"] * 4, seeds=list(range(4)))
    found = [[(f.colour, f.shape) for f in parse_image(image)] for image in images]
    assert all(("red", "circle") in objects and {c for c, _ in objects} == {"red"} for objects in found), found


def test_pipeline_seeds_are_per_image(shipped):
    """A list of seeds gives image i its own noise: the same image alone or in a batch."""
    batch = ts.generate_images(shipped, ["a red circle", "a blue square above a yellow circle"], seeds=[5, 9], steps=4)
    alone = ts.generate_images(shipped, ["a blue square above a yellow circle"], seeds=[9], steps=4)
    assert np.abs(batch[1].astype(int) - alone[0]).max() <= 1  # batched matmuls may round differently
    with pytest.raises(ValueError, match="3 seeds for 2 prompts"):
        shipped.generate(["a", "b"], seed=[1, 2, 3])


def test_shipped_weights_detect_truncation(tmp_path):
    folder = tmp_path / "tiny-shapes"
    shutil.copytree(WEIGHTS, folder)
    data = (folder / "transformer.safetensors").read_bytes()
    (folder / "transformer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertedModelError, match="transformer.safetensors is .* bytes.*truncated"):
        ts.load_pipeline(folder)
    (folder / "transformer.safetensors").write_bytes(data[:-4] + b"\0\0\0\0")  # same size, altered
    with pytest.raises(ConvertedModelError, match="transformer.safetensors does not match its sha256"):
        ts.load_pipeline(folder)
