"""Qwen3 (models/qwen3.py, checkpoints/qwen3.py) against transformers' Qwen3Model with the same
weights and inputs (fixtures: tests/reference/qwen3.py).

Every hidden_states entry of a 28-layer tiny model on a right-padded batch of 2, in float32 and
bfloat16; a 3-layer Qwen3ForCausalLM checkpoint (model. prefix, lm_head) whose config names no
RoPE theta; RoPE at Qwen3's head_dim 128 and theta 1e6 over 512 positions; the prompt embeddings
of diffusers' Z-Image and FLUX.2 klein pipelines through our tokenizer and model; the full-size
Qwen3-4B / Qwen3-8B key manifests; quantization by the policy of checkpoints/convert.py.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import assert_bf16_parity, assert_close, fixture_path, load_fixture, require_reference_stack
from tiny_imagegen.checkpoints.convert import load_component, read_manifest, save_converted, stored_tensors
from tiny_imagegen.checkpoints.quantize import quantize_component
from tiny_imagegen.checkpoints.mapping import CheckpointError, map_checkpoint, parameter_shapes, shape_placeholders
from tiny_imagegen.checkpoints.qwen3 import QWEN3_CAUSAL_LM, QWEN3_MODEL, load_qwen3, qwen3_table
from tiny_imagegen.models.qwen3 import QWEN3_4B, QWEN3_8B, Qwen3Config, Qwen3Model, rope_inverse_frequencies
from tiny_imagegen.text import QwenTokenizer

# bf16: ours / torch's relative L2 to the fp32 reference, at most this. Measured 0.99 to 1.11;
# the float32 islands are checked one by one in test_bf16_islands.py
BF16_FACTOR = 1.25

DEEP_LAYERS = 28


def folder(name: str):
    return fixture_path("qwen3", name, "text_encoder")


def tolerance(ref) -> float:
    return 2e-5 * max(1.0, float(mx.abs(ref).max()))


# ---- config -----------------------------------------------------------------------------------------


def test_config_from_transformers_json():
    deep = Qwen3Config.from_config_json(folder("deep") / "config.json")
    assert (deep.hidden_size, deep.num_hidden_layers, deep.num_attention_heads, deep.num_key_value_heads) == (16, 28, 4, 2)
    assert (deep.head_dim, deep.rope_theta, deep.rms_norm_eps) == (8, 1e6, 1e-6)
    shallow_json = json.loads((folder("shallow") / "config.json").read_text())
    assert not {"rope_theta", "rope_parameters", "rope_scaling"} & set(shallow_json)
    shallow = Qwen3Config.from_config(shallow_json)
    assert (shallow.rope_theta, shallow.num_key_value_heads, shallow.rms_norm_eps) == (10_000.0, 1, 1e-5)
    # the legacy spelling, and the model types / features we do not run
    assert Qwen3Config.from_config({"rope_theta": 5e5}).rope_theta == 5e5
    for bad, match in [({"model_type": "llama"}, "model_type"), ({"hidden_act": "gelu"}, "hidden_act"),
                       ({"use_sliding_window": True}, "use_sliding_window"), ({"attention_bias": True}, "attention_bias"),
                       ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "yarn"),
                       ({"num_attention_heads": 6, "num_key_value_heads": 4}, "multiple")]:
        with pytest.raises(ValueError, match=match):
            Qwen3Config.from_config(bad)


# ---- parity -----------------------------------------------------------------------------------------


def test_every_hidden_state_fp32():
    io = load_fixture("qwen3", "deep", "io.safetensors")
    model = load_qwen3(folder("deep"), mx.float32)
    ours = model.hidden_states(io["input_ids"], io["attention_mask"], indices=range(DEEP_LAYERS + 1))
    ref = io["hidden_states"]  # (N + 1, B, L, D), pad rows included
    assert len(ours) == ref.shape[0] == DEEP_LAYERS + 1
    errors = [float(mx.abs(o - r).max()) for o, r in zip(ours, ref)]
    print("per entry:", " ".join(f"{i}:{e:.1e}" for i, e in enumerate(errors)))
    for i in (0, 1, 9, 18, 27, 28):
        assert_close(f"Qwen3 fp32 hidden_states[{i}]", ours[i], ref[i], atol=tolerance(ref[i]))
    assert_close("Qwen3 fp32 hidden_states[all 29 entries]", mx.stack(ours), ref, atol=tolerance(ref))
    # causal only, without a mask: row 1's pad rows now attend to themselves
    nomask = model.hidden_states(io["input_ids"][1:], None, indices=range(DEEP_LAYERS + 1))
    assert_close("Qwen3 fp32 hidden_states, no mask", mx.stack(nomask), io["hidden_states_nomask"],
                 atol=tolerance(io["hidden_states_nomask"]))
    assert float(mx.abs(mx.stack(nomask)[:, 0] - ref[:, 1]).max()) > 1e-3  # the mask matters for pad rows


def test_every_hidden_state_bf16():
    io = load_fixture("qwen3", "deep", "io.safetensors")
    model = load_qwen3(folder("deep"), mx.bfloat16)
    ours = model.hidden_states(io["input_ids"], io["attention_mask"], indices=range(DEEP_LAYERS + 1))
    assert all(h.dtype == mx.bfloat16 for h in ours), [h.dtype for h in ours]
    for i in (0, 1, 9, 18, 27, 28):
        assert_bf16_parity(f"Qwen3 bf16 hidden_states[{i}]", ours[i], io["hidden_states"][i], io["hidden_states_bf16"][i],
                           BF16_FACTOR)
    assert_bf16_parity("Qwen3 bf16 hidden_states[all]", mx.stack(ours), io["hidden_states"], io["hidden_states_bf16"],
                       BF16_FACTOR)


def test_causal_lm_checkpoint_without_rope_theta():
    io = load_fixture("qwen3", "shallow", "io.safetensors")
    model = load_qwen3(folder("shallow"), mx.float32)  # model.* keys; lm_head.weight left unused
    assert model.config.rope_theta == 10_000.0
    ours = mx.stack(model.hidden_states(io["input_ids"], io["attention_mask"], indices=range(4)))
    assert_close("Qwen3ForCausalLM fp32 hidden_states (3 layers)", ours, io["hidden_states"], atol=tolerance(io["hidden_states"]))
    assert_close("Qwen3 __call__ = last hidden state", model(io["input_ids"], io["attention_mask"]), io["hidden_states"][-1],
                 atol=tolerance(io["hidden_states"]))


def test_rope_at_full_head_dim_over_512_positions():
    io = load_fixture("qwen3", "rope", "io.safetensors")
    ours = rope_inverse_frequencies(128, 1e6)
    torch_inv = np.array(io["inv_freq_128_1e6"])
    ulps = np.abs(ours.view(np.int32) - torch_inv.view(np.int32))
    print(f"inv_freq (128, 1e6): {int((ulps > 0).sum())} of 64 entries differ from torch's, by at most {int(ulps.max())} ulp")
    assert ulps.max() <= 1 and (ulps > 0).sum() <= 2
    model = load_qwen3(folder("rope"), mx.float32)
    out = mx.stack(model.hidden_states(io["input_ids"], None, indices=(0, 1)))
    assert_close("Qwen3 fp32, head_dim 128, theta 1e6, 512 positions", out, io["hidden_states"], atol=tolerance(io["hidden_states"]))


def test_pipeline_prompt_embeddings_equal_diffusers():
    """Z-Image: hidden_states[-2] of each prompt, pads dropped; FLUX.2 klein: hidden_states 9, 18,
    27 concatenated per token, pads kept. diffusers ran transformers' tokenizer and model."""
    ref = load_fixture("qwen3", "conditioning.safetensors")
    setup = json.loads(fixture_path("qwen3", "conditioning.json").read_text())
    tokenizer = QwenTokenizer.from_folder(fixture_path("qwen3", "tokenizer_small"))
    model = load_qwen3(folder("deep"), mx.float32)
    ids, mask = tokenizer(setup["prompts"], max_length=setup["max_sequence_length"], enable_thinking=True)
    (penultimate,) = model.hidden_states(ids, mask, indices=(-2,))
    for i in range(len(setup["prompts"])):
        ours = penultimate[i, : int(mask[i].sum())]
        assert_close(f"Z-Image prompt embeds [{i}]", ours, ref[f"zimage_{i}"], atol=tolerance(ref[f"zimage_{i}"]))
    ids, mask = tokenizer(setup["prompts"], max_length=setup["max_sequence_length"], enable_thinking=False)
    flux2 = mx.concatenate(model.hidden_states(ids, mask, indices=setup["flux2_layers"]), axis=-1)
    assert flux2.shape == (3, 32, 3 * 16)
    assert_close("FLUX.2 klein prompt embeds (9|18|27)", flux2, ref["flux2"], atol=tolerance(ref["flux2"]))


