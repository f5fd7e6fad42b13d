"""Reference fixtures for the text encoders and tokenizers: transformers' T5EncoderModel,
CLIPTextModel, T5Tokenizer and CLIPTokenizer, and diffusers' FluxPipeline.encode_prompt.

Writes under out/text_encoders/:
  flux/                      the text half of a FLUX repository, tiny:
    text_encoder/            CLIPTextModel (config.json, model.safetensors with the hub's text_model. prefix)
    text_encoder_2/          T5EncoderModel v1.1 (config.json, 2 shards + model.safetensors.index.json)
    tokenizer/               vocab.json + merges.txt learned here by byte-level BPE, FLUX's json configs
    tokenizer_2/             spiece.model trained here with sentencepiece, FLUX's json configs
  clip_vit_l14_tokenizer/    the real CLIP vocabulary (vocab.json + merges.txt), built from
                             `bpe_simple_vocab_16e6.txt.gz` in the open_clip_torch wheel (pip download)
  tokenizers.json            text -> ids from transformers: a named battery and seeded random strings
  t5.safetensors             relative-position buckets; a padded batch of 2 through the tiny T5
  clip.safetensors           a padded batch of 2 through the tiny CLIP (and two config variants)
                             (both: every layer's output, layer.<i>, and the same run of a
                             bfloat16 copy of the model, keys bf16.*)
  flux_conditioning.safetensors  FluxPipeline.encode_prompt on three prompts, with the T5 mask
  manifest_*.json            key -> shape of the full-size T5-v1.1-XXL encoder and CLIP ViT-L/14 text model

The tokenizer files are made deterministically (a seeded corpus; sentencepiece with one thread
retrains to identical bytes; our BPE learner breaks ties by the pair itself).
"""

import gzip
import json
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import sentencepiece
import torch
from diffusers import FluxPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
from transformers.models.t5.modeling_t5 import T5Attention

from ._common import bf16, manifest, randomize, recording, save, save_json, save_sharded, seeded

T5_PIECES = 128  # sentencepiece vocabulary; the model adds 100 sentinels (<extra_id_i>)
BPE_MERGES = 400
T5_TINY = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
# FLUX's text_encoder/config.json carries the legacy eos_token_id 2 (pooled output at the argmax id)
CLIP_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
OPEN_CLIP_WHEEL = "open_clip_torch==3.3.0"

PROMPTS = [
    "A photo of a cat sitting on a red chair",
    "an astronaut riding a horse on the moon, digital art, trending on artstation, highly detailed, "
    "8k, volumetric light, in the style of a 1970s science fiction paperback cover, muted colours, "
    "film grain, wide angle, dramatic clouds over a crater, tiny earth in the sky",
    "Ein Café in Tōkyō 東京 at 3.14 pm — naïve «anime» style!",
]

BATTERY = {
    "empty": "",
    "space": " ",
    "whitespace_runs": "  a   photo\tof \n\n a  cat  ",
    "unicode_spaces": "a\u3000b\u00a0c\u2003d\u200be",
    "plain": "A photo of a cat sitting on a red chair.",
    "unicode": "東京の夜景、ネオンサイン — café naïve Ünïcödé",
    "compatibility": "ＡＢＣ ①② ﬁ ½ ™ ²",
    "punctuation": "Hello!!! ??? ... --- (x) [y] {z} \"quoted\" 'single' ~@#$%^&*",
    "digits": "1234567890 3.14159 1,000,000 8k 35mm 2024",
    "eos_in_text": "a cat</s> on Mars",
    "eos_only": "</s>",
    "t5_specials": "<pad> hello <unk> <extra_id_0> x <extra_id_99> <extra_id_10>",
    "clip_specials": "a <|endoftext|> b <|startoftext|>c <|STARTOFTEXT|> <|ENDOFTEXT|>~",
    "contractions": "it's don't we're they've I'm you'll he'd IT'S",
    "emoji": "a cat 🐱 with a dog 🐶, 👩‍🚀 🇯🇵 ❤️ 👍🏽",
    "accents": "Crème brûlée à la française, señor, Ærøskøbing, İstanbul, straße, ΟΔΟΣ",
    "long": " ".join(f"word{i}" for i in range(300)),
    "very_long": "an astronaut riding a horse on the moon " * 80,
}
# transformers converts spiece.model's normaliser into one that replaces a whole grapheme cluster
# shorter than 6 bytes by the normalisation of its first mapped prefix: a combining mark or joiner
# after a character NFKC changes is dropped. SentencePiece (T5's own tokenizer, and ours) keeps it.
T5_GRAPHEME_QUIRK = {
    "trademark_acute": "™\u0301 sign",
    "circled_diaeresis": "x ①\u0308 y",
    "nbsp_joiner": "a\u00a0\u200d4b",
}

