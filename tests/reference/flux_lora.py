"""Reference fixtures for LoRA files: one random adapter set written in every format we read, each
loaded by diffusers' own FluxPipeline.load_lora_weights + fuse_lora (needs peft).

Base: the tiny dev-like pipeline of flux_pipeline.py (1 double + 1 single block, hidden 32, CLIP
and T5 from text_encoders.py). Writes under out/flux_lora/:

  diffusers.safetensors   PEFT names (transformer. + text_encoder. CLIP), lora_alpha / r in the
                          `lora_adapter_metadata` header as diffusers saves it; some q/k/v pieces absent
  kohya.safetensors       lora_unet_* on the fused original layers + lora_te1_* CLIP, with .alpha
  comfyui.safetensors     diffusion_model.* dotted names, lora_down/up/alpha, CLIP and a T5 part
  xlabs.safetensors       double_blocks.0.processor.qkv_lora1.down.weight ..., no alpha
  bfl.safetensors         lora_A/lora_B on the original names, every linear, plus QK-norm scales
                          (the layout of BFL's control LoRAs)
  io.safetensors          transformer inputs; per case the transformer output and the final
                          latents of 4 dev-like steps (guidance 3.5) for the prompts of flux_pipeline

diffusers reads kohya and BFL files with converters that hard-code FLUX.1's sizes (19 + 38
blocks, width 3072, the single block's 3072/12288 split); as flux_transformer.py does for the
base weights, we run their own source with those numbers replaced by the tiny model's.
"""

import inspect
import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import lora_conversion_utils, lora_pipeline
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from ._common import save, seeded
from .flux_pipeline import HEIGHT, PROMPTS, TEXT, VARIANTS, WIDTH
from .sampling import SCHEDULERS

REQUIRES = ("peft",)  # diffusers' load_lora_weights runs on PEFT
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RANK, D, MLP = 4, 32, 128  # adapter rank; the tiny model's width and single-block MLP width
DOUBLE = ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
          "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin"]
SINGLE = ["linear1", "linear2", "modulation.lin"]
TOP = ["img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
       "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"]
CLIP_LAYERS = ["self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1"]
# BFL name -> (in, out) of the tiny dev-like transformer (in 16 latent channels, text 64, pooled 64)
SHAPES = {
    **{f"double_blocks.0.{m}": s for m, s in zip(DOUBLE, [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D), (D, 6 * D)] * 2)},
    "single_blocks.0.linear1": (D, 3 * D + MLP), "single_blocks.0.linear2": (D + MLP, D),
    "single_blocks.0.modulation.lin": (D, 3 * D),
    "img_in": (16, D), "txt_in": (64, D), "time_in.in_layer": (256, D), "time_in.out_layer": (D, D),
    "vector_in.in_layer": (64, D), "vector_in.out_layer": (D, D), "guidance_in.in_layer": (256, D),
    "guidance_in.out_layer": (D, D), "final_layer.linear": (D, 16), "final_layer.adaLN_modulation.1": (D, 2 * D),
}
# diffusers' kohya converter names the LoRAs of img_in, txt_in, time_in, vector_in, guidance_in
# and final_layer without the `transformer.` prefix, so FluxPipeline drops them: the kohya file holds
# the blocks' layers only (the test checks those top-level kohya names against the BFL file's).
BLOCKS = {k: v for k, v in SHAPES.items() if k.startswith(("double_blocks", "single_blocks"))}
CASES = {  # name -> [(file, weight)]: each loaded and fused by diffusers
    "diffusers": [("diffusers", 0.7)],
    "kohya": [("kohya", 1.0)],
    "comfyui": [("comfyui", 1.0)],
    "xlabs": [("xlabs", 1.0)],
    "bfl": [("bfl", 1.0)],
    "two": [("diffusers", 0.8), ("kohya", -0.5)],
}


def pair(g, d_in, d_out, std=0.15):
    return torch.randn(RANK, d_in, generator=g) * std, torch.randn(d_out, RANK, generator=g) * std


