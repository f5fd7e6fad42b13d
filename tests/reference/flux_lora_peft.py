"""Reference fixtures for LoRA scales as PEFT computes them: adapters added by peft itself to the
tiny dev-like FLUX transformer (tests/fixtures/flux_pipeline/dev_like), saved by diffusers'
FluxPipeline.save_lora_weights with the LoraConfig in the file's `lora_adapter_metadata`, and the
transformer run with the adapters active (PEFT's own forward: base + scale * B A x).

Writes under out/flux_lora_peft/:
  <case>.safetensors   the adapter file, for each case of CONFIGS:
                         rslora    use_rslora (scale alpha / sqrt(r)), rank_pattern and alpha_pattern
                         patterns  rank_pattern and alpha_pattern with the plain alpha / r
  io.safetensors       transformer inputs; per case the output with the adapter; the base output
"""

from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from ._common import save, seeded

REQUIRES = ("peft",)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "ff.net.2", "ff_context.net.0.proj",
           "norm1.linear", "proj_mlp", "proj_out", "x_embedder", "context_embedder"]
# patterns that hit some of the targets (and one only in one block, by its full dotted tail)
RANK_PATTERN = {"ff.net.2": 2, "single_transformer_blocks.0.proj_out": 8, "to_v": 6}
ALPHA_PATTERN = {"to_q": 2.0, "proj_mlp": 16.0, "x_embedder": 3.0}
CONFIGS = {
    "rslora": dict(r=4, lora_alpha=6.0, use_rslora=True, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN),
    "patterns": dict(r=4, lora_alpha=6.0, use_rslora=False, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN),
}


def transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(FIXTURES / "flux_pipeline" / "dev_like" / "transformer").eval()


def inputs() -> dict[str, torch.Tensor]:
    g = seeded(11)
    return {
        "img": torch.randn(2, 6, 16, generator=g), "txt": torch.randn(2, 7, 64, generator=g),
        "y": torch.randn(2, 64, generator=g), "timesteps": torch.tensor([1.0, 0.3125]),
        "guidance": torch.tensor([3.5, 1.0]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32), "txt_ids": torch.zeros(7, 3),
    }


def run(model, io) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=io["img"], encoder_hidden_states=io["txt"], pooled_projections=io["y"],
                     timestep=io["timesteps"], img_ids=io["img_ids"], txt_ids=io["txt_ids"],
                     guidance=io["guidance"]).sample


def make(out: Path) -> None:
    root = out / "flux_lora_peft"
    io = inputs()
    io["base.out"] = run(transformer(), io)
    for seed, (case, options) in enumerate(CONFIGS.items()):
        model = transformer()
        config = LoraConfig(target_modules=TARGETS, **options)
        model.add_adapter(config)
        g = seeded(120 + seed)
        with torch.no_grad():  # PEFT starts B at zero: random A and B, so that every adapter counts
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        io[f"{case}.out"] = run(model, io)
        state = get_peft_model_state_dict(model)
        FluxPipeline.save_lora_weights(root, transformer_lora_layers=state, weight_name=f"{case}.safetensors",
                                       transformer_lora_adapter_metadata=config.to_dict())
    save(root / "io.safetensors", io)
