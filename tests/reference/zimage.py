"""Reference fixtures for the Z-Image transformer: diffusers' ZImageTransformer2DModel.

Writes under out/zimage/:
  tiny/diffusers/       config.json + 2 shards + index json, as the hub's transformer/ folder.
                        Weights are stored in float16 (every value is float16-exact; the references
                        run on those exact values): the hard-wired 256 -> 1024 timestep MLP alone
                        would be 1.2 MB in float32.
  tiny/io.safetensors   two batches of 2, non-square latents:
                          "mask":   captions of 7 and 40 tokens (padded to 32 and 64: the batch
                                    padding mask runs), latents 12x10 (30 tokens + 2 pads)
                          "nomask": captions of 5 and 20 tokens (both padded to 32: no mask),
                                    latents 8x18 (36 tokens + 28 pads)
                        inputs and outputs, and for "mask" the block outputs of the last refiners and
                        the first main layer (padded batch layout), in float32 and in bfloat16
                        (keys with "bf16": torch's bfloat16 run of the same weights and inputs)
  units.safetensors     RoPE tables (RopeEmbedder), patchify order, timestep sinusoid
  schedules.safetensors ZImagePipeline's sigmas through FlowMatchEulerDiscreteScheduler(shift=3)
                        and the model times it passes, (1000 - timestep) / 1000, for several step counts
  manifest_z-image-turbo.json   key -> shape of the full-size transformer (meta device)
  pipeline/             ZImagePipeline from given caption features (prompt_embeds) and noise: the
                        tiny transformer above, a tiny 16-channel FLUX-style VAE (vae/) and the Turbo
                        scheduler (scheduler/, shift 3 static); io.safetensors: noise, captions,
                        final latents and images in [0, 1], Turbo-style (8 steps, guidance 0) and
                        with classifier-free guidance (3 steps, guidance 1.5); the Turbo run's final
                        latents also from torch's bfloat16 pipeline; the CFG run's final latents with
                        cfg_normalization=1.05 and with cfg_truncation=0.1. text_encoder/: a tiny Qwen3Model;
                        "prompts.*": the same two runs from prompts (the small Qwen tokenizer of
                        tests/fixtures/qwen3, negative prompt ""); the text encoder's and the VAE's
                        weights are float16-exact and stored in float16, as the transformer's

Every parameter is re-randomised, the learned pad tokens included, so no path hides behind a zero.
"""

import json
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel
from diffusers.models.transformers.transformer_z_image import RopeEmbedder, TimestepEmbedder
from safetensors.torch import save_file

from ._common import manifest, randomize, save, save_json, seeded

# head_dim = 32 / 2 = 16 = sum(axes_dims); axes_lens[0] = 128 > the 64 + 1 a 40-token caption needs
CONFIG = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
    n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=24, rope_theta=256.0, t_scale=1000.0,
    axes_dims=[4, 6, 6], axes_lens=[128, 32, 32],
)
BATCHES = {  # caption lengths, latent (H, W), model times t = 1 - sigma
    "mask": ((7, 40), (12, 10), (0.04545459, 0.7)),
    "nomask": ((5, 20), (8, 18), (0.0, 0.5)),
}


def make_model(seed: int = 7) -> ZImageTransformer2DModel:
    model = randomize(ZImageTransformer2DModel(**CONFIG), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # float16-exact values, stored as float16
    return model


def save_weights(folder: Path, state: dict[str, torch.Tensor], shards: int = 2) -> None:
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].detach().half().contiguous() for k in keys[s * per : (s + 1) * per]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=1, sort_keys=True))


def run(model, latents, t, caps, dtype):
    """model(list of (C, 1, H, W), t, list of (L_i, cap_dim)) with hooks on the blocks."""
    captured = {}
    blocks = {"noise_refiner": model.noise_refiner[-1], "context_refiner": model.context_refiner[-1],
              **{f"layers.{i}": layer for i, layer in enumerate(model.layers)}}
    hooks = [b.register_forward_hook(lambda m, args, out, n=n: captured.__setitem__(n, out)) for n, b in blocks.items()]
    with torch.no_grad():
        out = model([x[:, None].to(dtype) for x in latents], t, [c.to(dtype) for c in caps]).sample
    for h in hooks:
        h.remove()
    return torch.stack([o[:, 0] for o in out]), captured


