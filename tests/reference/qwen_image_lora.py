"""Reference fixtures for Qwen-Image LoRAs: a random adapter on the tiny transformer of
qwen_image.py, written as QwenImagePipeline.save_lora_weights writes PEFT files, loaded by diffusers'
QwenImagePipeline.load_lora_weights + set_adapters(0.7) + fuse_lora (needs peft).

Writes under out/qwen_image_lora/:
  diffusers.safetensors   every Linear of the transformer (less block 1's add_k_proj) under
                          `transformer.`, lora_alpha 8 / r 4 in the `lora_adapter_metadata` header
  io.safetensors          the fused transformer's output on qwen_image.py's inputs (mask, 3x5 grid)
"""

import json
from pathlib import Path

import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from safetensors.torch import save_file

from ._common import randomize, save, seeded
from .qwen_image import TINY

REQUIRES = ("peft",)
RANK, WEIGHT = 4, 0.7


def make(out: Path) -> None:
    root = out / "qwen_image_lora"
    root.mkdir(parents=True, exist_ok=True)
    model = randomize(QwenImageTransformer2DModel(**TINY), seed=26)  # as qwen_image.py
    g, sd = seeded(93), {}
    for name, m in sorted(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and name != "transformer_blocks.1.attn.add_k_proj":
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features, generator=g) * 0.15
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK, generator=g) * 0.15
    meta = {"transformer.r": RANK, "transformer.lora_alpha": 8,
            "transformer.target_modules": sorted({k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in sd})}
    save_file(sd, str(root / "diffusers.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)})

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=model)
    pipe.load_lora_weights(str(root / "diffusers.safetensors"), adapter_name="a")
    pipe.set_adapters(["a"], [WEIGHT])
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    g = seeded(1)  # qwen_image.py's inputs
    img, txt = torch.randn(2, 15, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    txt[1, 4:] = 0
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        outp = pipe.transformer(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=mask,
                                timestep=torch.tensor([0.96738404, 0.3125]), img_shapes=[[(1, 3, 5)]] * 2,
                                return_dict=False)[0]
    save(root / "io.safetensors", {"out": outp, "weight": torch.tensor(WEIGHT)})
