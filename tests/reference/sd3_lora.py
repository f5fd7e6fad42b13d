"""Reference fixtures for SD3.5 LoRA files, on the tiny transformer of sd3_pipeline.py (MMDiT-X blocks
0-1, QK norm, the last block context_pre_only). Writes under out/sd3_lora/:

  diffusers.safetensors   PEFT names (transformer.transformer_blocks.0.attn.to_q.lora_A.weight ...) on
                          every Linear but one q/k/v piece, lora_alpha / r = 8 / 4 in the
                          `lora_adapter_metadata` header as diffusers saves it
  kohya.safetensors       the same adapters in sd-scripts' names on Stability's layout
                          (lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight, .alpha): q, k, v
                          fused into one rank-3r adapter with a block-diagonal lora_up, the
                          (scale, shift) layers' lora_up halves swapped to Stability's (shift, scale)
  io.safetensors          transformer inputs, the base output and the output after diffusers'
                          StableDiffusion3Pipeline.load_lora_weights + set_adapters(0.7) + fuse_lora

diffusers has no converter for kohya SD3 files (SD3LoraLoaderMixin reads PEFT names only), so the
kohya file is made equal to the PEFT one by construction, and both must give diffusers' output.
"""

import json
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file

from ._common import save, seeded

REQUIRES = ("peft",)  # diffusers' load_lora_weights runs on PEFT
REPO = Path(__file__).resolve().parents[1] / "fixtures" / "sd3_pipeline" / "repo"
RANK, ALPHA, WEIGHT = 4, 8.0, 0.7
LEFT_OUT = ("transformer_blocks.0.attn.add_k_proj",)  # a q/k/v piece without an adapter


def adapters(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g, out = seeded(95), {}
    for name, m in sorted(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and name not in LEFT_OUT:
            out[name] = (torch.randn(RANK, m.in_features, generator=g) * 0.15,
                         torch.randn(m.out_features, RANK, generator=g) * 0.15)
    return out


def _swap(b):
    x, y = b.chunk(2)
    return torch.cat([y, x])


def to_kohya(lora: dict, n_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers names -> sd-scripts' on Stability's layout, the same update B A · alpha / r."""
    sd, scale = {}, ALPHA / RANK

    def put(name, a, b):
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
        sd[f"{key}.alpha"] = torch.tensor(scale * a.shape[0])  # alpha / rank = the PEFT scale

    def fused(name, parts, width):
        """q, k, v adapters -> one of rank 3r: A stacked, B block-diagonal (zeros for an absent piece)."""
        a = torch.cat([lora[p][0] if p in lora else torch.zeros(RANK, width) for p in parts])
        b = torch.block_diag(*[lora[p][1] if p in lora else torch.zeros(width, RANK) for p in parts])
        put(name, a, b)

    top = {"context_embedder": "context_embedder", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
    for theirs, ours in top.items():
        put(ours, *lora[theirs])
    a, b = lora["norm_out.linear"]
    put("final_layer.adaLN_modulation.1", a, _swap(b))
    for i in range(n_blocks):
        s, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        width = lora[s + "attn.to_q"][0].shape[1]
        fused(x + "attn.qkv", [s + f"attn.to_{q}" for q in "qkv"], width)
        fused(c + "attn.qkv", [s + f"attn.add_{q}_proj" for q in "qkv"], width)
        put(x + "attn.proj", *lora[s + "attn.to_out.0"])
        put(x + "adaLN_modulation.1", *lora[s + "norm1.linear"])
        put(x + "mlp.fc1", *lora[s + "ff.net.0.proj"])
        put(x + "mlp.fc2", *lora[s + "ff.net.2"])
        if s + "attn2.to_q" in lora:
            fused(x + "attn2.qkv", [s + f"attn2.to_{q}" for q in "qkv"], width)
            put(x + "attn2.proj", *lora[s + "attn2.to_out.0"])
        a, b = lora[s + "norm1_context.linear"]
        if i == n_blocks - 1:  # context_pre_only: (scale, shift) in diffusers
            put(c + "adaLN_modulation.1", a, _swap(b))
        else:
            put(c + "adaLN_modulation.1", a, b)
            put(c + "attn.proj", *lora[s + "attn.to_add_out"])
            put(c + "mlp.fc1", *lora[s + "ff_context.net.0.proj"])
            put(c + "mlp.fc2", *lora[s + "ff_context.net.2"])
    return sd


def run(model, io) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=io["x"], encoder_hidden_states=io["txt"], pooled_projections=io["pooled"],
                     timestep=io["timesteps"] * 1000, return_dict=False)[0]


def make(out: Path) -> None:
    root = out / "sd3_lora"
    root.mkdir(parents=True, exist_ok=True)
    model = SD3Transformer2DModel.from_pretrained(REPO / "transformer").eval()
    lora = adapters(model)
    peft = {}
    for name, (a, b) in lora.items():
        peft[f"transformer.{name}.lora_A.weight"], peft[f"transformer.{name}.lora_B.weight"] = a, b
    meta = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.target_modules": sorted(lora)}
    save_file(peft, str(root / "diffusers.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)})
    save(root / "kohya.safetensors", to_kohya(lora, len(model.transformer_blocks)))

    g = seeded(1)
    io = {"x": torch.randn(2, 16, 6, 4, generator=g), "txt": torch.randn(2, 9, 64, generator=g),
          "pooled": torch.randn(2, 40, generator=g), "timesteps": torch.tensor([1.0, 0.4375])}
    io["base.out"] = run(model, io)
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(root / "diffusers.safetensors"), adapter_name="style")
    pipe.set_adapters(["style"], [WEIGHT])
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    io["lora.out"] = run(pipe.transformer, io)
    save(root / "io.safetensors", io)
