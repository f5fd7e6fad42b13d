"""Reference fixtures for the SD U-Net: diffusers' UNet2DConditionModel.

Writes under out/unet/:
  <name>/diffusers/        config.json + diffusion_pytorch_model.safetensors, as the hub's unet/ folder
  <name>/ldm.safetensors   the same weights in the original single-file layout (sd_small), with
                           the `model.diffusion_model.` prefix
  <name>/io.safetensors    inputs (batch 2, odd non-square latents, a timestep per sample, text
                           states) and outputs: fp32, and torch's bf16 run of the same weights
  manifest_sd15_<layout>.json   key -> shape of the full-size SD 1.5 U-Net checkpoints
  sd15_config.json         SD 1.5's unet/config.json

`to_ldm` is our diffusers -> original converter; it is proven by diffusers' own
convert_ldm_unet_checkpoint turning its output back into the diffusers state dict exactly.
"""

import re
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from ._common import manifest, randomize, save, save_json, seeded

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json
SD15 = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
# The same structure, narrow: three levels (attention on the two finer ones, as SD on its three),
# 4 groups of 2-4 channels, heads per level; and a variant with Linear projections (SD 2 style),
# two transformer blocks per attention and one resnet per level.
SMALL = {
    "sd_small": {**SD15, "block_out_channels": [8, 16, 16], "attention_head_dim": [2, 2, 4], "norm_num_groups": 4,
                 "cross_attention_dim": 12, "down_block_types": SD15["down_block_types"][1:],
                 "up_block_types": SD15["up_block_types"][:3], "sample_size": 8},
    "linear_small": {**SD15, "block_out_channels": [8, 16], "attention_head_dim": 2, "norm_num_groups": 4,
                     "cross_attention_dim": 12, "layers_per_block": 1, "use_linear_projection": True,
                     "transformer_layers_per_block": 2, "down_block_types": SD15["down_block_types"][2:],
                     "up_block_types": SD15["up_block_types"][:2], "sample_size": 8},
}
WITH_LDM = ("sd_small",)

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def to_ldm(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers -> original (LDM) layout, with the `model.diffusion_model.` prefix."""
    L = config["layers_per_block"]
    attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]

    def resnet(rest: str) -> str:
        layer, _, p = rest.partition(".")
        return dict(_RESNET)[layer] + "." + p

    out = {}
    for key, value in sd.items():
        top = next((k for k in _TOP if key.startswith(k + ".")), None)
        if top:
            new = _TOP[top] + key[len(top):]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.0.{resnet(m[3])}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * (L + 1) + L}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.0.{resnet(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * (L + 1) + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            u = int(m[1])
            new = f"output_blocks.{u * (L + 1) + L}.{2 if attention[u] else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"to_ldm: no rule for {key}")
        out["model.diffusion_model." + new] = value
    return out


def check_round_trip(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """to_ldm(sd), after checking that diffusers' own converter turns it back into sd exactly."""
    ldm = to_ldm(sd, config)
    back = convert_ldm_unet_checkpoint(dict(ldm), config)
    assert set(back) == set(sd), f"key sets differ: {sorted(set(back) ^ set(sd))[:6]}"
    for k, v in sd.items():
        assert back[k].shape == v.shape, f"{k}: {tuple(back[k].shape)} != {tuple(v.shape)}"
        if v.device.type != "meta":
            assert torch.equal(back[k], v), f"{k}: values differ after the round trip"
    return ldm


def nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def make_small(out: Path, name: str, config: dict, seed: int) -> None:
    unet = randomize(UNet2DConditionModel(**config), seed=seed)
    sd = unet.state_dict()
    folder = out / "unet" / name
    save(folder / "diffusers" / "diffusion_pytorch_model.safetensors", sd)
    save_json(folder / "diffusers" / "config.json", {"_class_name": "UNet2DConditionModel", **config})
    if name in WITH_LDM:
        save(folder / "ldm.safetensors", check_round_trip(sd, config))

    g = seeded(seed + 1)
    x = torch.randn(2, config["in_channels"], 7, 10, generator=g)  # odd sizes: the up path crops
    t = torch.tensor([981.0, 37.5])  # one per sample; Euler's are fractional
    context = torch.randn(2, 5, config["cross_attention_dim"], generator=g)
    with torch.no_grad():
        io = {"x": nhwc(x), "t": t, "context": context, "out": nhwc(unet(x, t, context).sample)}
        bf16 = unet.to(torch.bfloat16)
        io["out_bf16"] = nhwc(bf16(x.bfloat16(), t, context.bfloat16()).sample)
    save(folder / "io.safetensors", io)


def make_manifests(out: Path) -> None:
    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15).state_dict()
    save_json(out / "unet" / "sd15_config.json", {"_class_name": "UNet2DConditionModel", **SD15})
    save_json(out / "unet" / "manifest_sd15_diffusers.json", manifest(sd))
    save_json(out / "unet" / "manifest_sd15_ldm.json", manifest(check_round_trip(sd, SD15)))


def make(out: Path) -> None:
    for i, (name, config) in enumerate(SMALL.items()):
        make_small(out, name, config, seed=200 + 10 * i)
    make_manifests(out)
