"""The published configs of each registered model's components: the architectures' numbers, as
their repos' config.json files (or, where those are gated or unreachable offline, the reference
classes' defaults) give them. The registry (catalog.py) calls these only when a model's configs are
asked for (sizes, manifests, `models`), so reading the registry imports no model module.
"""

from dataclasses import replace


def flux1(guidance_embed: bool) -> dict:
    # Black Forest Labs, FLUX.1 [schnell] / [dev]: MM-DiT of 19 double + 38 single blocks, hidden
    # 3072 = 24 heads x 128 (11.89 B / 11.90 B parameters); T5-v1.1-XXL encoder; CLIP ViT-L/14 text;
    # the 16-channel FLUX VAE. Numbers from the repos' config.json files (transformer/, vae/, ...).
    from ..models.clip import CLIP_VIT_L14_TEXT
    from ..models.mmdit import MMDiTConfig
    from ..models.t5 import T5_V1_1_XXL
    from ..models.vae import VAE_PRESETS

    return {"transformer": MMDiTConfig(guidance_embed=guidance_embed), "t5": T5_V1_1_XXL,
            "clip": CLIP_VIT_L14_TEXT, "vae": VAE_PRESETS["flux"]}


def zimage() -> dict:
    # Tongyi-MAI, Z-Image-Turbo: single-stream DiT of 30 + 2 x 2 refiner blocks, dim 3840 = 30 heads
    # x 128 (6.15 B parameters; diffusers' ZImageTransformer2DModel defaults, [unverified] against
    # the repo's transformer/config.json offline); the 16-channel FLUX.1 VAE; Qwen3-4B (36 layers,
    # hidden 2560) as the text encoder, of which Z-Image reads the output of layer 35.
    from ..models.qwen3 import QWEN3_4B
    from ..models.vae import VAE_PRESETS
    from ..models.zimage import PRESETS

    return {"zimage_transformer": PRESETS["z-image-turbo"], "vae": VAE_PRESETS["flux"], "qwen3": QWEN3_4B}


def sd15() -> dict:
    # stable-diffusion-v1-5/stable-diffusion-v1-5: unet/config.json (320/640/1280/1280 channels, 2
    # resnets per level, 8 heads, cross-attention to 768-wide CLIP states; 859.5 M parameters),
    # vae/config.json (4 latent channels, quant convs, scale 0.18215), text_encoder/ (CLIP ViT-L/14).
    from ..models.clip import CLIP_VIT_L14_TEXT
    from ..models.unet import UNET_PRESETS
    from ..models.vae import VAE_PRESETS

    return {"unet": UNET_PRESETS["sd15"], "vae": VAE_PRESETS["sd"], "clip": CLIP_VIT_L14_TEXT}


def flux2(size: str) -> dict:
    # Black Forest Labs, FLUX.2 [klein] 4B / 9B: transformer 5 + 20 blocks, 24 heads (4B) and
    # 8 + 24 blocks, 32 heads (9B), as reported for the releases (unverified offline; the repos'
    # transformer/config.json is what loading reads); text from Qwen3-4B / Qwen3-8B (their hub
    # config.json), of which klein reads hidden states 9, 18 and 27; AutoencoderKLFlux2's
    # defaults (32 latent channels, 128/256/512/512).
    from ..models.flux2 import PRESETS
    from ..models.qwen3 import QWEN3_4B, QWEN3_8B
    from ..models.vae_flux2 import Flux2VAEConfig

    return {"flux2_transformer": PRESETS[f"flux2-klein-{size}"], "flux2_vae": Flux2VAEConfig(),
            "qwen3": {"4b": QWEN3_4B, "9b": QWEN3_8B}[size]}


def dit(sample_size: int) -> dict:
    # facebook/DiT-XL-2-256 / -512 (Peebles & Xie 2023): DiT-XL/2, 28 blocks, hidden 1152 = 16 x 72,
    # 2x2 patches, learned sigma, 1000 classes, 674.8 M parameters (transformer/config.json); the VAE
    # is stabilityai/sd-vae-ft-ema (vae/config.json), our SD preset.
    from ..models.dit import preset
    from ..models.vae import VAE_PRESETS

    return {"dit": preset(f"dit-xl-2-{8 * sample_size}"), "vae": VAE_PRESETS["sd"]}


def qwen_image() -> dict:
    # Qwen/Qwen-Image and Qwen/Qwen-Image-2512 (same architecture): a 60-block dual-stream MM-DiT,
    # 24 heads x 128 (20.43 B parameters; diffusers' QwenImageTransformer2DModel defaults),
    # AutoencoderKLQwenImage's defaults (0.127 B), Qwen2.5-VL-7B's language model (7.07 B read of
    # the 8.29 B file). [unverified] against the repos' config.json offline: loading reads them.
    from ..models.qwen3 import QWEN2_5_VL_7B
    from ..models.qwen_image import QwenImageConfig
    from ..models.vae_qwen import QwenVAEConfig

    return {"qwen_image_transformer": QwenImageConfig(), "qwen_vae": QwenVAEConfig(), "qwen3": QWEN2_5_VL_7B}


def sd3(transformer_preset: str) -> dict:
    # stabilityai/stable-diffusion-3.5-*: the transformer (models/sd3.py presets), CLIP-L/14 and
    # OpenCLIP bigG/14 text models with projections (123.7 M, 694.7 M), T5-v1.1-XXL's encoder, the
    # 16-channel SD3 VAE (scale 1.5305, shift 0.0609; what loading reads is the repo's vae/config.json).
    # Counts from diffusers/transformers on the meta device; the gated configs are [unverified] offline.
    from ..models import sd3
    from ..models.clip import CLIPTextConfig
    from ..models.t5 import T5_V1_1_XXL
    from ..models.vae import VAE_PRESETS

    return {"sd3_transformer": getattr(sd3, transformer_preset), "sd3_t5": T5_V1_1_XXL,
            "vae": replace(VAE_PRESETS["flux"], scaling_factor=1.5305, shift_factor=0.0609),
            "clip_l": CLIPTextConfig(projection_dim=768, eos_token_id=2),
            "clip_g": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                     hidden_act="gelu", projection_dim=1280, eos_token_id=2)}