def peft_modules(model: FluxTransformer2DModel, clip: CLIPTextModel) -> dict[str, tuple[int, int]]:
    """Every Linear of the transformer in diffusers names (less two q/k/v pieces) and a few CLIP ones."""
    out = {f"transformer.{n}": (m.in_features, m.out_features) for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n not in ("transformer_blocks.0.attn.add_k_proj",
                                                           "single_transformer_blocks.0.proj_mlp")}
    for name in CLIP_LAYERS:
        m = clip.get_submodule(f"encoder.layers.0.{name}")  # transformers 5: no text_model level
        out[f"text_encoder.text_model.encoder.layers.0.{name}"] = (m.in_features, m.out_features)
    return out


def write_files(root: Path, model, clip) -> None:
    g = seeded(90)
    sd = {}
    for name, (i, o) in sorted(peft_modules(model, clip).items()):
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = pair(g, i, o)
    meta = {"transformer.r": RANK, "transformer.lora_alpha": 8, "text_encoder.r": RANK, "text_encoder.lora_alpha": 2}
    for part in ("transformer", "text_encoder"):  # as diffusers' save_lora_weights writes them
        meta[f"{part}.target_modules"] = sorted(n.split(".", 1)[1].rsplit(".lora_", 1)[0].removeprefix("text_model.")
                                                for n in sd if n.startswith(part + ".") and ".lora_A." in n)
    save_file(sd, str(root / "diffusers.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)})

    g, sd = seeded(91), {}
    for name, (i, o) in BLOCKS.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = pair(g, i, o)
        sd[f"{key}.alpha"] = torch.tensor(2.0)  # scale 2 / 4
    for name in CLIP_LAYERS:
        key = "lora_te1_text_model_encoder_layers_0_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = pair(g, 64, 128 if "fc1" in name else 64)
        sd[f"{key}.alpha"] = torch.tensor(8.0)
    save(root / "kohya.safetensors", sd)

    g, sd = seeded(92), {}
    for name in BLOCKS:
        key = "diffusion_model." + name
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = pair(g, *SHAPES[name])
        sd[f"{key}.alpha"] = torch.tensor(6.0)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):  # diffusers needs out_proj to tell the layout
        clip_key = f"text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.{proj}"
        sd[f"{clip_key}.lora_down.weight"], sd[f"{clip_key}.lora_up.weight"] = pair(g, 64, 64)
    t5_key = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"  # dropped by diffusers
    sd[f"{t5_key}.lora_down.weight"], sd[f"{t5_key}.lora_up.weight"] = pair(g, 32, 32)
    save(root / "comfyui.safetensors", sd)

    g, sd = seeded(93), {}
    for name, (i, o) in {"double_blocks.0.processor.qkv_lora1": (D, 3 * D), "double_blocks.0.processor.qkv_lora2": (D, 3 * D),
                         "double_blocks.0.processor.proj_lora1": (D, D), "double_blocks.0.processor.proj_lora2": (D, D),
                         "single_blocks.0.processor.qkv_lora": (D, 3 * D),
                         "single_blocks.0.processor.proj_lora": (D + MLP, D)}.items():
        sd[f"{name}.down.weight"], sd[f"{name}.up.weight"] = pair(g, i, o)
    save(root / "xlabs.safetensors", sd)

    g, sd = seeded(94), {}
    for name, (i, o) in SHAPES.items():
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = pair(g, i, o)
    # diffusers' BFL converter swaps the (shift, scale) halves of this layer's lora_A as well as of
    # its lora_B; A's halves are rank components, so that is a no-op only when they are equal
    a = sd["final_layer.adaLN_modulation.1.lora_A.weight"]
    sd["final_layer.adaLN_modulation.1.lora_A.weight"] = torch.cat([a[: RANK // 2], a[: RANK // 2]])
    base = model.state_dict()
    for ours, theirs in [("double_blocks.0.img_attn.norm.query_norm", "transformer_blocks.0.attn.norm_q"),
                         ("double_blocks.0.img_attn.norm.key_norm", "transformer_blocks.0.attn.norm_k"),
                         ("double_blocks.0.txt_attn.norm.query_norm", "transformer_blocks.0.attn.norm_added_q"),
                         ("double_blocks.0.txt_attn.norm.key_norm", "transformer_blocks.0.attn.norm_added_k"),
                         ("single_blocks.0.norm.query_norm", "single_transformer_blocks.0.attn.norm_q"),
                         ("single_blocks.0.norm.key_norm", "single_transformer_blocks.0.attn.norm_k")]:
        sd[f"{ours}.scale"] = base[f"{theirs}.weight"] + 0.1 * torch.randn(D // 2, generator=g)  # replaced, not added
    save(root / "bfl.safetensors", sd)


def tiny_converters():
    """diffusers' kohya and BFL-control LoRA converters with FLUX.1's sizes set to the tiny model's."""
    replacements = {
        "_convert_kohya_flux_lora_to_diffusers": [("dims=[3072, 3072, 3072, 12288]", f"dims=[{D}, {D}, {D}, {MLP}]")],
        "_convert_bfl_flux_control_lora_to_diffusers": [("num_layers = 19", "num_layers = 1"),
                                                        ("num_single_layers = 38", "num_single_layers = 1"),
                                                        ("inner_dim = 3072", f"inner_dim = {D}")],
    }
    for name, edits in replacements.items():
        src = inspect.getsource(getattr(lora_conversion_utils, name))
        for old, new in edits:
            assert old in src, f"diffusers' {name} changed: update tiny_converters()"
            src = src.replace(old, new)
        namespace = dict(vars(lora_conversion_utils))
        exec(src, namespace)
        setattr(lora_pipeline, name, namespace[name])  # where FluxLoraLoaderMixin.lora_state_dict looks it up


def pipeline(root_in: Path) -> FluxPipeline:
    base = FIXTURES / "flux_pipeline"
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULERS["dev"]),
        vae=__import__("diffusers").AutoencoderKL.from_pretrained(base / "vae"),
        transformer=FluxTransformer2DModel.from_pretrained(base / "dev_like" / "transformer").eval(),
        text_encoder=CLIPTextModel.from_pretrained(TEXT / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TEXT / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(TEXT / "text_encoder_2").eval(),
        tokenizer_2=T5Tokenizer.from_pretrained(TEXT / "tokenizer_2"),
    )


def make(out: Path) -> None:
    root = out / "flux_lora"
    root.mkdir(parents=True, exist_ok=True)
    pipe = pipeline(root)
    write_files(root, pipe.transformer, pipe.text_encoder)
    tiny_converters()

    g = seeded(1)
    io = {
        "img": torch.randn(2, 6, 16, generator=g), "txt": torch.randn(2, 7, 64, generator=g),
        "y": torch.randn(2, 64, generator=g), "timesteps": torch.tensor([1.0, 0.3125]),
        "guidance": torch.tensor([3.5, 1.0]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32), "txt_ids": torch.zeros(7, 3),
    }
    noise = torch.randn(len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8, generator=seeded(5))  # as flux_pipeline.py
    _, _, scale, length = VARIANTS["dev_like"]
    for case, files in CASES.items():
        pipe = pipeline(root)
        names = []
        for file, _ in files:
            pipe.load_lora_weights(str(root / f"{file}.safetensors"), adapter_name=file)
            names.append(file)
        pipe.set_adapters(names, [w for _, w in files])
        # fused; not unloaded, which would also put back the base QK-norm scales a BFL file replaced
        pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=1.0)
        packed = FluxPipeline._pack_latents(noise, len(PROMPTS), 4, HEIGHT // 8, WIDTH // 8)
        with torch.no_grad():
            io[f"{case}.out"] = pipe.transformer(
                hidden_states=io["img"], encoder_hidden_states=io["txt"], pooled_projections=io["y"],
                timestep=io["timesteps"], img_ids=io["img_ids"], txt_ids=io["txt_ids"], guidance=io["guidance"],
            ).sample
            io[f"{case}.latents"] = pipe(prompt=PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=4,
                                         guidance_scale=scale, max_sequence_length=length, latents=packed,
                                         output_type="latent").images
    with torch.no_grad():
        io["base.out"] = pipeline(root).transformer(
            hidden_states=io["img"], encoder_hidden_states=io["txt"], pooled_projections=io["y"],
            timestep=io["timesteps"], img_ids=io["img_ids"], txt_ids=io["txt_ids"], guidance=io["guidance"]).sample
    io["noise"] = noise
    save(root / "io.safetensors", io)
