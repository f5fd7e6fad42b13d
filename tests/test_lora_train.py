"""Training a LoRA: the loss falls, the saved file reloads into our loader and into diffusers, and
two processes (mx.distributed, ring backend over localhost) follow the loss curve of one."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from conftest import assert_close, fixture_path, load_fixture, require_modules, require_reference_stack
from tiny_imagegen.checkpoints.flux import load_flux_transformer
from tiny_imagegen.checkpoints.lora import apply_loras
from tiny_imagegen.train.objectives import flow_matching_loss, interpolate
from tiny_imagegen.train.lora import add_lora, lora_layers, save_lora
from tiny_imagegen.train.trainer import Trainer, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FLUX_TINY = ("flux_pipeline", "dev_like", "transformer")


def run(model, io):
    return model(io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"], io["guidance"])


def trained_lora(tmp_path):
    """A rank-4 LoRA trained for 25 steps on the tiny FLUX transformer, flow matching on one fixed batch."""
    model = load_flux_transformer(fixture_path(*FLUX_TINY))
    io = load_fixture("flux_lora", "io.safetensors")
    mx.random.seed(0)
    paths = add_lora(model, rank=4, alpha=8.0, targets=(r".*",))  # every linear, incl. fused qkv / linear1
    k1, k2, k3 = mx.random.split(mx.random.key(1), 3)
    x0, noise = mx.random.normal(io["img"].shape, key=k1), mx.random.normal(io["img"].shape, key=k2)
    t = mx.random.uniform(shape=(2,), key=k3)

    def loss_fn(m, x0, noise, t):
        v = m(interpolate(x0, noise, t), io["img_ids"], io["txt"], io["txt_ids"], t, io["y"], io["guidance"])
        return flow_matching_loss(v, x0, noise)

    cfg = TrainConfig(steps=25, learning_rate=1e-2, warmup_steps=1, checkpoint_every=1000, log_every=5)
    trainer = Trainer(model, loss_fn, lambda step: (x0, noise, t), cfg, tmp_path / "run", "lora")
    trainer.train()
    losses = [float(line.split("\t")[1]) for line in trainer.log_path.read_text().splitlines()[1:]]
    return model, paths, losses, save_lora(model, tmp_path / "adapter.safetensors")


def test_training_only_the_adapters_and_the_loss_falls(tmp_path):
    base = load_flux_transformer(fixture_path(*FLUX_TINY))
    model, paths, losses, _ = trained_lora(tmp_path)
    print(f"[lora train] {len(paths)} layers, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.8 * losses[0]
    # the base weights did not move: only A and B were trained
    for path, layer in lora_layers(model).items():
        assert mx.array_equal(layer.base.weight, dict(base.named_modules())[path].weight)


def test_saved_adapter_reloads_into_our_loader(tmp_path):
    io = load_fixture("flux_lora", "io.safetensors")
    model, _, _, adapter = trained_lora(tmp_path)
    fresh = load_flux_transformer(fixture_path(*FLUX_TINY))
    records = apply_loras(fresh, [(adapter, 1.0)])
    assert records[0]["format"] == "diffusers" and records[0]["applied"] == "merged"
    assert_close("lora trained: reloaded (merged) vs trained (branch)", run(fresh, io), run(model, io), atol=1e-5)
    assert adapter.stat().st_size < 1_000_000


def test_saved_adapter_loads_into_diffusers(tmp_path):
    require_reference_stack()
    require_modules("peft")
    import torch
    from diffusers import FluxTransformer2DModel

    io = load_fixture("flux_lora", "io.safetensors")
    model, _, _, adapter = trained_lora(tmp_path)
    reference = FluxTransformer2DModel.from_pretrained(fixture_path(*FLUX_TINY)).eval()
    # use_safetensors=True as load_lora_weights passes it: without it this method reads no metadata (alpha)
    reference.load_lora_adapter(str(adapter), prefix="transformer", adapter_name="trained", use_safetensors=True)
    t = {k: torch.from_numpy(np.array(v)) for k, v in io.items()}
    with torch.no_grad():
        out = reference(hidden_states=t["img"], encoder_hidden_states=t["txt"], pooled_projections=t["y"],
                        timestep=t["timesteps"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t["guidance"]).sample
    assert_close("lora trained: ours vs diffusers + peft", run(model, io), out.numpy(), atol=2e-5)


# ---- data parallel ------------------------------------------------------------------------------


def loss_curve(folder: Path) -> np.ndarray:
    lines = (folder / "lora_loss.tsv").read_text().splitlines()[1:]
    return np.array([[float(x) for x in line.split("\t")[1:4]] for line in lines])  # loss, lr, grad norm


def test_two_processes_follow_one(tmp_path):
    launcher = Path(sys.executable).parent / "mlx.launch"
    assert launcher.is_file(), f"mlx.launch not next to {sys.executable}: the mlx wheel should install it"
    args = [str(ROOT / "examples" / "train_lora.py"), "--tiny-random", "--steps", "6", "--batch", "8", "--pool", "32"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, *args, "--out", str(one), "--output", str(one / "a.safetensors")],
                   check=True, env=env, timeout=120, capture_output=True)
    port = str(20000 + os.getpid() % 20000)  # away from other runs' default port
    done = subprocess.run([str(launcher), "--backend", "ring", "-n", "2", "--starting-port", port,
                           "--python", sys.executable, *args, "--out", str(two), "--output", str(two / "a.safetensors")],
                          env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in done.stderr + done.stdout
    a, b = loss_curve(one), loss_curve(two)
    assert a.shape == b.shape == (6, 3)
    assert_close("lora data parallel: 2 processes vs 1, loss curve", b[:, 0], a[:, 0], atol=2e-5)
    assert_close("lora data parallel: 2 processes vs 1, grad norms", b[:, 2], a[:, 2], atol=2e-5)
    assert np.ptp(a[:, 0]) > 1e-3  # the curve moves, so equal curves mean something
    one_file, two_file = mx.load(str(one / "a.safetensors")), mx.load(str(two / "a.safetensors"))
    assert max(float(mx.max(mx.abs(one_file[k] - two_file[k]))) for k in one_file) < 1e-5
