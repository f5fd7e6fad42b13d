"""Our tokenizers give transformers' ids, token for token (fixtures: tests/reference/text_encoders.py).

T5: ours runs sentencepiece on `spiece.model`; the ids come from transformers 5.24's T5Tokenizer
(the `tokenizers`-backed class, formerly T5TokenizerFast, converted from the same file).
CLIP: ours is clip_bpe.py; the ids come from transformers' CLIPTokenizer, on a small vocabulary
learned for the test and on CLIP's real one (49,408 tokens).
"""

import json
from functools import lru_cache

import pytest

from conftest import fixture_path
from tiny_imagegen.text import CLIPTokenizer, T5Tokenizer

FOLDERS = {"small": ("flux", "tokenizer"), "real": ("clip_vit_l14_tokenizer",)}


@lru_cache(maxsize=1)
def expected() -> dict:
    return json.loads(fixture_path("text_encoders", "tokenizers.json").read_text(encoding="utf-8"))


def t5_tokenizer(**kwargs) -> T5Tokenizer:
    return T5Tokenizer.from_folder(fixture_path("text_encoders", "flux", "tokenizer_2"), **kwargs)


def clip_tokenizer(vocab: str, **overrides) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(fixture_path("text_encoders", *FOLDERS[vocab]), **overrides)


def _mismatches(encode, cases) -> list[str]:
    return [f"{text!r}: ours {encode(text)} != transformers {ids}" for text, ids in cases if encode(text) != ids]


# ---- T5 -------------------------------------------------------------------------------------------


def test_t5_battery():
    cases = [(text, expected()["t5"]["battery"][name]) for name, text in expected()["battery"].items()]
    bad = _mismatches(t5_tokenizer().encode, cases)
    assert not bad, "\n".join(bad)


def test_t5_random_strings():
    cases = expected()["t5"]["random"]
    bad = _mismatches(t5_tokenizer().encode, cases)
    print(f"T5 tokenizer: {len(cases) - len(bad)}/{len(cases)} random strings equal to transformers")
    assert not bad, "\n".join(bad[:5])


@pytest.mark.parametrize("length", [16, 256, 512])
def test_t5_padding_truncation_and_mask(length):
    case = expected()["t5"][f"padded_{length}"]
    ids, mask = t5_tokenizer()([expected()["battery"][n] for n in case["names"]], max_length=length)
    assert ids.shape == (len(case["names"]), length)
    assert ids.tolist() == case["input_ids"]
    assert mask.tolist() == case["attention_mask"]


@pytest.mark.xfail(strict=True, reason="transformers' converted normaliser drops a combining mark or joiner "
                   "after a character NFKC changes (see T5_GRAPHEME_QUIRK in tests/reference/text_encoders.py); "
                   "we keep SentencePiece's normalisation. Strict: if transformers changes, this fails.")
@pytest.mark.parametrize("name", ["trademark_acute", "circled_diaeresis", "nbsp_joiner"])
def test_t5_grapheme_quirk_of_transformers(name):
    text, ids = expected()["t5"]["grapheme_quirk"][name]
    ours = t5_tokenizer().encode(text)
    print(f"{text!r}: ours {ours}, transformers {ids}")
    assert ours == ids


def test_t5_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Tokenizer.from_folder(tmp_path)


# ---- CLIP -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", ["small", "real"])
def test_clip_battery(vocab):
    cases = [(text, expected()["clip"][vocab]["battery"][name]) for name, text in expected()["battery"].items()]
    bad = _mismatches(clip_tokenizer(vocab).encode, cases)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("vocab", ["small", "real"])
def test_clip_random_strings(vocab):
    cases = expected()["clip"][vocab]["random"]
    bad = _mismatches(clip_tokenizer(vocab).encode, cases)
    print(f"CLIP tokenizer ({vocab} vocab): {len(cases) - len(bad)}/{len(cases)} random strings equal to transformers")
    assert not bad, "\n".join(bad[:5])


@pytest.mark.parametrize("vocab", ["small", "real"])
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_padding_truncation_and_mask(vocab, pad):
    case = expected()["clip"][vocab]["padded_77" if pad == "<|endoftext|>" else "padded_77_bang"]
    tokenizer = clip_tokenizer(vocab) if pad == "<|endoftext|>" else clip_tokenizer(vocab, pad_token=pad)
    ids, mask = tokenizer([expected()["battery"][n] for n in case["names"]])
    assert ids.shape == (len(case["names"]), 77)
    assert ids.tolist() == case["input_ids"]
    assert mask.tolist() == case["attention_mask"]
    assert all(row[-1] == tokenizer.eos_id or row[-1] == tokenizer.pad_id for row in ids.tolist())


def test_clip_config_is_read():
    tokenizer = clip_tokenizer("real")
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.max_length) == (49406, 49407, 49407, 77)
    # FLUX's tokenizer_config marks <|startoftext|> (only) as matched in normalised text
    assert tokenizer.encode("<|STARTOFTEXT|>") == [49406, 49406, 49407]


def test_clip_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="pad token '<pad>' is not in the vocabulary"):
        clip_tokenizer("small", pad_token="<pad>")
