"""Reference fixtures for the FLUX.2 klein pipeline: diffusers' Flux2KleinPipeline end to end on a
tiny random-weight repo, in fp32 and bf16.

Writes under out/flux2_pipeline/:
  repo/                 a folder laid out like black-forest-labs/FLUX.2-klein-4B: model_index.json
                        (is_distilled true), scheduler/, transformer/, vae/, text_encoder/
                        (Qwen3ForCausalLM, 28 layers so that hidden_states[27] is a layer output),
                        tokenizer/ (the small Qwen BPE of tests/reference/qwen3.py)
  io.safetensors        the noise (B, H/16, W/16, 16 channels-last) and, per setting, the final
                        latents (un-normalised, unpatchified z, as output_type="latent" returns
                        them) and the images' uint8 values (stored as floats): `distilled` (4 steps, one pass) and `base`
                        (is_distilled false: CFG 4.0 against "", 3 steps); `*_bf16` the same
                        pipeline cast to bf16
"""

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from ._common import randomize, save, seeded
from .qwen3 import write_small_tokenizer

PROMPTS = ["a red cat", "two cats on the moon, 8k"]
WIDTH, HEIGHT = 48, 32  # 3 x 2 packed tokens
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            max_position_embeddings=1024, tie_word_embeddings=True)
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=3 * 16, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                   rope_theta=2000, guidance_embeds=False)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
           norm_num_groups=4, batch_norm_eps=1e-4, patch_size=(2, 2))
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
SETTINGS = {"distilled": dict(is_distilled=True, steps=4, guidance=1.0),
            "base": dict(is_distilled=False, steps=3, guidance=4.0)}


def build(folder: Path) -> Flux2KleinPipeline:
    write_small_tokenizer(folder / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TEXT))
    vae = AutoencoderKLFlux2(**VAE)
    g = seeded(401)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(16, generator=g) * 0.5)
        vae.bn.running_var.copy_(torch.rand(16, generator=g) * 2 + 0.05)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=randomize(vae, 402), text_encoder=randomize(text, 403),
        tokenizer=tokenizer, transformer=randomize(Flux2Transformer2DModel(**TRANSFORMER), 404), is_distilled=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


def run(pipe, noise, setting: dict, dtype) -> tuple[torch.Tensor, np.ndarray]:
    pipe.register_to_config(is_distilled=setting["is_distilled"])
    kw = dict(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=setting["steps"],
              guidance_scale=setting["guidance"], latents=noise.to(dtype), max_sequence_length=512)
    with torch.no_grad():
        latents = pipe(**kw, output_type="latent").images
        images = pipe(**kw, output_type="pil").images
    return latents, np.stack([np.asarray(im) for im in images])


def make(out: Path) -> None:
    folder = out / "flux2_pipeline"
    pipe = build(folder / "repo")
    g = seeded(405)
    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 16, WIDTH // 16, generator=g)
    io = {"noise": noise.permute(0, 2, 3, 1)}
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        pipe.to(dtype)
        for name, setting in SETTINGS.items():
            latents, images = run(pipe, noise, setting, dtype)
            io[f"{name}.latents{suffix}"] = latents.permute(0, 2, 3, 1)
            # as floats, so that the reproduce check allows a level's difference between CPUs' kernels
            io[f"{name}.pixels{suffix}"] = torch.from_numpy(images.astype(np.float32))
    save(folder / "io.safetensors", io)
