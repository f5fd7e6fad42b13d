"""Reference fixtures for the Qwen-Image transformer: diffusers' QwenImageTransformer2DModel.

Writes under out/qwen_image/:
  tiny/diffusers/        config.json + 2 shards + index json, as the hub's transformer/ folder
  tiny/io.safetensors    inputs and outputs in fp32 and bf16 (the same weights cast), with every
                         block's output (`block.{i}.img|txt`): batch 2 on a non-square, odd 3x5
                         token grid, 7 text tokens of which sample 1 has 4 (the mask), plus sample 1
                         alone, unpadded (`solo.*`), and an even 4x2 grid (`even.*`)
  units.safetensors      MSRoPE tables (real, imaginary) for a 13x6 grid and 600 text tokens; the
                         timestep sinusoid in fp32
  manifest_qwen-image.json   key -> shape of the full-size (20 B) transformer, made on the meta device
"""

from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, QwenTimestepProjEmbeddings

from ._common import manifest, randomize, save, save_json, save_sharded, seeded

TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))


def run(model, dtype, img, txt, mask, t, shape, prefix):
    found, hooks = {}, []
    for i, block in enumerate(model.transformer_blocks):
        def hook(_, __, out, i=i):
            found[f"block.{i}.txt{prefix}"], found[f"block.{i}.img{prefix}"] = out
        hooks.append(block.register_forward_hook(hook))
    with torch.no_grad():
        found[f"out{prefix}"] = model(
            hidden_states=img.to(dtype), encoder_hidden_states=txt.to(dtype), encoder_hidden_states_mask=mask,
            timestep=t.to(dtype), img_shapes=[[(1, *shape)]] * img.shape[0], return_dict=False)[0]
    for h in hooks:
        h.remove()
    return found


def make_tiny(out: Path) -> None:
    model = randomize(QwenImageTransformer2DModel(**TINY), seed=26)
    folder = out / "qwen_image" / "tiny"
    save_sharded(folder / "diffusers", "diffusion_pytorch_model", model.state_dict(), shards=2)
    save_json(folder / "diffusers" / "config.json", {"_class_name": "QwenImageTransformer2DModel", **TINY})

    g = seeded(1)
    B, h, w, n_txt = 2, 3, 5, 7
    io = {
        "img": torch.randn(B, h * w, 16, generator=g),
        "txt": torch.randn(B, n_txt, 24, generator=g),
        "mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
        "timesteps": torch.tensor([0.96738404, 0.3125]),  # sigmas: the pipeline passes t / 1000
    }
    io["txt"][1, 4:] = 0  # padded rows are zeros, as the pipeline re-pads them
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        io.update(run(model.to(dtype), dtype, io["img"], io["txt"], io["mask"], io["timesteps"], (h, w), suffix))
        solo = run(model, dtype, io["img"][1:], io["txt"][1:, :4], None, io["timesteps"][1:], (h, w), "")
        io[f"solo.out{suffix}"] = solo["out"]
        # an even grid, no mask
        g2 = seeded(2)
        even = {"img": torch.randn(1, 8, 16, generator=g2), "txt": torch.randn(1, 5, 24, generator=g2)}
        io["even.img"], io["even.txt"] = even["img"], even["txt"]
        io[f"even.out{suffix}"] = run(model, dtype, even["img"], even["txt"], None, torch.tensor([0.5]), (4, 2), "")["out"]
    save(folder / "io.safetensors", io)


def make_units(out: Path) -> None:
    units = {}
    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    img, txt = rope([[(1, 13, 6)]], max_txt_seq_len=600, device=torch.device("cpu"))
    units.update({"rope.img.cos": img.real, "rope.img.sin": img.imag, "rope.txt.cos": txt.real, "rope.txt.sin": txt.imag})
    emb = QwenTimestepProjEmbeddings(embedding_dim=8)
    t = torch.tensor([1.0, 0.96738404, 0.5, 0.0200000, 0.74306935])
    units["timestep.t"], units["timestep.proj"] = t, emb.time_proj(t)
    save(out / "qwen_image" / "units.safetensors", units)


def make_manifest(out: Path) -> None:
    with torch.device("meta"):
        sd = QwenImageTransformer2DModel().state_dict()  # the defaults are Qwen-Image's (QT:816-831)
    save_json(out / "qwen_image" / "manifest_qwen-image.json", manifest(sd))


def make(out: Path) -> None:
    make_tiny(out)
    make_units(out)
    make_manifest(out)
