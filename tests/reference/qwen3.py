"""Reference fixtures for Qwen3 and Qwen's tokenizer: transformers' Qwen3Model / Qwen3ForCausalLM
and Qwen2Tokenizer (AutoTokenizer), and the prompt encoding of diffusers' ZImagePipeline and
Flux2KleinPipeline.

Writes under out/qwen3/:
  tokenizer_small/         vocab.json + merges.txt learned here (byte-level BPE on the corpus of
                           text_encoders.py, split by transformers' own Qwen2 pre-tokenizer),
                           tokenizer_config.json with Qwen's 26 added tokens (ids after the vocab)
  tokenizer_real_pruned/   the real Qwen vocabulary (rebuilt from the quicktok wheel, see
                           _qwen_vocab.py), pruned to the tokens the expected ids below need (see
                           `prune`): real ids, real merge order; 1/40 of the full folder's size
  tokenizer_small_json/    the same as one tokenizer.json (the `tokenizers` library's format)
  tokenizers.json          text -> ids from transformers on the small and the FULL real vocabulary:
                           a battery, 300 seeded random strings, both chat templates, padded batches
  deep/text_encoder/       Qwen3Model, 28 layers (hidden_states[27] is a layer output, not the
                           normed one), sharded like the hub (2 shards + index json)
  deep/io.safetensors      a right-padded batch of 2: every hidden_states entry, fp32 and bf16
  shallow/text_encoder/    Qwen3ForCausalLM, 3 layers, untied lm_head (keys under model.), a
                           config.json without any rope entry (theta falls back to 10000)
  shallow/io.safetensors   its hidden states
  rope/                    a 1-layer model at Qwen3's head_dim 128 and theta 1e6, 512 positions,
                           and torch's inv_freq for (128, 1e6)
  conditioning.safetensors diffusers' Z-Image and FLUX.2 klein prompt embeddings of 3 prompts
                           through the deep model and the small tokenizer
  manifest_*.json          key -> shape of Qwen3-4B and Qwen3-8B, Qwen3Model and Qwen3ForCausalLM
"""

import copy
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline, ZImagePipeline
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from ._common import manifest, randomize, save, save_json, save_sharded, seeded
from ._qwen_vocab import bytes_to_unicode, real_tokenizer_folder, write_tokenizer_folder
from .text_encoders import _ALPHABET, _CLIP_ONLY, BATTERY as CLIP_T5_BATTERY, corpus, learn_bpe, random_strings

SMALL_MERGES = 300
QWEN_ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]
ROPE = {"rope_type": "default", "rope_theta": 1e6}
# attention width 4 x 8 = 32 differs from hidden_size 16 on purpose: head_dim is its own field
DEEP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, rms_norm_eps=1e-6, rope_parameters=ROPE, max_position_embeddings=1024)
SHALLOW = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
               head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=1024)
SHALLOW_VOCAB = 64
ROPE_WIDE = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=128, rms_norm_eps=1e-6, rope_parameters=ROPE, max_position_embeddings=1024)
# Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json (hub), as in models/qwen3.py
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_parameters=ROPE,
                max_position_embeddings=40960, tie_word_embeddings=True)
QWEN3_8B = {**QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}

DEEP_PROMPTS = ["a red cat", "two cats on the moon"]
PROMPTS = ["a red cat", "An astronaut riding a horse on the moon, 8k", "東京の夜景 — café"]
BATTERY = {
    **CLIP_T5_BATTERY,
    "hello_world": "Hello world",
    "newlines": "line one\nline two\r\nline three\n\n\n  indented\n\t\ttabbed\r\r",
    "trailing_spaces": "a cat   \n   ",
    "cjk": "一只猫坐在红色的椅子上。日本語のテキスト、한국어 텍스트",
    "code": "def f(x):\n    return x ** 2  # square\n\nif __name__ == '__main__':\n    print(f(3))\r\n",
    "digits_long": "1234567890123 ١٢٣ ½ 2²",
    "qwen_specials": "<|im_start|>user\nhi<|im_end|>\n<think>\n\n</think>\n\n<|endoftext|><|fim_prefix|>x<tool_call>",
    "special_lookalikes": "<|im_start |> <im_start> <|IM_START|> <think >",
    "combining": "e\u0301 a\u0308 n\u0303 \u1e9b\u0323 o\u0302\u0301 Z\u0335\u0321a\u0336",
    "contractions_case": "IT'S I'M you'LL We'Re THEY'VE she'D don'T 'S",
    "separators": "a\x1cb\x1dc\x1ed\x1fe \x85f\u2028g\u2029h",
}
_QWEN_ONLY = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>", "\r", "\r\n", "\n\n", "   ",
              "'S", "'Ll", "\x1c", "\x85", "\u2028", "def ", "():", "==", "한", "١"]


# ---- tokenizer files ------------------------------------------------------------------------------


