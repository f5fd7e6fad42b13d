"""What 8- and 4-bit quantization costs, bounded tightly enough that a broken quantizer fails.

A seeded model with FLUX.1-dev's proportions, narrowed: 6 heads x 64 (FLUX: 24 x 128), text
width 4/3 of the hidden width (T5's 4096 against 3072), MLP ratio 4, guidance input, 2 double +
4 single blocks, so the adaLN modulation is 27.1% of the parameters as in FLUX (27%). Weights are
Gaussian with std 1/sqrt(fan in), biases 0.1: random weights, whose groups of 64 hold no outliers
and no structure, so the figures describe the quantizer on this model, not a trained FLUX.

Every figure goes through the real path (save_converted, then load_component), as relative L2
of the output against the same model in fp32. The bounds are the measured values (printed)
times 1.5: run-to-run the error moves by far less (the weights and inputs are seeded; only the
summation order of the kernels can change), while a quantizer off by one group or with zeroed
scales is off by 100% (also tested).
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import relative_l2
from tiny_imagegen.checkpoints.convert import load_component, read_manifest, save_converted
from tiny_imagegen.layers.positions import flux_image_ids, flux_text_ids
from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig

CONFIG = MMDiTConfig(guidance_embed=True, num_heads=6, head_dim=64, axes_dim=(8, 28, 28), context_dim=512, vec_dim=96,
                depth_double=2, depth_single=4)
MODULATION = (".img_mod.lin.", ".txt_mod.lin.", ".modulation.lin.")
# measured relative L2 against fp32 on this model (x 1.5 = the bound)
MEASURED = {"8-bit": 8.0e-3, "4-bit": 1.30e-1, "4-bit, adaLN 8-bit": 9.9e-2}
MARGIN = 1.5
MODES = {"8-bit": (8, None), "4-bit": (4, None), "4-bit, adaLN 8-bit": (4, 8)}


def seeded_model() -> MMDiT:
    model = MMDiT(CONFIG)
    weights = []
    for i, (k, v) in enumerate(sorted(tree_flatten(model.parameters()))):
        noise = mx.random.normal(v.shape, key=mx.random.key(i))
        if k.endswith(".weight") and v.ndim == 2:
            weights.append((k, noise / np.sqrt(v.shape[1])))
        elif k.endswith(".bias"):
            weights.append((k, 0.1 * noise))
        else:  # norm scales, RoPE: as built
            weights.append((k, v))
    return model.load_weights(weights)


def inputs() -> dict:
    rng = np.random.default_rng(0)
    h, w, n_txt = 4, 6, 16

    def normal(*shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32))

    return dict(img=normal(1, h * w, 64), img_ids=flux_image_ids(h, w), txt=normal(1, n_txt, 512),
                txt_ids=flux_text_ids(n_txt), timesteps=mx.array([0.7]), y=normal(1, 96), guidance=mx.array([3.5]))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fp32 output, and a converted folder per mode."""
    folder = tmp_path_factory.mktemp("quantized")
    paths = {mode: save_converted(folder / mode.replace(" ", "").replace(",", "-"), {"transformer": seeded_model()},
                                  bits=bits, modulation_bits=mod_bits, dtype="float32")
             for mode, (bits, mod_bits) in MODES.items()}
    return seeded_model()(**inputs()), paths


def test_the_model_has_flux_proportions():
    params = dict(tree_flatten(seeded_model().parameters()))
    n = sum(v.size for v in params.values())
    share = sum(v.size for k, v in params.items() if any(m in k for m in MODULATION)) / n
    assert abs(share - 0.271) < 0.002, share  # FLUX.1: 3.2 G of 11.9 G parameters


@pytest.mark.parametrize("mode", list(MODES))
def test_quantization_error_is_bounded(converted, mode):
    reference, paths = converted
    model = load_component(paths[mode], "transformer")
    err = relative_l2(model(**inputs()), reference)
    bound = MARGIN * MEASURED[mode]
    print(f"[quantization] {mode}, group 64: relative L2 vs fp32 {err:.3e} (bound {bound:.2e})")
    assert err <= bound, f"{mode}: relative L2 {err:.3e} > {bound:.2e}"
    assert err >= MEASURED[mode] / MARGIN, f"{mode}: {err:.3e} is far below the measured {MEASURED[mode]:.1e}: update it"


def test_modulation_at_8_bits_buys_accuracy(converted):
    """The claim in checkpoints/convert.py: 8-bit adaLN removes a quarter of the 4-bit error here."""
    reference, paths = converted
    err = {m: relative_l2(load_component(paths[m], "transformer")(**inputs()), reference)
           for m in ("4-bit", "4-bit, adaLN 8-bit")}
    assert err["4-bit, adaLN 8-bit"] < 0.85 * err["4-bit"], err


def test_modulation_at_8_bits_is_recorded_and_reloads(converted):
    _, paths = converted
    entry = read_manifest(paths["4-bit, adaLN 8-bit"])["components"]["transformer"]
    assert read_manifest(paths["4-bit, adaLN 8-bit"])["quantization"]["modulation_bits"] == 8
    assert sorted(entry["layer_bits"]) == sorted(p for p in entry["quantized_layers"] if p.endswith(
        ("img_mod.lin", "txt_mod.lin", "modulation.lin"))) and set(entry["layer_bits"].values()) == {8}
    model = load_component(paths["4-bit, adaLN 8-bit"], "transformer")
    assert model.double_blocks[0].img_mod.lin.bits == 8 and model.single_blocks[3].modulation.lin.bits == 8
    assert model.double_blocks[0].img_attn.qkv.bits == 4 and model.single_blocks[0].linear1.bits == 4


@pytest.mark.parametrize("bug", ["scales of the next group", "scales zeroed"])
def test_a_broken_quantizer_fails_the_bound(converted, bug):
    """The 8-bit model with each layer's scales and biases taken from the neighbouring group along
    the row (an indexing slip), or with its scales zeroed: both must exceed even the 4-bit bound."""
    reference, paths = converted
    model = load_component(paths["8-bit"], "transformer")
    broken = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith((".scales", ".biases")):
            v = mx.roll(v, 1, axis=-1) if bug == "scales of the next group" else (
                mx.zeros_like(v) if k.endswith(".scales") else v)
        broken.append((k, v))
    model.load_weights(broken)
    err = relative_l2(model(**inputs()), reference)
    print(f"[quantization] broken ({bug}): relative L2 {err:.3e}")
    assert err > MARGIN * MEASURED["4-bit"]