_ALPHABET = [*"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-_()[]{}<>|/\\@#$%^&*+=~`",
             *"éèêëàâäçñöüßøåæœÉÀÇÑ ΣσςΟΔİ日本語東京猫犬🐱🐶²³½①ＡＢﬁ™\t\n\u00a0\u3000\u2003\u200b",
             "👩‍🚀", "🇫🇷", "'s", "'ll", "</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_10>", "<extra_id_99>",
             "<|endoftext|>", "<|startoftext|>", "<|STARTOFTEXT|>", "<|ENDOFTEXT|>", "</w>", "<|", "|>"]
# combining marks and the zero-width joiner only for CLIP (see T5_GRAPHEME_QUIRK)
_CLIP_ONLY = ["\u0301", "\u0308", "\u200d", "e\u0301", "\ufe0f"]


def random_strings(seed: int, n: int, alphabet: list[str]) -> list[str]:
    r = random.Random(seed)
    return ["".join(r.choice(alphabet) for _ in range(r.randint(0, 40))) for _ in range(n)]


def corpus() -> list[str]:
    """A few thousand seeded prompts to learn the tokenizers' vocabularies from."""
    adjectives = ("red blue tiny huge ancient futuristic glowing misty golden quiet noisy wooden crystal "
                  "velvet café naïve über señor frozen rusty").split()
    nouns = ("cat dog astronaut horse castle forest city robot dragon teapot lighthouse garden river "
             "mountain portrait street photo painting 東京 夜景 ネオン 猫").split()
    verbs = "riding painting watching holding chasing building sleeping dancing flying reading".split()
    places = ("on the moon|in a forest|at night|under the sea|in Paris|by the river|in 1999|on Mars|"
              "at 3.14 pm|in the 21st century").split("|")
    styles = ("digital art|oil painting|photo, 35mm|watercolor|trending on artstation|8k, highly detailed|"
              "sketch — pencil|«anime» style|it's a cat's life").split("|")
    r = random.Random(0)
    return [
        f"{r.choice(['A', 'The', 'An', 'Two', 'Three'])} {r.choice(adjectives)} {r.choice(nouns)} "
        f"{r.choice(verbs)} a {r.choice(adjectives)} {r.choice(nouns)} {r.choice(places)}, {r.choice(styles)}."
        for _ in range(3000)
    ]


# ---- tokenizer files ------------------------------------------------------------------------------


def write_t5_tokenizer(folder: Path) -> None:
    """spiece.model trained on the corpus (T5's ids: <pad> 0, </s> 1, <unk> 2, no <s>), plus
    the json files FLUX's tokenizer_2/ has (without tokenizer.json: transformers converts spiece.model)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "spiece.model", "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus()), model_writer=f, vocab_size=T5_PIECES, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
        )
    extra = [f"<extra_id_{i}>" for i in range(100)]
    save_json(folder / "special_tokens_map.json",
              {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    save_json(folder / "tokenizer_config.json", {
        "additional_special_tokens": extra, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
        "extra_ids": 100, "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
        "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>",
    })


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table (as in CLIP's simple_tokenizer.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(folder: Path, merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt the way CLIP's BPE file becomes the hub's: the 256 byte symbols,
    the same with </w>, one entry per merge, then <|startoftext|> and <|endoftext|> (last)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == len(vocab)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # as in FLUX's tokenizer/: bos/eos/unk as AddedToken dicts with normalized true, pad a plain string
    added = lambda content: {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    save_json(folder / "special_tokens_map.json", {
        "bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
        "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>"),
    })
    save_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": {"__type": "AddedToken", **added("<|startoftext|>")},
        "do_lower_case": True, "eos_token": {"__type": "AddedToken", **added("<|endoftext|>")},
        "errors": "replace", "model_max_length": 77, "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer", "unk_token": {"__type": "AddedToken", **added("<|endoftext|>")},
    })


def learn_bpe(words: Counter, num_merges: int, end_of_word: str = "</w>") -> list[tuple[str, str]]:
    """Sennrich et al.'s BPE learner on byte-level words (`end_of_word` on the last symbol: CLIP's
    </w>, nothing for Qwen's): repeatedly merge the most frequent adjacent pair, ties broken by the
    pair itself (deterministic)."""
    spelled = {tuple([*w[:-1], w[-1] + end_of_word]): c for w, c in words.items()}
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for symbols, count in spelled.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = {}
        for symbols, count in spelled.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        spelled = merged
    return merges


def write_small_clip_tokenizer(folder: Path) -> None:
    """A small CLIP vocabulary: BPE merges learned on the corpus, split into byte-level words by
    transformers' own CLIP normaliser and pre-tokenizer."""
    backend = CLIPTokenizer().backend_tokenizer
    words = Counter()
    for line in corpus():
        words.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)))
    write_clip_tokenizer_files(folder, learn_bpe(words, BPE_MERGES))


