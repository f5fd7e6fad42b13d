"""MM-DiT parity against diffusers' FluxTransformer2DModel (fixtures from tests/reference/flux_transformer.py)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture, recording_outputs, relative_l2
from tiny_imagegen.checkpoints.flux import BFL, DIFFUSERS, load_flux_transformer
from tiny_imagegen.checkpoints.mapping import load_checkpoint
from tiny_imagegen.checkpoints.safetensors_io import read_checkpoint
from tiny_imagegen.layers.embeddings import pack_latents, timestep_embedding, unpack_latents
from tiny_imagegen.layers.rope import axial_rope
from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig

# Full models at the fixture sizes: fp32 sums over up to 512 channels through up to 4 blocks, and
# the timestep embedding's few 6e-5 differences (test_timestep_embedding) pass through time_in.
MODEL_ATOL = 2e-5


def run(model, io):
    return model(io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"], io.get("guidance"))


@pytest.mark.parametrize("name", ["schnell_tiny", "dev_tiny", "dual_stream_tiny", "single_stream_tiny"])
def test_transformer_matches_diffusers(name):
    folder = fixture_path("flux_transformer", name)
    model = load_flux_transformer(folder / "diffusers")
    io = load_fixture("flux_transformer", name, "io.safetensors")
    assert model.config.composition == {"dual_stream_tiny": "dual-stream", "single_stream_tiny": "single-stream"}.get(
        name, "hybrid"
    )
    assert_close(f"mmdit {name} (diffusers layout)", run(model, io), io["out"], atol=MODEL_ATOL)


def test_both_layouts_give_the_same_model():
    folder = fixture_path("flux_transformer", "dev_tiny")
    io = load_fixture("flux_transformer", "dev_tiny", "io.safetensors")
    config = load_flux_transformer(folder / "diffusers").config
    bfl = load_flux_transformer(folder / "bfl.safetensors", config=config)
    assert_close("mmdit dev_tiny (original layout)", run(bfl, io), io["out"], atol=MODEL_ATOL)
    # and the config read off the original file's shapes is the same one
    assert load_flux_transformer(folder / "bfl.safetensors").config.hidden_size == config.hidden_size


def test_guidance_model_without_guidance_is_a_clear_error():
    folder = fixture_path("flux_transformer", "dev_tiny")
    io = load_fixture("flux_transformer", "dev_tiny", "io.safetensors")
    model = load_flux_transformer(folder / "diffusers")
    with pytest.raises(ValueError, match="guidance"):
        model(io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"])


def test_timestep_embedding():
    u = load_fixture("flux_transformer", "units.safetensors")
    # 2 of torch's 128 float32 frequencies are 1 ulp off the correctly rounded ones we use;
    # times arguments up to 1000 that is <= 6e-5 (all other entries agree to ~1e-7)
    assert_close("timestep embedding", timestep_embedding(u["timestep.t"]), u["timestep.emb"], atol=6e-5)


def test_rope_tables():
    u = load_fixture("flux_transformer", "units.safetensors")
    cos, sin = axial_rope(np.array(u["rope.ids"]), (16, 56, 56))  # (L, 64)
    # diffusers stores each value twice (interleaved pairs): cos[..., 2j] == cos[..., 2j+1]
    assert_close("rope cos", mx.repeat(cos, 2, axis=-1), u["rope.cos"], atol=1e-7)
    assert_close("rope sin", mx.repeat(sin, 2, axis=-1), u["rope.sin"], atol=1e-7)


def test_latent_packing():
    u = load_fixture("flux_transformer", "units.safetensors")
    nhwc = u["pack.latents"].transpose(0, 2, 3, 1)
    tokens = pack_latents(nhwc)
    assert_close("pack latents", tokens, u["pack.tokens"], atol=0)
    assert mx.array_equal(unpack_latents(tokens, 6, 10), nhwc)


def _dev_blocks():
    folder = fixture_path("flux_transformer", "dev_tiny")
    return load_flux_transformer(folder / "diffusers"), load_fixture("flux_transformer", "units.safetensors")


def test_double_block():
    model, u = _dev_blocks()
    rope = model.pe_embedder(np.array(u["block.ids"]))
    img, txt = model.double_blocks[0](u["block.img"], u["block.txt"], u["block.temb"], rope)
    assert_close("double block img", img, u["double.img"], atol=1e-5)
    assert_close("double block txt", txt, u["double.txt"], atol=1e-5)


def test_single_block():
    model, u = _dev_blocks()
    rope = model.pe_embedder(np.array(u["block.ids"]))
    n_txt = u["block.txt"].shape[1]
    x = model.single_blocks[0](mx.concatenate([u["block.txt"], u["block.img"]], axis=1), u["block.temb"], rope)
    assert_close("single block img", x[:, n_txt:], u["single.img"], atol=1e-5)
    assert_close("single block txt", x[:, :n_txt], u["single.txt"], atol=1e-5)


def test_chunk_order_matters():
    """The parity test would see a wrong (shift, scale, gate) order: swapping the final layer's
    halves (the one place the layouts disagree) changes the output well beyond tolerance."""
    folder = fixture_path("flux_transformer", "dev_tiny")
    io = load_fixture("flux_transformer", "dev_tiny", "io.safetensors")
    source = read_checkpoint(folder / "bfl.safetensors")
    w = source["final_layer.adaLN_modulation.1.weight"]
    source["final_layer.adaLN_modulation.1.weight"] = mx.concatenate(mx.split(w, 2)[::-1])
    model = load_flux_transformer(folder / "diffusers")
    load_checkpoint(model, BFL, source)
    err = float(mx.max(mx.abs(run(model, io) - io["out"])))
    assert err > 100 * MODEL_ATOL


def test_published_configs_and_config_checks():
    from tiny_imagegen import registry

    dev, schnell = (registry.find(n).configs["transformer"] for n in ("flux1-dev", "flux1-schnell"))
    assert dev.guidance_embed and not schnell.guidance_embed and schnell.hidden_size == 3072
    with pytest.raises(ValueError, match="sum to head_dim"):
        MMDiTConfig(head_dim=64)
    assert DIFFUSERS.name != BFL.name


def test_wrong_input_shapes_are_named():
    model = MMDiT(MMDiTConfig(num_heads=1, head_dim=8, depth_double=1, depth_single=0, in_channels=4,
                              context_dim=4, vec_dim=4, axes_dim=(2, 2, 4)))
    with pytest.raises(ValueError, match=r"packed latents"):
        model(mx.zeros((1, 4, 5)), np.zeros((4, 3)), mx.zeros((1, 2, 4)), np.zeros((2, 3)), mx.ones(1), mx.zeros((1, 4)))


# ---- bfloat16: ours against torch's own bf16 run of the same weights and inputs ----------------

# ours / torch's relative L2 to fp32, measured over the four models and every block: 0.99 to 1.20
# (schnell_tiny's output); a lost float32 island shows alone in test_bf16_islands.py
BF16_FACTOR = 1.35

@pytest.mark.parametrize("name", ["schnell_tiny", "dev_tiny", "dual_stream_tiny", "single_stream_tiny"])
def test_bf16_model_stays_bf16_and_is_as_accurate_as_torch(name):
    """A model loaded in bf16, fed bf16 inputs, returns bf16, and so does every block (a hidden
    float32 upcast would show as a float32 block); each block's output and the model's are no
    further from the fp32 reference than torch's bf16 run is (relative L2, within BF16_FACTOR)."""
    model = load_flux_transformer(fixture_path("flux_transformer", name, "diffusers"), dtype=mx.bfloat16)
    io = load_fixture("flux_transformer", name, "io.safetensors")
    bf = {k: v.astype(mx.bfloat16) if k in ("img", "txt", "y", "timesteps", "guidance") else v for k, v in io.items()}
    blocks = {f"double.{i}": (model.double_blocks, i) for i in range(len(model.double_blocks))}
    blocks.update({f"single.{i}": (model.single_blocks, i) for i in range(len(model.single_blocks))})
    with recording_outputs(blocks) as seen:
        out = run(model, bf)
    for block, result in seen.items():
        parts = {f"{block}.img": result[0], f"{block}.txt": result[1]} if block.startswith("double") else {block: result}
        for key, ours in parts.items():
            assert_bf16_parity(f"mmdit {name} {key}", ours, io[key], io[f"bf16.{key}"], BF16_FACTOR)
    assert len(seen) == len(blocks)
    assert_bf16_parity(f"mmdit {name} output", out, io["out"], io["bf16.out"], BF16_FACTOR)


