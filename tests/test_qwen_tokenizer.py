"""Our Qwen tokenizer (text/qwen_bpe.py) gives transformers' Qwen2Tokenizer ids, token for token
(fixtures: tests/reference/qwen3.py).

Two vocabularies: a small one learned for the test, and Qwen's real one (151,643 tokens rebuilt
from the quicktok wheel). The expected ids were made by transformers on the *full* real
vocabulary; ours reads a pruned copy of it (committed: every token those ids need, with its
merges, real ids and order), which cannot change the ids of these texts (see `prune` in the
maker, which also checks it with transformers). `test_full_real_vocabulary` runs ours on the whole
vocabulary where the maker's cache holds it.
"""

import json
import os
from functools import lru_cache

import pytest

from conftest import TESTS, fixture_path
from tiny_imagegen.text import QwenTokenizer
from tiny_imagegen.text.qwen_bpe import chat_prompt

FOLDERS = {"small": "tokenizer_small", "real": "tokenizer_real_pruned"}


@lru_cache(maxsize=1)
def expected() -> dict:
    return json.loads(fixture_path("qwen3", "tokenizers.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def tokenizer(vocab: str) -> QwenTokenizer:
    return QwenTokenizer.from_folder(fixture_path("qwen3", FOLDERS[vocab]))


def _mismatches(encode, cases) -> list[str]:
    return [f"{text!r}: ours {encode(text)} != transformers {ids}" for text, ids in cases if encode(text) != ids]


@pytest.mark.parametrize("vocab", ["small", "real"])
def test_battery(vocab):
    cases = [(text, expected()[vocab]["battery"][name]) for name, text in expected()["battery"].items()]
    bad = _mismatches(tokenizer(vocab).encode, cases)
    print(f"Qwen tokenizer ({vocab} vocab): {len(cases) - len(bad)}/{len(cases)} battery texts equal to transformers")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("vocab", ["small", "real"])
def test_random_strings(vocab):
    cases = expected()[vocab]["random"]
    bad = _mismatches(tokenizer(vocab).encode, cases)
    print(f"Qwen tokenizer ({vocab} vocab): {len(cases) - len(bad)}/{len(cases)} random strings equal to transformers")
    assert not bad, "\n".join(bad[:5])


@pytest.mark.parametrize("vocab", ["small", "real"])
def test_chat_templates_equal_apply_chat_template(vocab):
    """Ours renders the two shapes; transformers ran a Qwen3-style Jinja template."""
    for name, text in expected()["battery"].items():
        assert chat_prompt(text, enable_thinking=True) == expected()[vocab]["chat_zimage"][name]
        assert chat_prompt(text, enable_thinking=False) == expected()[vocab]["chat_flux2"][name]


@pytest.mark.parametrize("vocab", ["small", "real"])
@pytest.mark.parametrize("case, thinking", [("padded_16_zimage", True), ("padded_16_flux2", False), ("padded_512_zimage", True)])
def test_template_truncation_padding_and_mask(vocab, case, thinking):
    """As the pipelines call it: template, right truncation (the template's tail is lost first),
    right padding with <|endoftext|>."""
    want = expected()[vocab][case]
    length = len(want["input_ids"][0])
    ids, mask = tokenizer(vocab)([expected()["battery"][n] for n in want["names"]], max_length=length, enable_thinking=thinking)
    assert ids.shape == mask.shape == (len(want["names"]), length)
    assert ids.tolist() == want["input_ids"]
    assert mask.tolist() == want["attention_mask"]


def test_real_ids_of_the_templates():
    """Known ids of the real vocabulary (REFERENCE-NOTES-FAMILIES A1/B1)."""
    tok = tokenizer("real")
    assert tok.pad_id == 151643
    assert tok.encode(chat_prompt("", enable_thinking=True)) == [151644, 872, 198, 151645, 198, 151644, 77091, 198]
    assert tok.encode(chat_prompt("", enable_thinking=False))[-4:] == [151667, 271, 151668, 271]
    assert tok.encode("Hello world") == [9707, 1879]
    ids, mask = tok(["a cat", "a"], padding="longest", chat_template=False)
    assert ids.tolist() == [[64, 8251], [64, 151643]] and mask.tolist() == [[1, 1], [1, 0]]


def test_tokenizer_json_reads_the_same():
    """The single-file format of the `tokenizers` library gives the same tokenizer."""
    a, b = tokenizer("small"), QwenTokenizer.from_folder(fixture_path("qwen3", "tokenizer_small_json"))
    assert (a.vocab, a.ranks, a.added_tokens, a.pad_id) == (b.vocab, b.ranks, b.added_tokens, b.pad_id)
    cases = expected()["small"]["random"][:50]
    assert not _mismatches(b.encode, cases)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json nor vocab.json"):
        QwenTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="pad token '<pad>'"):
        QwenTokenizer.from_folder(fixture_path("qwen3", "tokenizer_small"), pad_token="<pad>")
    spec = json.loads(fixture_path("qwen3", "tokenizer_small_json", "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError, match="not Qwen2's"):
        QwenTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="make a symbol the vocabulary lacks"):
        QwenTokenizer({c: i for i, c in enumerate(tokenizer("small")._byte_char.values())}, [("a", "b")], {"<|endoftext|>": 256})
    with pytest.raises(ValueError, match="padding"):
        tokenizer("small")("x", padding="right")


def test_full_real_vocabulary():
    """Ours on the whole rebuilt vocabulary (151,387 merges), where the fixture maker's cache
    holds it (`python tests/make_fixtures.py qwen3` builds it); under CI=true it is built here
    (pip download of the quicktok wheel, ~10 s). The pruned copy above is the check that always runs."""
    import sys

    sys.path.insert(0, str(TESTS))
    from reference._qwen_vocab import cache_dir, real_tokenizer_folder

    folder = cache_dir() / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        if os.environ.get("CI", "").lower() != "true":
            pytest.skip(f"no rebuilt Qwen vocabulary in {folder}; the pruned one was tested")
        folder = real_tokenizer_folder()
    full = QwenTokenizer.from_folder(folder)
    assert len(full.vocab) == 151643 and len(full.ranks) == 151387 and len(full.added_tokens) == 26
    cases = [(t, expected()["real"]["battery"][n]) for n, t in expected()["battery"].items()] + expected()["real"]["random"]
    bad = _mismatches(full.encode, cases)
    print(f"Qwen tokenizer (full real vocab): {len(cases) - len(bad)}/{len(cases)} texts equal to transformers")
    assert not bad, "\n".join(bad[:5])
