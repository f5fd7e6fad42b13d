"""Reference fixtures for editing: diffusers' reference-image and inpainting pipelines on the tiny
repos the text-to-image fixtures already hold (tests/fixtures/flux2_pipeline/repo, flux_pipeline/,
text_encoders/flux), run with a seeded torch generator; the draws the generator made are redrawn
here in the same order and stored, so that the MLX side can be given the same noise.

Writes under out/editing/:
  images.safetensors     the input images and masks, uint8 (H, W, C) / (H, W)
  klein_edit.safetensors Flux2KleinPipeline(image=[ref1]) and (image=[ref1, ref2]): noise, final
                         packed latents (B, N, 16) and uint8 pixels (as floats), fp32 and bf16
  klein_inpaint.safetensors  Flux2KleinInpaintPipeline: noise, the token-grid mask, final packed
                         latents, pixels, fp32 and bf16; fp32 with an image_reference too
  flux1_inpaint.safetensors  FluxInpaintPipeline (dev-like transformer): the posterior's ε and the
                         noise (drawn in that order from one generator), final packed latents, pixels
  sd15_inpaint.safetensors  StableDiffusionInpaintPipeline on the tiny 4-channel U-Net of
                         tests/fixtures/sd15_pipeline, DDIM and Euler, CFG 7.5 with a negative prompt: ε, noise,
                         final latents (B, h, w, 4), pixels
  kontext.safetensors    FluxKontextPipeline (dev-like transformer), 64x64 output (max_area 64²), the
                         reference at its own size floored to 16 (_auto_resize=False: 72x80 -> 64x80; the
                         trained resolutions would give 4071 reference tokens, minutes on a CPU): noise,
                         final packed latents, pixels; the PREFERRED_KONTEXT_RESOLUTIONS table
  zimage.safetensors     ZImageImg2ImgPipeline and ZImageInpaintPipeline (the tiny Z-Image of
                         tests/fixtures/zimage, from the prompt): ε, noise, final latents (B, h, w, 16), pixels
"""

from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, Flux2KleinInpaintPipeline, Flux2KleinPipeline,
                       FluxInpaintPipeline, FluxTransformer2DModel)
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ._common import save, seeded
from .sampling import SCHEDULERS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROMPT = "a red cat"


def images() -> dict[str, np.ndarray]:
    """Seeded noise pictures (not square) and masks with a white block and a grey (< 0.5) patch."""
    rng = np.random.default_rng(27)
    out = {
        "ref1": rng.integers(0, 256, (80, 72, 3), dtype=np.uint8),  # w 72, h 80 -> cropped to 64 x 80
        "ref2": rng.integers(0, 256, (70, 100, 3), dtype=np.uint8),  # w 100, h 70 -> 96 x 64
        "flux1_image": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),  # resized to 48 x 32
    }
    mask = np.zeros((80, 72), np.uint8)
    mask[10:50, 20:60], mask[60:70, 5:9] = 255, 100
    out["klein_mask"] = mask
    mask = np.zeros((40, 56), np.uint8)
    mask[8:30, 16:44], mask[32:38, 2:10] = 255, 127
    out["flux1_mask"] = mask
    out["zimage_image"] = rng.integers(0, 256, (36, 52, 3), dtype=np.uint8)  # floored and resized to 48 x 32
    mask = np.zeros((36, 52), np.uint8)
    mask[4:20, 20:50] = 255
    out["zimage_mask"] = mask
    return out


