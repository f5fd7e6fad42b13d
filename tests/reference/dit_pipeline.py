"""Reference fixture for the DiT pipeline: diffusers' DiTPipeline on a tiny random repo.

Writes out/dit_pipeline/repo/, laid out like facebook/DiT-XL-2-256: model_index.json (with a few
of the repo's `id2label` entries), transformer/ (a tiny DiTTransformer2DModel with the 1000
classes the pipeline's null label 1000 needs, embedders shared as in the hub checkpoint), vae/
(a tiny SD-style AutoencoderKL: quant convs, scale 0.18215) and scheduler/ (the hub's
DDIMScheduler: linear betas, clip_sample off). Then out/dit_pipeline/io.safetensors: per run, the
noise DiTPipeline draws from its generator, the final latents (what it hands the VAE, times the
scaling factor) and the images in [0, 1]; and the guided run's images in bfloat16.
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from ._common import randomize, save, save_json
from .dit import share_embedders
from .vae import _config as vae_config

ID2LABEL = {  # the first entries and two more of facebook/DiT-XL-2-256's model_index.json id2label
    "0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus", "207": "golden retriever",
    "417": "balloon", "999": "toilet tissue, toilet paper, bathroom tissue",
}
TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                   sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon", clip_sample=False)
RUNS = {  # name: (class labels, guidance scale, steps, generator seed)
    "guided": ([207, 1], 4.0, 5, 21),
    "unguided": ([417], 1.0, 3, 22),
}


def make(out: Path) -> None:
    root = out / "dit_pipeline"
    transformer = share_embedders(randomize(DiTTransformer2DModel(**TRANSFORMER), seed=31))
    vae = randomize(AutoencoderKL(**vae_config((8, 8, 16, 16), 4, 1, 4, sd_style=True)), seed=32)
    scheduler = DDIMScheduler(**SCHEDULER)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label={int(k): v for k, v in ID2LABEL.items()})
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_label_ids(["golden retriever", "goldfish"]) == [207, 1]

    repo = root / "repo"
    pipe.save_pretrained(repo, safe_serialization=True)
    index = json.loads((repo / "model_index.json").read_text())
    save_json(repo / "model_index.json", {**index, "id2label": ID2LABEL})  # the hub file carries it; save_pretrained not

    decoded = []
    vae_decode = vae.decode

    def decode(z, *args, **kwargs):  # DiTPipeline hands the VAE latents / scaling_factor
        decoded.append(z * vae.config.scaling_factor)
        return vae_decode(z, *args, **kwargs)

    vae.decode = decode
    io = {}
    for name, (labels, scale, steps, seed) in RUNS.items():
        shape = (len(labels), TRANSFORMER["in_channels"], 8, 8)
        io[f"{name}.noise"] = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # = randn_tensor's draw
        with torch.no_grad():
            images = pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=steps, output_type="pt",
                          generator=torch.Generator().manual_seed(seed)).images  # (B, 3, 64, 64) in [0, 1]
        io[f"{name}.latents"] = decoded.pop()
        io[f"{name}.images"] = images
    # the guided run again with the pipeline in bfloat16 (its noise is drawn in bfloat16)
    labels, scale, steps, seed = RUNS["guided"]
    pipe.to(torch.bfloat16)
    io["guided.noise_bf16"] = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16)
    with torch.no_grad():
        io["guided.images_bf16"] = pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=steps,
                                        output_type="pt", generator=torch.Generator().manual_seed(seed)).images
    save(root / "io.safetensors", io)