def write_small_tokenizer(folder: Path) -> None:
    """A byte-level BPE learned on the corpus, words split as Qwen2Tokenizer splits them."""
    with tempfile.TemporaryDirectory() as tmp:  # a bytes-only tokenizer, just for its pre-tokenizer
        table = bytes_to_unicode()
        write_tokenizer_folder(Path(tmp), {table[b]: i for i, b in enumerate(table)}, [], [])
        backend = AutoTokenizer.from_pretrained(tmp).backend_tokenizer
    words = Counter()
    for line in corpus():
        words.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)))
    merges = learn_bpe(words, SMALL_MERGES, end_of_word="")
    symbols = [*table.values(), *("".join(m) for m in merges)]
    assert len(set(symbols)) == len(symbols)
    vocab = {s: i for i, s in enumerate(symbols)}
    write_tokenizer_folder(folder, vocab, merges, [(len(vocab) + i, t) for i, t in enumerate(QWEN_ADDED)])


def tokenizer_expectations(tokenizer) -> dict:
    names, texts = list(BATTERY), list(BATTERY.values())
    chat = lambda p, thinking: tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
    zimage = [chat(t, True) for t in texts]
    flux2 = [chat(t, False) for t in texts]
    subset = ["plain", "qwen_specials", "very_long"]
    return {
        "battery": {k: tokenizer(v).input_ids for k, v in BATTERY.items()},
        "random": [[s, tokenizer(s).input_ids] for s in random_strings(3, 300, _ALPHABET + _CLIP_ONLY + _QWEN_ONLY)],
        "chat_zimage": dict(zip(names, zimage)),
        "chat_flux2": dict(zip(names, flux2)),
        "padded_16_zimage": {"names": names, **tokenizer(zimage, padding="max_length", max_length=16, truncation=True)},
        "padded_16_flux2": {"names": names, **tokenizer(flux2, padding="max_length", max_length=16, truncation=True)},
        "padded_512_zimage": {"names": subset, **tokenizer([chat(BATTERY[n], True) for n in subset],
                                                           padding="max_length", max_length=512, truncation=True)},
    }


def prune(full: Path, folder: Path, expected: dict) -> None:
    """The real vocabulary cut down to what `expected`'s ids need: every token that occurs, and
    recursively the two parts of its merge, with the 256 bytes and the added tokens; merges keep
    their order (ids keep their real values). For these texts the ids cannot change: with one merge per token (true of Qwen's
    merges.txt), each merge BPE applies on the full vocabulary builds a part of a token in the
    result, so it is kept, and among the kept pairs present it is still the lowest-ranked."""
    vocab = json.loads((full / "vocab.json").read_text(encoding="utf-8"))
    lines = (full / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    made_by = {a + b: (a, b) for a, b in (line.split(" ") for line in lines)}
    by_id = {i: s for s, i in vocab.items()}
    wanted, stack = set(bytes_to_unicode().values()), []

    def ids_in(node):
        if isinstance(node, dict):
            return [i for v in node.values() for i in ids_in(v)]
        if isinstance(node, list):
            return [i for v in node for i in ids_in(v)]
        return [node] if isinstance(node, int) else []

    stack = [by_id[i] for i in ids_in(expected) if i in by_id]
    while stack:
        s = stack.pop()
        if s not in wanted:
            wanted.add(s)
            stack += made_by.get(s, ())
    merges = [(a, b) for a, b in (line.split(" ") for line in lines) if a + b in wanted]
    config = json.loads((full / "tokenizer_config.json").read_text(encoding="utf-8"))
    specials = [(int(i), t["content"]) for i, t in config["added_tokens_decoder"].items()]
    # the added tokens are listed in vocab.json too: `tokenizers` numbers an added token missing
    # from the vocabulary after it, which would renumber them in a vocabulary with gaps
    kept = {**{s: i for s, i in vocab.items() if s in wanted}, **{t: i for i, t in specials}}
    write_tokenizer_folder(folder, kept, merges, specials)


# ---- models ---------------------------------------------------------------------------------------


def hidden_states(model, ids, mask=None) -> torch.Tensor:
    """Every hidden_states entry, stacked: (N + 1, B, L, D)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return torch.stack(out.hidden_states)


def save_model(model, folder: Path, shards: int, drop_config: tuple[str, ...] = ()) -> None:
    """The hub layout of a text_encoder/ folder: config.json + shards + index json."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # transformers' own config.json and key names
        folder.mkdir(parents=True, exist_ok=True)
        config = json.loads((Path(tmp) / "config.json").read_text())
        save_json(folder / "config.json", {k: v for k, v in config.items() if k not in drop_config})
        save_sharded(folder, "model", load_file(Path(tmp) / "model.safetensors"), shards=shards)


def make_deep(out: Path, tokenizer) -> Qwen3Model:
    model = randomize(Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), **DEEP)), seed=40)
    save_model(model, out / "deep" / "text_encoder", shards=2)
    reloaded = Qwen3Model.from_pretrained(out / "deep" / "text_encoder").eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                           enable_thinking=True) for p in DEEP_PROMPTS]
    batch = tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert 0 < batch.attention_mask.sum(1).min() < batch.attention_mask.sum(1).max() < 24, "want two padded lengths"
    states = hidden_states(model, batch.input_ids, batch.attention_mask)
    nomask = hidden_states(model, batch.input_ids[1:])  # causal only: the pads of row 1 attended
    states_bf16 = hidden_states(copy.deepcopy(model).to(torch.bfloat16), batch.input_ids, batch.attention_mask)
    save(out / "deep" / "io.safetensors", {
        "input_ids": batch.input_ids.to(torch.int32), "attention_mask": batch.attention_mask.to(torch.int32),
        "hidden_states": states, "hidden_states_bf16": states_bf16, "hidden_states_nomask": nomask,
    })
    return model


