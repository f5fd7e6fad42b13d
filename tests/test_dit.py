"""DiT parity against diffusers' DiTTransformer2DModel (fixtures from tests/reference/dit.py), the
full-size DiT-XL/2 manifests, and the two conditioning designs that have no reference."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture
from tiny_imagegen.checkpoints.dit import DIFFUSERS, load_dit
from tiny_imagegen.checkpoints.mapping import CheckpointError, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.safetensors_io import read_checkpoint
from tiny_imagegen.layers.embeddings import ddpm_timestep_embedding
from tiny_imagegen.layers.positions import sincos_2d, sincos_2d_interpolated
from tiny_imagegen.models.dit import DiT, DiTConfig, initialize_weights, preset

# bf16: ours / torch's relative L2 to the fp32 reference, at most this. Measured 0.97 to 1.11 (the conditioning vector);
# the float32 islands are checked one by one in test_bf16_islands.py
BF16_FACTOR = 1.25

# 64 channels through 2 blocks in float32; the timestep sinusoid's two 1-ulp frequencies (see
# test_timestep_embedding) pass through the timestep MLP into every modulation.
MODEL_ATOL = 2e-5


def _tiny(dtype=None):
    return load_dit(fixture_path("dit", "tiny", "diffusers"), dtype=dtype)


def _io():
    io = load_fixture("dit", "tiny", "io.safetensors")
    nhwc = {k: v.transpose(0, 2, 3, 1) for k, v in io.items() if v.ndim == 4}  # torch NCHW -> ours NHWC
    return {**io, **nhwc}


def _blocks(model, io, dtype):
    """The model's forward, unrolled: conditioning, each block's output, the output."""
    tokens, c, ctx = model.embed(io["latents"].astype(dtype), io["timesteps"], io["labels"])
    outs = []
    for block in model.blocks:
        tokens = block(tokens, c, ctx)
        outs.append(tokens)
    return c, outs, model.head(tokens, c, 8, 8)


def test_dit_matches_diffusers_fp32():
    model, io = _tiny(), _io()
    assert model.config == DiTConfig(sample_size=8, num_heads=4, head_dim=16, depth=2, num_classes=10)
    c, blocks, out = _blocks(model, io, mx.float32)
    assert_close("dit conditioning c", c, io["cond"], atol=1e-5)
    for i, b in enumerate(blocks):
        assert_close(f"dit block {i}", b, io[f"block{i}"], atol=MODEL_ATOL)
    assert_close("dit tiny (fp32)", out, io["out"], atol=MODEL_ATOL)
    assert_close("dit tiny, __call__", model(io["latents"], io["timesteps"], io["labels"]), io["out"], atol=MODEL_ATOL)


def test_dit_matches_diffusers_bf16():
    model, io = _tiny(mx.bfloat16), _io()
    c, blocks, out = _blocks(model, io, mx.bfloat16)
    assert_bf16_parity("dit conditioning c", c, io["cond"], io["cond_bf16"], BF16_FACTOR)
    for i, b in enumerate(blocks):  # every block computes and returns bf16: no hidden float32 upcast
        assert_bf16_parity(f"dit block {i}", b, io[f"block{i}"], io[f"block{i}_bf16"], BF16_FACTOR)
    assert_bf16_parity("dit tiny", out, io["out"], io["out_bf16"], BF16_FACTOR)
    # float32 latents into a bf16 model: cast at the entry, the answer is bf16 all the same
    assert model(io["latents"], io["timesteps"], io["labels"]).dtype == mx.bfloat16


def test_timestep_embedding():
    u = load_fixture("dit", "units.safetensors")
    # 2 of torch's 128 float32 frequencies are 1 ulp off the correctly rounded ones we use; times
    # timesteps up to 999 that is <= 6e-5 (everything else agrees to ~1e-7)
    assert_close("dit timestep sinusoid (shift 1)", ddpm_timestep_embedding(u["timestep.t"]), u["timestep.emb"], atol=6e-5)


@pytest.mark.parametrize("name,grid", [("square", (64, 4, 4, 4, 1.0)), ("wide", (64, 3, 5, 4, 1.0)),
                                       ("512_on_256", (48, 32, 32, 16, 1.0)), ("scaled", (32, 6, 6, 4, 2.0))])
def test_position_tables(name, grid):
    u = load_fixture("dit", "units.safetensors")
    assert_close(f"dit sin-cos table {name}", sincos_2d_interpolated(*grid), u[f"pos.{name}"], atol=1e-7)
    if name == "square":  # on the trained grid it is layers/positions.sincos_2d
        assert mx.array_equal(sincos_2d(*grid[:3]), u["pos.square"])


@pytest.mark.parametrize("name", ["dit-xl-2-256", "dit-xl-2-512"])
def test_full_size_manifest_maps_completely(name):
    manifest = json.loads(fixture_path("dit", f"manifest_{name}.json").read_text())
    ours = parameter_shapes(DiT(preset(name)))  # lazy: nothing allocated
    mapped = map_checkpoint(DIFFUSERS, ours, shape_placeholders(manifest))  # raises on any gap
    assert set(mapped) == set(ours) and all(tuple(mapped[k].shape) == ours[k] for k in ours)
    n, n_theirs = sum(v.size for v in mapped.values()), sum(int(np.prod(s)) for s in manifest.values())
    print(f"{name}: {len(manifest)} tensors ({n_theirs:,} values, 28 embedder copies) -> {len(ours)} parameters, {n:,}")
    assert n == 674_834_720  # the paper's 675 M; diffusers' file repeats the embedders in every block
    assert n_theirs - n == 27 * (256 * 1152 + 1152 + 1152 * 1152 + 1152 + 1001 * 1152)


def test_differing_embedder_copies_are_refused(tmp_path):
    folder = fixture_path("dit", "tiny", "diffusers")
    tensors = read_checkpoint(folder)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    tensors[key] = tensors[key] + 1
    mx.save_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), tensors)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_2\.bias differs"):
        load_dit(tmp_path)


def test_missing_key_is_named(tmp_path):
    folder = fixture_path("dit", "tiny", "diffusers")
    tensors = read_checkpoint(folder)
    del tensors["transformer_blocks.1.attn1.to_v.weight"]
    mx.save_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), tensors)
    with pytest.raises(CheckpointError, match=r"missing.*\n.*transformer_blocks\.1\.attn1\.to_v\.weight"):
        load_dit(tmp_path, config=_tiny().config)


def test_chunk_order_matters():
    """The parity test sees a wrong (shift, scale, gate) order: swapping shift and scale of the
    attention branch in block 0 moves the output far beyond the tolerance."""
    model, io = _tiny(), _io()
    w, b = model.blocks[0].modulation.lin.weight, model.blocks[0].modulation.lin.bias
    swap = lambda a: mx.concatenate([a[64:128], a[:64], a[128:]])  # noqa: E731
    model.blocks[0].modulation.lin.weight, model.blocks[0].modulation.lin.bias = swap(w), swap(b)
    err = float(mx.max(mx.abs(model(io["latents"], io["timesteps"], io["labels"]) - io["out"])))
    assert err > 100 * MODEL_ATOL


# ---- the conditioning designs (no reference implementation exists for in-context / cross-attention) ----

VARIANTS = {
    "adaln-zero class": dict(num_classes=10),
    "adaln-zero text": dict(num_classes=None, text_dim=12),
    "in-context class": dict(num_classes=10, conditioning="in-context"),
    "in-context text": dict(num_classes=None, text_dim=12, context_dim=10, conditioning="in-context"),
    "cross-attention class": dict(num_classes=10, conditioning="cross-attention"),
    "cross-attention text": dict(num_classes=None, text_dim=12, context_dim=10, conditioning="cross-attention"),
}


def _variant(name):
    cfg = DiTConfig(sample_size=8, num_heads=2, head_dim=16, depth=2, out_channels=None, **VARIANTS[name])
    key = mx.random.key(3)
    y = mx.array([1, 4]) if cfg.num_classes else mx.random.normal((2, 12), key=key)
    ctx = mx.random.normal((2, 5, 10), key=key) if cfg.context_dim else None
    x = mx.random.normal((2, 8, 6, 4), key=mx.random.key(4))  # non-square: 4 x 3 patches
    return DiT(cfg), x, mx.array([999, 10]), y, ctx


@pytest.mark.parametrize("name", VARIANTS)
def test_fresh_blocks_are_identities(name):
    model, x, t, y, ctx = _variant(name)
    tokens, c, cross = model.embed(x, t, y, ctx)
    for i, block in enumerate(model.blocks):
        assert mx.array_equal(block(tokens, c, cross), tokens), f"{name}: fresh block {i} is not the identity"
    out = model(x, t, y, ctx)
    assert out.shape == (2, 8, 6, 4) and not mx.any(out).item()  # the zeroed final layer
    initialize_weights(model)  # the original initialisation keeps the zeros that make the identity
    tokens, c, cross = model.embed(x, t, y, ctx)
    assert mx.array_equal(model.blocks[1](tokens, c, cross), tokens)
    assert mx.any(model.x_embedder.weight).item() and mx.any(model.t_embedder.in_layer.weight).item()


@pytest.mark.parametrize("name", VARIANTS)
def test_conditioning_changes_the_output(name):
    model, x, t, y, ctx = _variant(name)
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(5), len(params))
    model.update(tree_unflatten([(k, 0.2 * mx.random.normal(v.shape, key=kk)) for (k, v), kk in zip(params, keys)]))
    base = model(x, t, y, ctx)
    other_y = mx.array([2, 4]) if model.config.num_classes else y + 1.0
    changed = {"t": model(x, mx.array([500, 10]), y, ctx), "y": model(x, t, other_y, ctx)}
    if ctx is not None:
        changed["text tokens"] = model(x, t, y, ctx + 1.0)
    for what, out in changed.items():
        diff = mx.abs(out - base).max(axis=(1, 2, 3))
        print(f"{name}: changing {what} moves the output by {np.array(diff)}")
        assert diff[0].item() > 1e-3, f"{name}: the output ignores {what}"
        if what == "y":  # only the first sample's label/vector changed (batch elements stay separate)
            assert diff[1].item() == 0.0 if model.config.num_classes else diff[1].item() > 1e-3


# ---- configs and inputs ---------------------------------------------------------------------------


def test_presets_and_config():
    assert preset("dit-xl-2-512").sample_size == 64 and preset("dit-xl-2-256").hidden_size == 1152
    assert preset("dit-xl-2-256").learned_sigma
    with pytest.raises(ValueError, match="unknown DiT preset"):
        preset("dit-b-2")
    with pytest.raises(ValueError, match="set one"):
        DiTConfig(num_classes=None)
    with pytest.raises(ValueError, match="in-context"):
        DiTConfig(context_dim=8)
    with pytest.raises(ValueError, match="norm_type"):
        DiTConfig.from_diffusers({"norm_type": "ada_norm"})
    # the hub config (Transformer2DModel era, facebook/DiT-XL-2-256/transformer/config.json)
    hub = {"_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
           "attention_head_dim": 72, "dropout": 0.0, "in_channels": 4, "norm_elementwise_affine": False,
           "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
           "num_layers": 28, "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False}
    assert DiTConfig.from_diffusers(hub) == preset("dit-xl-2-256")


def test_bad_inputs_are_named():
    model = DiT(DiTConfig(sample_size=8, num_heads=2, head_dim=8, depth=1, num_classes=10))
    x, t = mx.zeros((2, 8, 8, 4)), mx.array([1, 2])
    with pytest.raises(ValueError, match=r"latents \(B, h, w, 4\)"):
        model(mx.zeros((2, 4, 8, 8, 1)), t, mx.array([1, 2]))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(mx.zeros((2, 7, 8, 4)), t, mx.array([1, 2]))
    with pytest.raises(ValueError, match="integer labels"):
        model(x, t, mx.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="timesteps must be"):
        model(x, mx.array([1]), mx.array([1, 2]))
    with pytest.raises(ValueError, match="context"):
        model(x, t, mx.array([1, 2]), mx.zeros((2, 3, 4)))


def test_sd_vae_ft_ema_config_is_the_sd_preset():
    """DiT's VAE, stabilityai/sd-vae-ft-ema (vae/config.json of facebook/DiT-XL-2-*), reads as our `sd` preset."""
    from tiny_imagegen.models.vae import VAE_PRESETS, VAEConfig

    published = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
                 "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
                 "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert VAEConfig.from_dict(published) == VAE_PRESETS["sd"]


