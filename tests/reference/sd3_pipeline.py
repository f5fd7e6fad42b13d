"""Reference fixtures for Stable Diffusion 3 / 3.5: diffusers' StableDiffusion3Pipeline, tiny.

A whole tiny repo laid out like stabilityai/stable-diffusion-3.5-*: CLIP-L-like and bigG-like
CLIPTextModelWithProjection (quick_gelu / gelu, legacy and first-EOS pooling), their tokenizers
(the small CLIP vocabulary of text_encoders.py; tokenizer_2 pads with "!" as OpenCLIP's does),
T5 (text_encoders.py's tiny encoder, width 64 = joint_attention_dim), an MMDiT-X transformer
(dual attention in blocks 0-1, QK norm), a 16-channel VAE without quant convs (scale 1.5305,
shift 0.0609) and FlowMatchEulerDiscreteScheduler(shift=3.0). Writes under out/sd3_pipeline/:

  repo/                 the folders and model_index.json
  io.safetensors        encode_prompt (2 prompts, CFG, 16 T5 tokens): prompt/negative embeds and
                        pooled; with clip_skip=1; without T5; in bf16. Pipeline runs from given
                        noise (2 prompts, 48x32 pixels = 6x4 latents, 4 steps): CFG 5 (latents,
                        images), CFG + skip-layer guidance (layers [1], 0.01-0.6), no CFG, CFG in
                        bf16 (latents); StableDiffusion3Img2ImgPipeline from given init latents,
                        strength 0.6 of 5 steps (its noise drawn from seed 7 as the pipeline draws it)
  manifest_clip_{l,g}.json   key -> shape of the full-size CLIPTextModelWithProjection checkpoints
"""

import json
import shutil
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ._common import bf16, manifest, randomize, save, save_json, seeded
from .vae import _config as vae_config

TEXT = Path(__file__).resolve().parents[1] / "fixtures" / "text_encoders" / "flux"
PROMPTS = ["a red circle to the left of a blue square", "Ein Café in Tōkyō"]
HEIGHT, WIDTH = 48, 32  # latents 6x4, patches 3x2
STEPS, GUIDANCE, T5_LENGTH = 4, 5.0, 16
SLG = dict(skip_guidance_layers=[1], skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.6)
TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=40, out_channels=16,
                   pos_embed_max_size=12, dual_attention_layers=(0, 1), qk_norm="rms_norm")
# full size, as the SD3.5 repos' text_encoder/ and text_encoder_2/ config.json ([unverified] offline):
# CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers with their projections
FULL_CLIP = {"clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
             "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                              num_attention_heads=20, hidden_act="gelu", projection_dim=1280)}
CLIP_L = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, projection_dim=16,
              hidden_act="quick_gelu", eos_token_id=2)  # the legacy id: pooled at the argmax id
CLIP_G = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, projection_dim=24,
              hidden_act="gelu")  # eos_token_id = the tokenizer's: pooled at the first EOS


def write_tokenizers(repo: Path) -> None:
    """The files as the hub repo has them: vocab.json + merges.txt; tokenizer_2 pads with "!"."""
    shutil.copytree(TEXT / "tokenizer", repo / "tokenizer", dirs_exist_ok=True)
    shutil.copytree(TEXT / "tokenizer", repo / "tokenizer_2", dirs_exist_ok=True)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = repo / "tokenizer_2" / name
        path.write_text(json.dumps({**json.loads(path.read_text()), "pad_token": "!"}, indent=1, sort_keys=True))
    shutil.copytree(TEXT / "tokenizer_2", repo / "tokenizer_3", dirs_exist_ok=True)