def write_real_clip_tokenizer(folder: Path) -> None:
    """CLIP's published BPE (48,894 merges) from the open_clip_torch wheel on the package index."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, OPEN_CLIP_WHEEL],
                       check=True)
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        lines = gzip.decompress(wheel.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # as CLIP's simple_tokenizer.py
    write_clip_tokenizer_files(folder, merges)


def tokenizer_expectations(t5_folder: Path, clip_folder: Path, real_clip_folder: Path) -> dict:
    t5 = T5Tokenizer.from_pretrained(t5_folder)
    clips = {"small": CLIPTokenizer.from_pretrained(clip_folder), "real": CLIPTokenizer.from_pretrained(real_clip_folder)}
    names = list(BATTERY)
    texts = list(BATTERY.values())
    out = {"battery": BATTERY, "t5": {}, "clip": {}}
    out["t5"]["battery"] = {k: t5(v).input_ids for k, v in BATTERY.items()}
    out["t5"]["random"] = [[s, t5(s).input_ids] for s in random_strings(1, 300, _ALPHABET)]
    out["t5"]["grapheme_quirk"] = {k: [v, t5(v).input_ids] for k, v in T5_GRAPHEME_QUIRK.items()}
    batch = t5(texts, padding="max_length", max_length=16, truncation=True)
    out["t5"]["padded_16"] = {"names": names, **batch}
    for length, subset in ((256, ["empty", "plain", "long"]), (512, ["plain", "eos_in_text", "very_long"])):  # schnell, dev
        batch = t5([BATTERY[k] for k in subset], padding="max_length", max_length=length, truncation=True)
        out["t5"][f"padded_{length}"] = {"names": subset, **batch}
    for name, clip in clips.items():
        bang = CLIPTokenizer.from_pretrained(clip_folder if name == "small" else real_clip_folder, pad_token="!")
        out["clip"][name] = {
            "battery": {k: clip(v).input_ids for k, v in BATTERY.items()},
            "random": [[s, clip(s).input_ids] for s in random_strings(2, 300, _ALPHABET + _CLIP_ONLY)],
            "padded_77": {"names": names, **clip(texts, padding="max_length", max_length=77, truncation=True)},
            "padded_77_bang": {"names": names, **bang(texts, padding="max_length", max_length=77, truncation=True)},
        }
    return out


# ---- models ---------------------------------------------------------------------------------------


def make_t5(flux: Path, out: Path) -> T5EncoderModel:
    model = randomize(T5EncoderModel(T5Config(**T5_TINY)), seed=30)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # transformers' own config.json and key names (shared.weight)
        folder = flux / "text_encoder_2"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "config.json", folder / "config.json")
        from safetensors.torch import load_file

        save_sharded(folder, "model", load_file(Path(tmp) / "model.safetensors"), shards=2)
    reloaded = T5EncoderModel.from_pretrained(folder).eval()  # the sharded hub layout reads back
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))

    tokenizer = T5Tokenizer.from_pretrained(flux / "tokenizer_2")
    batch = tokenizer(PROMPTS[:2], padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(batch.input_ids).last_hidden_state  # as FLUX: padding attended to
        masked = model(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    offsets = torch.arange(-1024, 1025)
    buckets = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=128)
    save(out / "t5.safetensors", {
        "input_ids": batch.input_ids.to(torch.int32), "attention_mask": batch.attention_mask.to(torch.int32),
        "hidden_states": plain, "hidden_states_masked": masked,
        "bucket_offsets": offsets.to(torch.int32), "buckets": buckets.to(torch.int32),
        **with_layers(model, "", lambda m: m(batch.input_ids).last_hidden_state),
        **with_layers(bf16(model), "bf16.", lambda m: m(batch.input_ids).last_hidden_state),
    })
    return model


def with_layers(model, prefix: str, run) -> dict[str, torch.Tensor]:
    """`run(model)` (key <prefix>out) and every encoder layer's output (<prefix>layer.<i>)."""
    encoder = getattr(model, "text_model", model).encoder
    layers = encoder.block if hasattr(encoder, "block") else encoder.layers  # T5 : CLIP
    with torch.no_grad(), recording({f"layer.{i}": layer for i, layer in enumerate(layers)}) as seen:
        out = run(model)
    result = {f"{prefix}{k}": v[0] if isinstance(v, tuple) else v for k, v in seen.items()}
    result.update(out if isinstance(out, dict) else {f"{prefix}out": out})
    return result


