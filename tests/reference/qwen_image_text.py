"""Reference fixtures for Qwen-Image's text side: transformers' Qwen2_5_VLForConditionalGeneration
(the language model; tiny) and diffusers' QwenImagePipeline.encode_prompt with the small Qwen
tokenizer of tests/reference/qwen3.py.

Writes under out/qwen_image_text/:
  text_encoder/          save_pretrained of the tiny model (3 layers, GQA 4/2, q/k/v biases, mRoPE
                         sections 2/1/1, theta 1e6, a 1-block vision tower and an untied LM head),
                         sharded: the hub's text_encoder/ layout (model.*, visual.*, lm_head)
  io.safetensors         hidden_states[-1] (== last_hidden_state, after the final norm) of a
                         right-padded batch of 2, fp32 and bf16; the pipeline's prompt embeddings
                         and masks (`prompt.{case}.embeds|mask`), fp32 and bf16
  prompts.json           the prompt cases and the token ids of the batch
  manifest_qwen2_5_vl_7b.json   key -> shape of the full-size Qwen2.5-VL-7B, legacy layout (meta)
"""

from pathlib import Path

import torch
from diffusers import QwenImagePipeline
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ._common import manifest, randomize, save, save_json

TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=578, rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]})
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0])
# Qwen2.5-VL-7B (unverified offline: REFERENCE-NOTES-TURN3 A1)
FULL_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1e6,
                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
FULL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                   fullatt_block_indexes=[7, 15, 23, 31])
# (name, prompts, max_sequence_length): 2 prompts of different lengths (mask), one (no mask), an
# empty one, one starting with a newline, a cut at 6 embeddings
CASES = [
    ("pair", ["a red cat sitting on a mat", "the quick brown fox jumps over the lazy dog near a river bank"], 512),
    ("single", ["a photo of a lighthouse at dusk"], 512),
    ("empty", [""], 512),
    ("newline", ["\nstarts on a new line", "two"], 512),
    ("cut", ["the quick brown fox jumps over the lazy dog near a river bank", "a cat"], 6),
]


def tiny_encoder() -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION, tie_word_embeddings=False)
    return randomize(Qwen2_5_VLForConditionalGeneration(config), seed=28, std=0.3)


# the small tokenizer as tests/reference/qwen3.py stores it (read from the stored fixtures, so that
# `make_fixtures.py --check qwen_image_text` works on its own)
SMALL_TOKENIZER = Path(__file__).parents[1] / "fixtures" / "qwen3" / "tokenizer_small"


def make(out: Path) -> None:
    folder = out / "qwen_image_text"
    tokenizer = AutoTokenizer.from_pretrained(SMALL_TOKENIZER)
    model = tiny_encoder()
    model.save_pretrained(folder / "text_encoder", max_shard_size="100KB")

    io, ids = {}, {}
    batch = tokenizer(["a red cat", "the quick brown fox jumps over the lazy dog"], padding=True, return_tensors="pt")
    ids["batch"] = batch.input_ids.tolist()
    io["batch.ids"], io["batch.mask"] = batch.input_ids, batch.attention_mask
    for suffix, dtype in (("", torch.float32), ("_bf16", torch.bfloat16)):
        model = model.to(dtype)
        with torch.no_grad():
            out_ = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        io[f"batch.hidden{suffix}"] = out_.hidden_states[-1]
        pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None)
        for name, prompts, max_len in CASES:
            with torch.no_grad():
                embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=max_len)
            io[f"prompt.{name}.embeds{suffix}"] = embeds
            if mask is not None:
                io[f"prompt.{name}.mask{suffix}"] = mask
    save(folder / "io.safetensors", io)
    save_json(folder / "prompts.json", {"cases": CASES, "ids": ids})

    with torch.device("meta"):
        full = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=FULL_TEXT, vision_config=FULL_VISION, tie_word_embeddings=False))
    # the layout save_pretrained writes (REFERENCE-NOTES-TURN3 A1): model.language_model.* -> model.*, model.visual.* -> visual.*
    legacy = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
              for k, v in full.state_dict().items()}
    save_json(folder / "manifest_qwen2_5_vl_7b.json", manifest(legacy))