def make_shallow(out: Path) -> None:
    model = randomize(Qwen3ForCausalLM(Qwen3Config(vocab_size=SHALLOW_VOCAB, **SHALLOW)), seed=41)
    folder = out / "shallow" / "text_encoder"
    save_model(model, folder, shards=1, drop_config=("rope_parameters", "rope_theta", "rope_scaling"))
    reloaded = Qwen3ForCausalLM.from_pretrained(folder).eval()  # the file without a theta reads back
    assert reloaded.config.rope_parameters["rope_theta"] == 10000.0
    assert "lm_head.weight" in load_file(folder / "model-00001-of-00001.safetensors")
    ids = torch.randint(0, SHALLOW_VOCAB, (2, 12), generator=seeded(42))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    save(out / "shallow" / "io.safetensors", {
        "input_ids": ids.to(torch.int32), "attention_mask": mask.to(torch.int32),
        "hidden_states": hidden_states(reloaded.model, ids, mask),
    })


def make_rope(out: Path) -> None:
    model = randomize(Qwen3Model(Qwen3Config(vocab_size=64, **ROPE_WIDE)), seed=43)
    save_model(model, out / "rope" / "text_encoder", shards=1)
    ids = torch.randint(0, 64, (1, 512), generator=seeded(44))
    save(out / "rope" / "io.safetensors", {
        "input_ids": ids.to(torch.int32), "hidden_states": hidden_states(model, ids),
        "inv_freq_128_1e6": model.rotary_emb.inv_freq,
    })


def make_conditioning(out: Path, encoder: Qwen3Model, tokenizer) -> None:
    """What the two pipelines hand their transformers: Z-Image a list of (L_i, D) without pads
    (hidden_states[-2]), FLUX.2 klein (B, L, 3 D) with pads (hidden_states 9, 18, 27)."""
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None)
    with torch.no_grad():
        zimage = pipe._encode_prompt(list(PROMPTS), device=torch.device("cpu"), max_sequence_length=32)
        flux2 = Flux2KleinPipeline._get_qwen3_prompt_embeds(encoder, tokenizer, list(PROMPTS), max_sequence_length=32)
    save(out / "conditioning.safetensors", {
        **{f"zimage_{i}": e for i, e in enumerate(zimage)}, "flux2": flux2,
    })
    save_json(out / "conditioning.json", {"prompts": PROMPTS, "max_sequence_length": 32, "flux2_layers": [9, 18, 27]})


def make_manifests(out: Path) -> None:
    for name, config in (("4b", QWEN3_4B), ("8b", QWEN3_8B)):
        with torch.device("meta"):
            base, causal = Qwen3Model(Qwen3Config(**config)), Qwen3ForCausalLM(Qwen3Config(**config))
        save_json(out / f"manifest_qwen3_{name}_model.json", manifest(base.state_dict()))
        save_json(out / f"manifest_qwen3_{name}_causal_lm.json", manifest(causal.state_dict()))


def make(out: Path) -> None:
    out = out / "qwen3"
    write_small_tokenizer(out / "tokenizer_small")
    small = AutoTokenizer.from_pretrained(out / "tokenizer_small")
    # the same tokenizer in the single-file format of the `tokenizers` library (the hub ships both)
    (out / "tokenizer_small_json").mkdir(parents=True, exist_ok=True)
    small.backend_tokenizer.save(str(out / "tokenizer_small_json" / "tokenizer.json"))
    full = real_tokenizer_folder()
    expected = {"battery": BATTERY, "small": tokenizer_expectations(small),
                "real": tokenizer_expectations(AutoTokenizer.from_pretrained(full))}
    prune(full, out / "tokenizer_real_pruned", expected["real"])
    assert tokenizer_expectations(AutoTokenizer.from_pretrained(out / "tokenizer_real_pruned")) == expected["real"]
    # one line: the ids are most of this file, and save_json's indent would put each on a line of its own
    (out / "tokenizers.json").write_text(json.dumps(expected, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    encoder = make_deep(out, small)
    make_shallow(out)
    make_rope(out)
    make_conditioning(out, encoder, small)
    make_manifests(out)