@pytest.mark.parametrize("conditioning", ["adaln-zero", "in-context", "cross-attention"])
def test_text_conditioned_dit_trains(conditioning):
    """From the original initialisation, gradients reach every block's weights within three steps
    (the zeroed final layer, then gates / branch outputs, open first) and Adam lowers a fixed
    batch's eps loss."""
    import mlx.optimizers as optim

    cfg = DiTConfig(sample_size=8, num_heads=2, head_dim=16, depth=2, out_channels=None, num_classes=None,
                    text_dim=12, context_dim=None if conditioning == "adaln-zero" else 10, conditioning=conditioning)
    model = initialize_weights(DiT(cfg))
    keys = mx.random.split(mx.random.key(7), 4)
    x, eps, y = (mx.random.normal(s, key=k) for s, k in (((4, 8, 8, 4), keys[0]), ((4, 8, 8, 4), keys[1]), ((4, 12), keys[2])))
    ctx = mx.random.normal((4, 5, 10), key=keys[3]) if cfg.context_dim else None
    t = mx.array([10, 300, 600, 900])

    def loss(m):
        return mx.mean((m(x, t, y, ctx) - eps) ** 2)

    step = nn.value_and_grad(model, loss)
    opt = optim.Adam(learning_rate=3e-3)
    first = None
    for i in range(15):
        value, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        first = value.item() if first is None else first
        if i == 2:  # step 0 moves the final layer, step 1 the gates: then every block gets gradients
            assert all(mx.any(g != 0).item() for k, g in tree_flatten(grads) if k.startswith("blocks.")
                       and k.endswith("weight") and "norm" not in k), f"{conditioning}: a block gets no gradient"
    print(f"{conditioning}: eps loss {first:.3f} -> {value.item():.3f} in 15 Adam steps")
    assert value.item() < 0.9 * first