def test_bf16_output_with_float32_inputs():
    """The pipeline hands float32 latents and text states: the model computes in its own dtype."""
    model = load_flux_transformer(fixture_path("flux_transformer", "dev_tiny", "diffusers"), dtype=mx.bfloat16)
    io = load_fixture("flux_transformer", "dev_tiny", "io.safetensors")
    assert run(model, io).dtype == mx.bfloat16


def test_bf16_timestep_from_float32_t():
    """diffusers' bf16 model rounds t * 1000 in bf16 before the sinusoid (312.5 -> 312), which
    moves its output far more than everything else in bf16 together; ours embeds float32 t
    (the fixtures' bf16.* runs are given float32 t too, see tests/reference/flux_transformer.py)."""
    model = load_flux_transformer(fixture_path("flux_transformer", "dev_tiny", "diffusers"), dtype=mx.bfloat16)
    io = load_fixture("flux_transformer", "dev_tiny", "io.safetensors")
    ours = relative_l2(run(model, io), io["out"])
    rounded = relative_l2(io["bf16_t_rounded.out"], io["out"])
    print(f"[bf16] dev_tiny: ours {ours:.3e}, diffusers bf16 with t * 1000 rounded in bf16 {rounded:.3e}")
    assert ours < rounded / 10


def test_precomputed_rope_table_gives_the_same_output():
    """model.rope_table(img_ids, txt_ids), built once per generation and passed as rope=."""
    model = load_flux_transformer(fixture_path("flux_transformer", "dev_tiny", "diffusers"))
    io = load_fixture("flux_transformer", "dev_tiny", "io.safetensors")
    table = model.rope_table(np.array(io["img_ids"]), np.array(io["txt_ids"]))
    once = model(io["img"], None, io["txt"], None, io["timesteps"], io["y"], io["guidance"], rope=table)
    assert_close("mmdit dev_tiny with a precomputed RoPE table", once, run(model, io), atol=0)


