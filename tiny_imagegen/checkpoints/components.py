"""The components a converted folder (checkpoints/convert.py) can hold, listed once: for each, the
classes that rebuild it from its config, the folder it is read from in a diffusers-layout repo,
and which of its layers stay in full precision when it is quantized (checkpoints/quantize.py).
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    """Where a component's classes live ("module:Name", imported only when used, so this file
    works with whatever models exist) and which of its layers stay in full precision."""

    model: str
    config: str
    source_folder: str  # its folder in a diffusers-layout repo
    loader: str  # source_folder -> model, lazily (weights read when first evaluated)
    keep: tuple[str, ...] = ()  # layer paths (fnmatch) never quantized
    quantize: bool = True
    modulation: tuple[str, ...] = ()  # layer paths (fnmatch) of the adaLN modulation, for modulation_bits


_M, _C = "tiny_imagegen.models", "tiny_imagegen.checkpoints"
COMPONENTS = {
    "transformer": Component(
        f"{_M}.mmdit:MMDiT", f"{_M}.mmdit:MMDiTConfig", "transformer", f"{_C}.flux:load_flux_transformer",
        keep=("img_in", "final_layer", "final_layer.*", "time_in.*", "vector_in.*", "guidance_in.*"),
        modulation=("*.img_mod.lin", "*.txt_mod.lin", "*.modulation.lin"),
    ),
    # FLUX.2: as FLUX.1, and the shared modulation (3 Linears, 3.65% of klein 4B, whose output
    # modulates every block) stays in full precision too
    "flux2_transformer": Component(
        f"{_M}.flux2:Flux2Transformer", f"{_M}.flux2:Flux2Config", "transformer", f"{_C}.flux2:load_flux2_transformer",
        keep=("img_in", "final_layer", "final_layer.*", "time_in.*", "guidance_in.*",
              "double_stream_modulation_img.*", "double_stream_modulation_txt.*", "single_stream_modulation.*"),
    ),
    "flux2_vae": Component(
        f"{_M}.vae_flux2:AutoencoderKLFlux2", f"{_M}.vae_flux2:Flux2VAEConfig", "vae", f"{_C}.flux2:load_flux2_vae",
        quantize=False,
    ),
    "t5": Component(f"{_M}.t5:T5Encoder", f"{_M}.t5:T5Config", "text_encoder_2", f"{_C}.text_encoders:load_t5_encoder"),
    "clip": Component(
        f"{_M}.clip:CLIPTextModel", f"{_M}.clip:CLIPTextConfig", "text_encoder", f"{_C}.text_encoders:load_clip_text_model"
    ),
    # Qwen3 (Z-Image, FLUX.2 klein): every Linear of the decoder layers; the token embedding (an
    # nn.Embedding, 10% of Qwen3-4B) and the RMSNorm scales stay as they are
    "qwen3": Component(
        f"{_M}.qwen3:Qwen3Model", f"{_M}.qwen3:Qwen3Config", "text_encoder", f"{_C}.qwen3:load_qwen3"
    ),
    "vae": Component(f"{_M}.vae:AutoencoderKL", f"{_M}.vae:VAEConfig", "vae", f"{_C}.vae:load_vae", quantize=False),
    # Z-Image's transformer: kept in full precision are the patch embedding and the final layer
    # (their errors land on the prediction directly), the timestep MLP (its output modulates every
    # block) and the caption embedder (every text token passes it): 12 M of 6.15 B parameters,
    # 0.2%. The learned pad tokens are no Linears, so never quantized.
    "zimage_transformer": Component(
        f"{_M}.zimage:ZImageTransformer", f"{_M}.zimage:ZImageConfig", "transformer",
        f"{_C}.zimage:load_zimage_transformer",
        keep=("x_embedder", "final_layer.*", "t_embedder.*", "cap_embedder.*"),
    ),
    # ---- Qwen-Image (its text encoder is the "qwen3" component: Qwen2.5-VL's language model) ----
    # The transformer: kept in full precision are the boundary layers (img_in, final_layer), the
    # timestep MLP (it modulates every block) and txt_in (every text token passes it): 0.05% of
    # 20.4 B. `modulation_bits` reaches the blocks' img_mod / txt_mod (21% of the parameters).
    "qwen_image_transformer": Component(
        f"{_M}.qwen_image:QwenImageTransformer", f"{_M}.qwen_image:QwenImageConfig", "transformer",
        f"{_C}.qwen_image:load_qwen_image_transformer",
        keep=("img_in", "txt_in", "time_in.*", "final_layer.*"), modulation=("*.img_mod.lin", "*.txt_mod.lin"),
    ),
    "qwen_vae": Component(
        f"{_M}.vae_qwen:AutoencoderKLQwenImage", f"{_M}.vae_qwen:QwenVAEConfig", "vae", f"{_C}.qwen_image:load_qwen_vae",
        quantize=False,
    ),
    # SD 1.5's U-Net: its Linears (attention, GEGLU, projections, per-resnet time projections) are
    # quantized; its convolutions are no Linears and stay, and so does the timestep MLP.
    "unet": Component(
        f"{_M}.unet:UNet2DConditionModel", f"{_M}.unet:UNetConfig", "unet", f"{_C}.unet:load_unet",
        keep=("time_embedding.*",),
    ),
    # DiT (facebook/DiT-XL-2-*): the patch embedding, the timestep/class embedders and the final
    # layer stay in full precision, as the MM-DiT's boundary layers do (0.9% of DiT-XL/2, biases included)
    "dit": Component(
        f"{_M}.dit:DiT", f"{_M}.dit:DiTConfig", "transformer", f"{_C}.dit:load_dit",
        keep=("x_embedder", "t_embedder.*", "y_embedder", "y_embedder.*", "txt_in", "final_layer.*"),
    ),
    # ---- SD3 / SD3.5 (pipelines/sd3.py) ----
    # the transformer keeps the patch embedding, the final layer and the conditioning embedders in
    # full precision, as FLUX's (0.6 % of SD3.5 Large without the position table, which is no Linear)
    "sd3_transformer": Component(
        f"{_M}.sd3:SD3Transformer", f"{_M}.sd3:SD3Config", "transformer", f"{_C}.sd3:load_sd3_transformer",
        keep=("x_embedder", "final_layer.*", "t_embedder.*", "y_embedder.*"),
        modulation=("*.img_mod.lin", "*.txt_mod.lin", "*.txt_mod_pre_only.lin", "final_layer.modulation.lin"),
    ),
    "clip_l": Component(f"{_M}.clip:CLIPTextModelWithProjection", f"{_M}.clip:CLIPTextConfig", "text_encoder",
                        f"{_C}.text_encoders:load_clip_text_model"),
    "clip_g": Component(f"{_M}.clip:CLIPTextModelWithProjection", f"{_M}.clip:CLIPTextConfig", "text_encoder_2",
                        f"{_C}.text_encoders:load_clip_text_model"),
    "sd3_t5": Component(f"{_M}.t5:T5Encoder", f"{_M}.t5:T5Config", "text_encoder_3", f"{_C}.text_encoders:load_t5_encoder"),
}


def import_ref(ref: str):
    """"module:Name" -> the object."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)