def test_only_the_layers_needed_are_built_and_read():
    io = load_fixture("qwen3", "deep", "io.safetensors")
    full = load_qwen3(folder("deep"), mx.float32)
    cut = load_qwen3(folder("deep"), mx.float32, num_layers=27)  # FLUX.2 klein's deepest entry
    assert len(cut.layers) == 27
    a = full.hidden_states(io["input_ids"], io["attention_mask"], indices=(9, 27))
    b = cut.hidden_states(io["input_ids"], io["attention_mask"], indices=(9, -2))
    assert all(mx.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="num_layers=27"):
        cut.hidden_states(io["input_ids"], io["attention_mask"], indices=(-1,))


def test_bad_input_is_named():
    model = Qwen3Model(Qwen3Config(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    ids = mx.zeros((1, 5), dtype=mx.int32)
    with pytest.raises(ValueError, match="batch, length"):
        model(ids[0])
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, mx.ones((1, 4)))
    with pytest.raises(ValueError, match="start with a real token"):
        model(ids, mx.array([[0, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="out of range"):
        model.hidden_states(ids, indices=(3,))
    with pytest.raises(TypeError, match="sequence"):
        model.hidden_states(ids, indices=-2)


# ---- checkpoints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, config", [("4b", QWEN3_4B), ("8b", QWEN3_8B)])
@pytest.mark.parametrize("layout", ["model", "causal_lm"])
def test_full_size_manifest_maps_completely(size, config, layout):
    found = json.loads(fixture_path("qwen3", f"manifest_qwen3_{size}_{layout}.json").read_text())
    source = shape_placeholders(found)
    table = qwen3_table(source)
    assert table is (QWEN3_CAUSAL_LM if layout == "causal_lm" else QWEN3_MODEL)
    expected = parameter_shapes(Qwen3Model(config))
    mapped = map_checkpoint(table, expected, source)  # raises on anything missing, unexpected or mis-shaped
    n = sum(int(np.prod(s)) for s in expected.values())
    print(f"Qwen3-{size.upper()} ({layout}): {len(mapped)} tensors, {n / 1e9:.3f} B parameters without the LM head")
    assert len(mapped) == len(expected) == 2 + 11 * 36
    assert n == {"4b": 4_022_468_096, "8b": 7_568_405_504}[size]


def test_bad_checkpoint_is_named(tmp_path):
    bad = tmp_path / "text_encoder"
    shutil.copytree(folder("shallow"), bad)
    tensors = mx.load(str(bad / "model-00001-of-00001.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = mx.zeros((2,))
    mx.save_safetensors(str(bad / "model-00001-of-00001.safetensors"), tensors)
    (bad / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"(?s)model.layers.1.mlp.up_proj.weight.*model.layers.1.mlp.extra.weight"):
        load_qwen3(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_qwen3(tmp_path)


# ---- quantization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_by_the_policy(tmp_path, bits):
    io = load_fixture("qwen3", "shallow", "io.safetensors")
    model = load_qwen3(folder("shallow"), mx.float32)
    layers = quantize_component("qwen3", model, bits, group_size=32)
    assert len(layers) == 7 * 3 and "layers.2.mlp.down_proj" in layers and "layers.0.self_attn.q_proj" in layers
    assert not [p for p in layers if "embed" in p or "norm" in p]
    out = model.hidden_states(io["input_ids"], io["attention_mask"], indices=(-2, -1))
    ref = io["hidden_states"]
    err = max(float(mx.abs(o - r).max()) for o, r in zip(out, (ref[-2], ref[-1])))
    print(f"[quantization] Qwen3 shallow {bits}-bit, group 32: max abs error vs fp32 {err:.3e} (max |h| {float(mx.abs(ref).max()):.2f})")
    assert 0 < err < {8: 0.05, 4: 0.5}[bits] * float(mx.abs(ref).max())

    saved = save_converted(tmp_path / "q", {"qwen3": load_qwen3(folder("shallow"), mx.float32)}, bits=bits, group_size=32)
    again = load_component(saved, "qwen3").hidden_states(io["input_ids"], io["attention_mask"], indices=(-2, -1))
    assert all(mx.array_equal(a, b) for a, b in zip(again, out))
    assert read_manifest(saved)["components"]["qwen3"]["quantized_layers"] == layers


def test_memory_of_qwen3_4b():
    """What Qwen3-4B's weights take, bf16 and quantized by the policy (shapes only: nothing is
    computed); the README quotes these numbers."""
    model = Qwen3Model(QWEN3_4B)
    sizes = {}
    for bits in (None, 8, 4):
        tensors, layers = stored_tensors("qwen3", model, bits, 64, mx.bfloat16)
        sizes[bits] = sum(v.nbytes for v in tensors.values())
    print("Qwen3-4B weights: " + ", ".join(f"{k or 'bf16'}: {v / 2**30:.2f} GiB" for k, v in sizes.items()))
    assert sizes[None] == 2 * 4_022_468_096
    assert sizes[None] > sizes[8] > sizes[4]


def test_prompt_encoders_equal_diffusers(tmp_path):
    """qwen_conditioning.QwenPromptEncoder on a repo-shaped folder, as the two pipelines use it."""
    from tiny_imagegen.conditioning.qwen import QwenPromptEncoder

    shutil.copytree(folder("deep"), tmp_path / "text_encoder")
    shutil.copytree(fixture_path("qwen3", "tokenizer_small"), tmp_path / "tokenizer")
    ref = load_fixture("qwen3", "conditioning.safetensors")
    setup = json.loads(fixture_path("qwen3", "conditioning.json").read_text())
    length = setup["max_sequence_length"]

    zimage = QwenPromptEncoder.zimage(tmp_path, dtype=mx.float32, max_length=length)
    assert len(zimage.model.layers) == DEEP_LAYERS - 1  # hidden_states[-2]: the last layer is never read
    embeds, mask = zimage(setup["prompts"])
    assert embeds.shape[1] == mask.shape[1] == int(mask.sum(1).max()) < length  # padded to the longest prompt only
    for i in range(len(setup["prompts"])):
        ours = embeds[i, : int(mask[i].sum())]
        assert_close(f"QwenPromptEncoder.zimage [{i}] vs diffusers", ours, ref[f"zimage_{i}"], atol=tolerance(ref[f"zimage_{i}"]))

    assert zimage.tokens_cut("a red cat") == 0
    long = " ".join(["cat"] * 40)  # the template's 5 tokens + 40 + 4 > 32
    templated = lambda thinking: f"<|im_start|>user\n{long}<|im_end|>\n<|im_start|>assistant\n" + thinking
    assert zimage.tokens_cut(long) == len(zimage.tokenizer.encode(templated(""))) - length > 0

    flux2 = QwenPromptEncoder.flux2_klein(tmp_path, dtype=mx.bfloat16, max_length=length)
    assert flux2.tokens_cut(long) == len(flux2.tokenizer.encode(templated("<think>\n\n</think>\n\n"))) - length
    assert len(flux2.model.layers) == 27
    embeds, mask = flux2(setup["prompts"])
    assert embeds.shape == (3, length, 3 * 16) and embeds.dtype == mx.bfloat16
    err = float(mx.abs(embeds.astype(mx.float32) - ref["flux2"]).max())
    print(f"QwenPromptEncoder.flux2_klein in bf16 vs diffusers fp32: max abs error {err:.2e}")
    assert err < 0.1 * float(mx.abs(ref["flux2"]).max())


def test_silu_rounds_once_as_torch():
    """layers.activations.silu in bf16 is bitwise torch's F.silu (fp32 inside, one rounding)."""
    require_reference_stack()
    import torch

    from tiny_imagegen.layers.activations import silu

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).mul(4).to(torch.bfloat16)
    ours = np.array(silu(mx.array(x.float().numpy()).astype(mx.bfloat16)).astype(mx.float32))
    theirs = torch.nn.functional.silu(x).float().numpy()
    composed = np.array(nn.silu(mx.array(x.float().numpy()).astype(mx.bfloat16)).astype(mx.float32))
    print(f"silu bf16: ours equal to torch on {np.mean(ours == theirs):.1%}, MLX's nn.silu on {np.mean(composed == theirs):.1%}")
    assert np.array_equal(ours, theirs)
