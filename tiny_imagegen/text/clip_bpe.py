"""CLIP's tokenizer: byte-level byte-pair encoding (Radford et al. 2021; Sennrich et al. 2016).

A prompt becomes token ids in five steps, the same steps as transformers' `CLIPTokenizer`
(5.24, backed by the `tokenizers` library) takes:

1. Special tokens written in the text (start, end, pad and unknown: `<|startoftext|>`,
   `<|endoftext|>`, and SD 2's pad `!`) are cut out first and map straight to their ids (those
   the config marks `normalized` are looked for after step 2, so that FLUX's tokenizer also
   takes `<|STARTOFTEXT|>`).
2. Normalise: Unicode NFC, every whitespace run becomes one space, lowercase (character by
   character, as `tokenizers` does: no Greek final-sigma rule).
3. Split into words: runs of letters, single digits, runs of other symbols, and the English
   contractions 's 't 're 've 'm 'll 'd; whitespace separates and is dropped.
4. Each word's UTF-8 bytes are written as 256 printable stand-in characters (GPT-2's
   `bytes_to_unicode`, text/bpe.py, shared with Qwen's tokenizer), so every string has a spelling in a 512-symbol base alphabet (each byte,
   and each byte followed by the end-of-word marker `</w>`).
5. Byte-pair encoding: starting from single symbols, with `</w>` glued to the last one, the
   adjacent pair that comes earliest in `merges.txt` is merged, everywhere in the word, until no
   listed pair is left. Each resulting symbol is looked up in `vocab.json`.

The ids are framed as `<|startoftext|> ... <|endoftext|>`, truncated so that the end token is
kept, and padded to the context length (77) with the configured pad token (FLUX's tokenizer pads
with `<|endoftext|>`, SD 2's with `!`). Files as the hub ships them: `vocab.json`, `merges.txt`,
and `tokenizer_config.json` / `special_tokens_map.json` for the special tokens.
"""

import json
import re
import unicodedata
from pathlib import Path

import mlx.core as mx

from .bpe import byte_pair_encode, bytes_to_unicode, split_special

SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
SPECIAL_SPELLINGS = ("<|startoftext|>", "<|endoftext|>")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
END_OF_WORD = "</w>"


def normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def _kind(c: str) -> str:
    category = unicodedata.category(c)[0]
    return category if category in "LN" else ("space" if c.isspace() else "other")


def split_words(text: str) -> list[str]:
    """CLIP's word pattern, scanned by hand since Python's `re` has no Unicode classes:
    `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`.
    A special token's spelling, where a match starts with it, is one match (symbols after it
    start a new word); the byte-level step in transformers then splits it into `<|`, its letters
    and `|>`."""
    words, i = [], 0
    while i < len(text):
        kind = _kind(text[i])
        special = next((t for t in SPECIAL_SPELLINGS if text.startswith(t, i)), None)
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if special:
            words += ["<|", special[2:-2], "|>"]
            i += len(special)
            continue
        if contraction:
            j = i + len(contraction)
        elif kind == "space":
            i += 1
            continue
        elif kind == "N":  # digits one at a time
            j = i + 1
        else:  # a run of letters, or a run of symbols that are neither letters, digits nor spaces
            j = i + 1
            while j < len(text) and _kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        max_length: int = 77,
        normalized_special: frozenset[str] = frozenset(),
    ):
        """`normalized_special`: the special tokens that are looked for in the normalised text
        (lowercased: `<|STARTOFTEXT|>` counts) instead of the raw text."""
        for name, token in [("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)]:
            if token not in vocab:
                raise ValueError(f"CLIP tokenizer: {name} token {token!r} is not in the vocabulary")
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id, self.eos_id = vocab[bos_token], vocab[eos_token]
        self.pad_id, self.unk_id = vocab[pad_token], vocab[unk_token]
        special = {t: vocab[t] for t in (bos_token, eos_token, pad_token, unk_token)}
        self.raw_special = {t: i for t, i in special.items() if t not in normalized_special}
        self.normalized_special = {t: i for t, i in special.items() if t in normalized_special}
        self.max_length = max_length
        self._byte_char = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> "CLIPTokenizer":
        """Read `vocab.json` and `merges.txt`, with the special tokens and the context length
        from `special_tokens_map.json` / `tokenizer_config.json` when they are there.
        `overrides` replace any constructor argument (e.g. `pad_token="!"`)."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"CLIP tokenizer: no {name} in {folder}")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges, **_read_config(folder, dict(overrides)))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` between start and end tokens, neither truncated nor padded."""
        ids = []
        for raw, raw_id in split_special(text, self.raw_special):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for piece, special_id in split_special(normalize(raw), self.normalized_special):
                if special_id is not None:
                    ids.append(special_id)
                    continue
                for word in split_words(piece):
                    ids += self._encode_word(word)
        return [self.bos_id, *ids, self.eos_id]

    def __call__(self, prompts: str | list[str]) -> tuple[mx.array, mx.array]:
        """Token ids and attention mask, both (B, max_length) int32: truncated keeping the end
        token, padded with the pad token (mask 0 on padding)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = [], []
        for prompt in prompts:
            tokens = self.encode(prompt)
            if len(tokens) > self.max_length:
                tokens = [*tokens[: self.max_length - 1], self.eos_id]
            padding = self.max_length - len(tokens)
            ids.append(tokens + [self.pad_id] * padding)
            mask.append([1] * len(tokens) + [0] * padding)
        return mx.array(ids, dtype=mx.int32), mx.array(mask, dtype=mx.int32)

    def _encode_word(self, word: str) -> list[int]:
        if word not in self._cache:
            spelled = "".join(self._byte_char[b] for b in word.encode("utf-8"))
            symbols = byte_pair_encode([*spelled[:-1], spelled[-1] + END_OF_WORD], self.ranks)
            self._cache[word] = [self.vocab.get(s, self.unk_id) for s in symbols]
        return self._cache[word]


def _read_config(folder: Path, overrides: dict) -> dict:
    """Constructor arguments from the tokenizer's json files and `overrides`. A special token is a
    string or an {"content": ..., "normalized": ...} dict; as in transformers, a token is matched
    in the normalised text only if every role that names it says `normalized: true` (a plain
    string, or an override, says false)."""
    roles, config = {}, {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            found = json.loads((folder / name).read_text(encoding="utf-8"))
            for role in SPECIAL_ROLES:
                token = found.get(role)
                if isinstance(token, dict):
                    roles[role] = (token["content"], token.get("normalized", False))
                elif token is not None:
                    roles[role] = (token, False)
            length = found.get("model_max_length")
            if isinstance(length, int) and length < 10**6:  # transformers writes 1e30 for "no limit"
                config["max_length"] = length
    roles.update({role: (overrides.pop(role), False) for role in SPECIAL_ROLES if role in overrides})
    config.update({role: content for role, (content, _) in roles.items()})
    contents = {content for content, _ in roles.values()}
    config["normalized_special"] = frozenset(
        c for c in contents if all(normalized for content, normalized in roles.values() if content == c)
    )
    return {**config, **overrides}