def make_clip(flux: Path, out: Path) -> CLIPTextModel:
    tokenizer = CLIPTokenizer.from_pretrained(flux / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(tokenizer), **CLIP_TINY)
    model = randomize(CLIPTextModel(config), seed=31)
    folder = flux / "text_encoder"
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "config.json", folder / "config.json")
    # the hub's files (FLUX's text_encoder/model.safetensors) name every tensor under text_model.
    save(folder / "model.safetensors", {"text_model." + k: v for k, v in model.state_dict().items()})
    reloaded = CLIPTextModel.from_pretrained(folder).eval()  # transformers 5 reads the prefixed layout
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))

    batch = tokenizer(PROMPTS[:2], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    tensors = {"input_ids": batch.input_ids.to(torch.int32), "attention_mask": batch.attention_mask.to(torch.int32)}
    with torch.no_grad():
        plain = model(batch.input_ids)  # as FLUX: causal mask only
        masked = model(batch.input_ids, attention_mask=batch.attention_mask)
        tensors.update(hidden_states=plain.last_hidden_state, pooled=plain.pooler_output,
                       hidden_states_masked=masked.last_hidden_state, pooled_masked=masked.pooler_output)
        for prefix, m in (("", model), ("bf16.", bf16(model))):
            tensors.update(with_layers(m, prefix, lambda m, p=prefix: {
                f"{p}{k}": v for k, v in zip(("out", "pooled"), m(batch.input_ids)[:2])}))

        # the same weights under two other configs: exact GELU, and the current pooling rule
        gelu = CLIPTextModel(CLIPTextConfig(**{**config.to_dict(), "hidden_act": "gelu"}))
        gelu.load_state_dict(model.state_dict())
        result = gelu.eval()(batch.input_ids)
        tensors.update(hidden_states_gelu=result.last_hidden_state, pooled_gelu=result.pooler_output)

        first_eos = CLIPTextModel(CLIPTextConfig(**{**config.to_dict(), "eos_token_id": 5}))
        first_eos.load_state_dict(model.state_dict())
        # id 5 stands for the end token; larger ids come before and after it, so that argmax
        # (the legacy rule) would pick another position than the first 5
        ids = torch.randint(6, config.vocab_size, (2, 20), generator=seeded(32))
        ids[0, 7], ids[0, 12], ids[1, 15] = 5, 5, 5
        result = first_eos.eval()(ids)
        tensors.update(input_ids_first_eos=ids.to(torch.int32), pooled_first_eos=result.pooler_output)
    save(out / "clip.safetensors", tensors)
    return model


def make_flux_conditioning(flux: Path, out: Path) -> None:
    """What diffusers' FLUX pipeline hands the transformer, from the folder as it is on disk."""
    pipe = FluxPipeline(
        scheduler=None, vae=None, transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(flux / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(flux / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(flux / "text_encoder_2").eval(),
        tokenizer_2=T5Tokenizer.from_pretrained(flux / "tokenizer_2"),
    )
    with torch.no_grad():
        t5_sequence, clip_pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=32)
    mask = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt").attention_mask
    save(out / "flux_conditioning.safetensors", {
        "t5_sequence": t5_sequence, "t5_mask": mask.to(torch.int32), "clip_pooled": clip_pooled,
    })
    save_json(out / "flux_conditioning.json", {"prompts": PROMPTS, "max_sequence_length": 32})


def make_manifests(out: Path) -> None:
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L14))
    # the meta model lists the tied embedding under both names, shared.weight and encoder.embed_tokens.weight
    save_json(out / "manifest_t5_v1_1_xxl_encoder.json", manifest(t5.state_dict()))
    clip_keys = manifest(clip.state_dict())
    save_json(out / "manifest_clip_vit_l14_text_transformers5.json", clip_keys)
    save_json(out / "manifest_clip_vit_l14_text_hub.json", {"text_model." + k: v for k, v in clip_keys.items()})


def make(out: Path) -> None:
    out = out / "text_encoders"
    flux = out / "flux"
    write_t5_tokenizer(flux / "tokenizer_2")
    write_small_clip_tokenizer(flux / "tokenizer")
    write_real_clip_tokenizer(out / "clip_vit_l14_tokenizer")
    save_json(out / "tokenizers.json",
              tokenizer_expectations(flux / "tokenizer_2", flux / "tokenizer", out / "clip_vit_l14_tokenizer"))
    make_t5(flux, out)
    make_clip(flux, out)
    make_flux_conditioning(flux, out)
    make_manifests(out)
