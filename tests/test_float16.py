"""float16 is refused, with the reason, for the models that overflow it: FLUX's MM-DiT and T5 v1.1.

The references do not run them in float16 either without patches: diffusers clips the Flux blocks'
residual stream to +-65504 (an overflow becomes a wrong value), transformers keeps T5's `wo` in
float32 and clamps every block. bfloat16 has float32's range and is what Apple GPUs and CUDA run."""

import mlx.core as mx
import pytest

from conftest import fixture_path
from tiny_imagegen.checkpoints.convert import load_component, save_converted
from tiny_imagegen.checkpoints.flux import load_flux_transformer
from tiny_imagegen.checkpoints.text_encoders import load_clip_text_model, load_t5_encoder
from tiny_imagegen.checkpoints.vae import load_vae
from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig


def test_loading_the_transformer_or_t5_in_float16_is_refused():
    with pytest.raises(ValueError, match="MMDiT cannot run in float16: its residual stream overflows"):
        load_flux_transformer(fixture_path("flux_transformer", "dev_tiny", "diffusers"), dtype=mx.float16)
    with pytest.raises(ValueError, match="T5Encoder cannot run in float16: T5 v1.1's feed-forward"):
        load_t5_encoder(fixture_path("text_encoders", "flux", "text_encoder_2"), dtype=mx.float16)
    # CLIP and the VAE have no such problem
    assert load_clip_text_model(fixture_path("text_encoders", "flux", "text_encoder"), dtype=mx.float16)
    assert load_vae(fixture_path("vae", "flux_small", "diffusers"), dtype=mx.float16)


def test_converting_or_reloading_in_float16_is_refused(tmp_path):
    cfg = MMDiTConfig(num_heads=1, head_dim=8, depth_double=1, depth_single=1, in_channels=4, context_dim=4,
                      vec_dim=4, axes_dim=(2, 2, 4))
    with pytest.raises(ValueError, match="cannot run in float16"):
        save_converted(tmp_path / "fp16", {"transformer": MMDiT(cfg)}, dtype="float16")
    save_converted(tmp_path / "bf16", {"transformer": MMDiT(cfg)}, dtype="bfloat16")
    assert load_component(tmp_path / "bf16", "transformer").dtype == mx.bfloat16
    with pytest.raises(ValueError, match="cannot run in float16"):
        load_component(tmp_path / "bf16", "transformer", dtype=mx.float16)