def components(repo: Path) -> dict:
    write_tokenizers(repo)
    tok, tok2 = CLIPTokenizer.from_pretrained(repo / "tokenizer"), CLIPTokenizer.from_pretrained(repo / "tokenizer_2")
    assert tok2.pad_token == "!" and tok.pad_token == "<|endoftext|>"
    clip_l = randomize(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), **CLIP_L)), seed=90, std=0.3)
    clip_g = randomize(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                                                  **CLIP_G)), seed=91, std=0.3)
    vae = randomize(AutoencoderKL(**{**vae_config((8, 8, 16, 16), 16, 1, 4, sd_style=False),
                                     "scaling_factor": 1.5305, "shift_factor": 0.0609}), seed=92)
    parts = dict(
        transformer=randomize(SD3Transformer2DModel(**TRANSFORMER), seed=93),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=tok, text_encoder_2=clip_g, tokenizer_2=tok2,
        text_encoder_3=T5EncoderModel.from_pretrained(TEXT / "text_encoder_2").eval(),
        tokenizer_3=T5Tokenizer.from_pretrained(repo / "tokenizer_3"),
    )
    for name, part in parts.items():
        if not name.startswith("tokenizer"):
            part.save_pretrained(repo / name)
    save_json(repo / "model_index.json", {"_class_name": "StableDiffusion3Pipeline", **{
        n: ["diffusers" if n in ("transformer", "scheduler", "vae") else "transformers", type(p).__name__]
        for n, p in parts.items()}})
    return parts


def encode(pipe, prefix: str, io: dict, **kw) -> None:
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                               max_sequence_length=T5_LENGTH, **kw)
    io.update({f"{prefix}.prompt_embeds": pe, f"{prefix}.pooled": pp,
               f"{prefix}.negative_embeds": ne, f"{prefix}.negative_pooled": npool})


def make(out: Path) -> None:
    root = out / "sd3_pipeline"
    parts = components(root / "repo")
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    io = {}
    encode(pipe, "enc", io)
    encode(pipe, "enc_skip1", io, clip_skip=1)
    encode(StableDiffusion3Pipeline(**{**parts, "text_encoder_3": None, "tokenizer_3": None}), "enc_no_t5", io)
    half = {n: bf16(p) if n.startswith("text_encoder") or n == "transformer" else p for n, p in parts.items()}
    encode(StableDiffusion3Pipeline(**half), "enc_bf16", io)

    noise = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=seeded(6))
    io["noise"] = noise
    run = dict(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, max_sequence_length=T5_LENGTH)
    for name, extra in {"cfg": dict(guidance_scale=GUIDANCE), "slg": dict(guidance_scale=GUIDANCE, **SLG),
                        "nocfg": dict(guidance_scale=1.0)}.items():
        with torch.no_grad():
            io[f"{name}.latents"] = pipe(**run, **extra, latents=noise.clone(), output_type="latent").images
            if name != "nocfg":
                io[f"{name}.images"] = pipe(**run, **extra, latents=noise.clone(), output_type="pt").images
    pipe16 = StableDiffusion3Pipeline(**half)
    pipe16.set_progress_bar_config(disable=True)
    with torch.no_grad():
        io["cfg.latents_bf16"] = pipe16(**run, guidance_scale=GUIDANCE, latents=noise.to(torch.bfloat16),
                                        output_type="latent").images

    init = torch.randn(len(PROMPTS), 16, HEIGHT // 8, WIDTH // 8, generator=seeded(8))
    io["img2img.init"] = init
    io["img2img.noise"] = torch.randn(init.shape, generator=seeded(7))  # what the pipeline draws below
    i2i = StableDiffusion3Img2ImgPipeline(**parts)
    i2i.set_progress_bar_config(disable=True)
    with torch.no_grad():  # 16-channel images are taken as latents, not encoded
        io["img2img.latents"] = i2i(prompt=PROMPTS, image=init, strength=0.6, num_inference_steps=5,
                                    guidance_scale=GUIDANCE, max_sequence_length=T5_LENGTH, generator=seeded(7),
                                    output_type="latent").images
    save(root / "io.safetensors", io)
    for name, cfg in FULL_CLIP.items():
        with torch.device("meta"):
            model = CLIPTextModelWithProjection(CLIPTextConfig(**{"projection_dim": 768, **cfg}))
        save_json(root / f"manifest_{name}.json", manifest(model.state_dict()))