def pil(a: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(a)


def run(pipe, **kw):
    """-> (final packed latents, uint8 pixels as floats), the latents caught after the last step."""
    caught = []

    def catch(_pipe, _i, _t, kwargs):
        caught.append(kwargs["latents"].clone())
        return kwargs

    with torch.no_grad():
        out = pipe(prompt=PROMPT, output_type="np", callback_on_step_end=catch, **kw).images
    return caught[-1], torch.from_numpy(np.round(out * 255).astype(np.float32))


def klein(out: Path, pics: dict) -> None:
    repo = FIXTURES / "flux2_pipeline" / "repo"
    edit = Flux2KleinPipeline.from_pretrained(repo)
    inpaint = Flux2KleinInpaintPipeline.from_pretrained(repo)
    refs = [pil(pics["ref1"]), pil(pics["ref2"])]
    io_edit, io_inpaint = {}, {}
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        edit.to(dtype)
        inpaint.to(dtype)
        for n in (1, 2):
            noise = torch.randn(1, 16, 80 // 16, 64 // 16, generator=seeded(270 + n))  # cast by the pipeline
            latents, pixels = run(edit, image=refs[:n], num_inference_steps=4, latents=noise, max_sequence_length=512)
            io_edit[f"refs{n}.noise"] = noise.permute(0, 2, 3, 1)
            io_edit[f"refs{n}.latents{suffix}"], io_edit[f"refs{n}.pixels{suffix}"] = latents, pixels
        # the inpainting pipeline takes given latents as the start itself: its noise comes from the generator
        seed = 275
        latents, pixels = run(inpaint, image=refs[0], mask_image=pil(pics["klein_mask"]), strength=0.8,
                              num_inference_steps=5, generator=seeded(seed), max_sequence_length=512)
        io_inpaint[f"noise{suffix}"] = torch.randn(1, 16, 80 // 16, 64 // 16, generator=seeded(seed), dtype=dtype).permute(0, 2, 3, 1)
        io_inpaint[f"latents{suffix}"], io_inpaint[f"pixels{suffix}"] = latents, pixels
        if dtype == torch.float32:  # with a second image as `image_reference`, at t = 20 (FKI:1136)
            latents, pixels = run(inpaint, image=refs[0], mask_image=pil(pics["klein_mask"]), image_reference=refs[1],
                                  strength=0.8, num_inference_steps=5, generator=seeded(seed), max_sequence_length=512)
            io_inpaint["with_reference.latents"], io_inpaint["with_reference.pixels"] = latents, pixels
    mask = inpaint.mask_processor.preprocess(pil(pics["klein_mask"]), height=80, width=64)
    io_inpaint["token_mask"] = torch.nn.functional.interpolate(mask, size=(5, 4), mode="bilinear")[0, 0]
    save(out / "klein_edit.safetensors", io_edit)
    save(out / "klein_inpaint.safetensors", io_inpaint)


def flux1_components() -> dict:
    """The tiny dev-like FLUX.1 repo of the pipeline fixtures, as the pipelines' keyword arguments."""
    text = FIXTURES / "text_encoders" / "flux"
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"]),
        vae=AutoencoderKL.from_pretrained(FIXTURES / "flux_pipeline" / "vae").eval(),
        transformer=FluxTransformer2DModel.from_pretrained(FIXTURES / "flux_pipeline" / "dev_like" / "transformer").eval(),
        text_encoder=CLIPTextModel.from_pretrained(text / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(text / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(text / "text_encoder_2").eval(),
        tokenizer_2=T5Tokenizer.from_pretrained(text / "tokenizer_2"),
    )


def flux1(out: Path, pics: dict) -> None:
    pipe = FluxInpaintPipeline(**flux1_components())
    seed = 276
    latents, pixels = run(pipe, image=pil(pics["flux1_image"]), mask_image=pil(pics["flux1_mask"]), height=32, width=48,
                          strength=0.6, num_inference_steps=5, guidance_scale=3.5, generator=seeded(seed),
                          max_sequence_length=512)
    g = seeded(seed)  # FI:476 then FI:677: the posterior's ε, then the noise, from the one generator
    eps = torch.randn(1, 4, 4, 6, generator=g)
    noise = torch.randn(1, 4, 4, 6, generator=g)
    save(out / "flux1_inpaint.safetensors", {"eps": eps.permute(0, 2, 3, 1), "noise": noise.permute(0, 2, 3, 1),
                                             "latents": latents, "pixels": pixels})


def zimage(out: Path, pics: dict) -> None:
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    root = FIXTURES / "zimage" / "pipeline"
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32).eval(),
        text_encoder=Qwen3Model.from_pretrained(root / "text_encoder", dtype=torch.float32).eval(),
        tokenizer=AutoTokenizer.from_pretrained(FIXTURES / "qwen3" / "tokenizer_small"),
        transformer=ZImageTransformer2DModel.from_pretrained(FIXTURES / "zimage" / "tiny" / "diffusers").eval(),
    )
    image, io = pil(pics["zimage_image"]), {}
    runs = {"img2img": (ZImageImg2ImgPipeline, dict(strength=0.6), 277),
            "inpaint": (ZImageInpaintPipeline, dict(strength=0.8, mask_image=pil(pics["zimage_mask"])), 278)}
    for name, (cls, extra, seed) in runs.items():
        latents, pixels = run(cls(**parts), image=image, num_inference_steps=8, guidance_scale=0.0,
                              generator=seeded(seed), **extra)
        g = seeded(seed)  # ZI:327 then ZI:344: the posterior's ε, then the noise
        io[f"{name}.eps"] = torch.randn(1, 16, 4, 6, generator=g).permute(0, 2, 3, 1)
        io[f"{name}.noise"] = torch.randn(1, 16, 4, 6, generator=g).permute(0, 2, 3, 1)
        io[f"{name}.latents"], io[f"{name}.pixels"] = latents.permute(0, 2, 3, 1), pixels
    save(out / "zimage.safetensors", io)


def sd15(out: Path, pics: dict) -> None:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    from .ddpm import SD15

    root, text = FIXTURES / "sd15_pipeline", FIXTURES / "text_encoders" / "flux"
    parts = dict(vae=AutoencoderKL.from_pretrained(root / "vae").eval(),
                 unet=UNet2DConditionModel.from_pretrained(root / "unet").eval(),
                 text_encoder=CLIPTextModel.from_pretrained(text / "text_encoder").eval(),
                 tokenizer=CLIPTokenizer.from_pretrained(text / "tokenizer"),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    io = {}
    for name, cls in (("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)):
        pipe = StableDiffusionInpaintPipeline(scheduler=cls.from_config(SD15), **parts)
        seed = 279
        latents, pixels = run(pipe, image=pil(pics["flux1_image"]), mask_image=pil(pics["flux1_mask"]), height=32,
                              width=48, strength=0.75, num_inference_steps=5, guidance_scale=7.5,
                              negative_prompt="blurry", generator=seeded(seed))
        g = seeded(seed)  # the posterior's ε, then the noise (a third draw, for the unused masked image, follows)
        io[f"{name}.eps"] = torch.randn(1, 4, 4, 6, generator=g).permute(0, 2, 3, 1)
        io[f"{name}.noise"] = torch.randn(1, 4, 4, 6, generator=g).permute(0, 2, 3, 1)
        io[f"{name}.latents"], io[f"{name}.pixels"] = latents.permute(0, 2, 3, 1), pixels
    save(out / "sd15_inpaint.safetensors", io)


def kontext(out: Path, pics: dict) -> None:
    from diffusers import FluxKontextPipeline
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    pipe = FluxKontextPipeline(**flux1_components())
    seed = 280
    latents, pixels = run(pipe, image=pil(pics["ref1"]), height=64, width=64, max_area=64 * 64, num_inference_steps=3,
                          guidance_scale=2.5, generator=seeded(seed), max_sequence_length=512, _auto_resize=False)
    noise = torch.randn(1, 4, 8, 8, generator=seeded(seed))  # the reference is the posterior's mode: no draw
    save(out / "kontext.safetensors", {"noise": noise.permute(0, 2, 3, 1), "latents": latents, "pixels": pixels,
                                       "resolutions": torch.tensor(PREFERRED_KONTEXT_RESOLUTIONS)})


def make(out: Path) -> None:
    folder = out / "editing"
    pics = images()
    save(folder / "images.safetensors", {k: torch.from_numpy(v) for k, v in pics.items()})
    klein(folder, pics)
    flux1(folder, pics)
    zimage(folder, pics)
    sd15(folder, pics)
    kontext(folder, pics)