def make_io(model: ZImageTransformer2DModel, out: Path) -> None:
    g = seeded(1)
    io = {}
    model_bf16 = make_model().to(torch.bfloat16)
    for name, (lengths, (H, W), ts) in BATCHES.items():
        latents = torch.randn(2, CONFIG["in_channels"], H, W, generator=g)
        caps = [torch.randn(n, CONFIG["cap_feat_dim"], generator=g) for n in lengths]
        t = torch.tensor(ts, dtype=torch.float32)
        cap_batch = torch.zeros(2, max(lengths), CONFIG["cap_feat_dim"])
        for i, c in enumerate(caps):
            cap_batch[i, : len(c)] = c
        io.update({f"{name}.latents": latents, f"{name}.t": t, f"{name}.cap_feats": cap_batch,
                   f"{name}.cap_lengths": torch.tensor(lengths, dtype=torch.int32)})
        for tag, m, dtype in (("", model, torch.float32), (".bf16", model_bf16, torch.bfloat16)):
            result, captured = run(m, latents, t, caps, dtype)
            io[f"{name}.out{tag}"] = result
            if name == "mask":  # block outputs of one batch keep the fixture small
                io.update({f"{name}.{k}{tag}": captured[k] for k in ("noise_refiner", "context_refiner", "layers.0")})
    save(out / "zimage" / "tiny" / "io.safetensors", io)


def make_units(out: Path) -> None:
    g = seeded(2)
    units = {}
    # positions up to the Turbo table sizes, where the float32 rounding of the angle matters
    ids = torch.stack([torch.randint(0, 1024, (96,), generator=g), torch.randint(0, 512, (96,), generator=g),
                       torch.randint(0, 512, (96,), generator=g)], dim=-1).to(torch.int32)
    freqs = RopeEmbedder(theta=256.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])(ids)  # (96, 64) complex64
    units.update({"rope.ids": ids, "rope.cos": freqs.real, "rope.sin": freqs.imag})
    image = torch.randn(16, 1, 6, 10, generator=g)
    patches, _, _ = ZImageTransformer2DModel._patchify_image(None, image, 2, 1)
    units.update({"patchify.latents": image[:, 0], "patchify.tokens": patches})
    t = torch.tensor([0.0, 45.45458984, 500.0, 1000.0])
    units.update({"timestep.t": t, "timestep.emb": TimestepEmbedder.timestep_embedding(t, 256)})
    save(out / "zimage" / "units.safetensors", units)


SCHEDULE_STEPS = (1, 2, 4, 8, 9, 28, 50)