def test_benchmark_linear_shapes_are_the_models():
    """benchmarks/transformer_step.py --linears times the step's products from a list of shapes:
    the list must be the token-wise Linears of the model it benchmarks (the modulation Linears act
    on one vector per image and are left out), and with the attention products give step_flops."""
    import sys
    from collections import Counter
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import transformer_step as bench

    model = MMDiT(MMDiTConfig(guidance_embed=True, depth_double=bench.DOUBLE, depth_single=bench.SINGLE))  # lazy: no memory
    n_img, n_txt = 256, 128
    rows = {"img": n_img, "txt": n_txt, "single": n_img + n_txt, "txt_in": n_txt}
    expected = Counter()
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) or path.endswith(".lin"):  # the modulation: img_mod.lin, modulation.lin
            continue
        if path.startswith("double_blocks."):
            stream = path.split(".")[2].split("_")[0]
        elif path.startswith("single_blocks."):
            stream = "single"
        elif path == "txt_in":
            stream = "txt_in"
        else:
            continue  # img_in, final layer and the conditioning MLPs: < 0.1% of the step
        n, k = module.weight.shape
        expected[(rows[stream], k, n)] += 1
    listed = Counter()
    for M, k, n, count in bench.linear_shapes(n_img, n_txt):
        listed[(M, k, n)] += count
    assert listed == expected
    L = n_img + n_txt
    attention = (bench.DOUBLE + bench.SINGLE) * 2 * 2 * L * L * 3072
    linear = sum(2 * M * k * n * c for M, k, n, c in bench.linear_shapes(n_img, n_txt))
    assert abs(linear + attention - bench.step_flops(n_img, n_txt)) / bench.step_flops(n_img, n_txt) < 2e-3