def make_schedules(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

    tensors = {}
    for n in SCHEDULE_STEPS:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
        timesteps, _ = retrieve_timesteps(scheduler, n, "cpu", sigmas=get_default_z_image_sigmas(n), mu=0.5)
        tensors[f"sigmas.{n}"] = scheduler.sigmas
        tensors[f"model_t.{n}"] = (1000 - timesteps) / 1000  # as the pipeline's loop computes it
        assert scheduler.sigmas.dtype == torch.float32 and timesteps.dtype == torch.float32
    save(out / "zimage" / "schedules.safetensors", tensors)


PIPELINE_RUNS = {"turbo": (8, 0.0), "cfg": (3, 1.5)}  # steps, guidance_scale
CFG_OPTIONS = {"cfg_norm": dict(cfg_normalization=1.05), "cfg_trunc": dict(cfg_truncation=0.1)}
PROMPTS = ["a red circle to the left of a blue square", "Ein Café in Tōkyō"]
QWEN_TOKENIZER = Path(__file__).resolve().parents[1] / "fixtures" / "qwen3" / "tokenizer_small"
HEIGHT, WIDTH = 32, 48  # latents 4x6, tokens 2x3 (+ 26 pad tokens)


def padded_batch(caps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.zeros(len(caps), max(len(c) for c in caps), caps[0].shape[1])
    for i, c in enumerate(caps):
        batch[i, : len(c)] = c
    return batch, torch.tensor([len(c) for c in caps], dtype=torch.int32)


def half_exact(model: torch.nn.Module) -> torch.nn.Module:
    """Round every parameter to a float16 value (kept in float32), so that the weights can be
    stored in float16 at half the size and the reference runs on exactly what is stored."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def tiny_vae() -> "AutoencoderKL":
    from diffusers import AutoencoderKL

    from .vae import _config as vae_config

    return half_exact(randomize(AutoencoderKL(**vae_config((8, 8, 8, 8), 16, 1, 4, sd_style=False)), seed=61))


def make_pipeline(model: ZImageTransformer2DModel, out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    root = out / "zimage" / "pipeline"
    vae = tiny_vae()
    vae.half().save_pretrained(root / "vae")  # no buffers: float() restores it exactly
    vae.float()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    scheduler.save_pretrained(root / "scheduler")
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    g = seeded(5)
    pos = [torch.randn(n, CONFIG["cap_feat_dim"], generator=g) for n in (7, 40)]
    neg = [torch.randn(8, CONFIG["cap_feat_dim"], generator=g) for _ in range(2)]
    noise = torch.randn(2, CONFIG["in_channels"], HEIGHT // 8, WIDTH // 8, generator=g)
    io = {"noise": noise}
    io["pos.cap_feats"], io["pos.cap_lengths"] = padded_batch(pos)
    io["neg.cap_feats"], io["neg.cap_lengths"] = padded_batch(neg)
    for name, (steps, guidance) in PIPELINE_RUNS.items():
        run = dict(prompt_embeds=pos, negative_prompt_embeds=neg, height=HEIGHT, width=WIDTH,
                   num_inference_steps=steps, guidance_scale=guidance, latents=noise)
        with torch.no_grad():
            io[f"{name}.latents"] = pipe(**run, output_type="latent").images
            io[f"{name}.images"] = pipe(**run, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    # ZImagePipeline's two guidance options, each alone (final latents)
    for name, extra in CFG_OPTIONS.items():
        with torch.no_grad():
            io[f"{name}.latents"] = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=HEIGHT, width=WIDTH,
                                         num_inference_steps=3, guidance_scale=1.5, latents=noise, output_type="latent",
                                         **extra).images
    # the same Turbo run in bfloat16 (caption features bf16; t, noise and latents stay float32)
    vae_bf16 = tiny_vae().to(torch.bfloat16)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae_bf16, text_encoder=None, tokenizer=None,
                          transformer=make_model().to(torch.bfloat16))
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = PIPELINE_RUNS["turbo"]
    with torch.no_grad():
        io["turbo.latents.bf16"] = pipe(
            prompt_embeds=[c.bfloat16() for c in pos], height=HEIGHT, width=WIDTH, num_inference_steps=steps,
            guidance_scale=guidance, latents=noise, output_type="latent").images
    # the whole pipeline from prompts: a tiny Qwen3Model (hidden 24 = cap_feat_dim) and the small
    # Qwen tokenizer of tests/fixtures/qwen3 (made by reference/qwen3.py)
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    text_encoder = half_exact(randomize(Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=CONFIG["cap_feat_dim"], intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, pad_token_id=tokenizer.pad_token_id)), seed=62))
    # float16 files; the rotary inv_freq buffer stays float32 (it is not stored)
    text_encoder.save_pretrained(root / "text_encoder", state_dict={k: v.half() for k, v in text_encoder.state_dict().items()})
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    for name, (steps, guidance) in PIPELINE_RUNS.items():
        # a fresh list per call: ZImagePipeline._encode_prompt writes the templated prompts into it
        run = dict(prompt=list(PROMPTS), height=HEIGHT, width=WIDTH, num_inference_steps=steps, guidance_scale=guidance,
                   latents=noise)
        with torch.no_grad():
            io[f"prompts.{name}.latents"] = pipe(**run, output_type="latent").images
            io[f"prompts.{name}.images"] = pipe(**{**run, "prompt": list(PROMPTS)}, output_type="pt").images
    save(root / "io.safetensors", io)


def make(out: Path) -> None:
    make_schedules(out)
    model = make_model()
    folder = out / "zimage" / "tiny" / "diffusers"
    save_weights(folder, model.state_dict())
    save_json(folder / "config.json", {"_class_name": "ZImageTransformer2DModel", **CONFIG})
    make_io(model, out)
    make_units(out)
    make_pipeline(model, out)
    with torch.device("meta"):
        full = ZImageTransformer2DModel()  # diffusers' defaults: Z-Image-Turbo's configuration
    save_json(out / "zimage" / "manifest_z-image-turbo.json", manifest(full.state_dict()))
