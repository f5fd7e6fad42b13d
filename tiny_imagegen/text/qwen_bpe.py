"""Qwen's tokenizer (Qwen2, Qwen2.5 and Qwen3 share it): byte-level BPE with 151,643 tokens plus
26 added ones, as Z-Image and FLUX.2 klein feed their Qwen3 text encoders.

A prompt becomes ids in the steps transformers 5.24's `Qwen2Tokenizer` takes (backed by the
`tokenizers` library; tokenization_qwen2.py):

1. The chat template is applied (below): the prompt becomes one user turn and the start of the
   assistant's answer.
2. Added tokens written in the text (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<think>`,
   `</think>`, ...) are cut out and map straight to their ids.
3. The rest is NFC-normalised and split into words by Qwen2's pattern
   `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+`:
   a word of letters takes one leading non-letter (usually its space), digits go one at a time,
   symbols keep a leading space and trailing newlines, and whitespace before a word is left
   for it (`\\s+(?!\\S)` stops one short).
4. Each word's UTF-8 bytes are spelled with GPT-2's 256 stand-in characters and byte-pair
   encoded with merges.txt (text/bpe.py, shared with CLIP's tokenizer: here without an
   end-of-word marker); each symbol is looked up in vocab.json.

Nothing is added around the ids (no BOS/EOS). Batches are truncated on the right *after* the
template (a prompt longer than ~500 tokens loses its `<|im_end|>...assistant` tail, as in the
pipelines), then padded on the right with `<|endoftext|>` (151643) to `max_length` (512).

Chat templates: we render only the two shapes the pipelines produce with Qwen3's template, one
user message and the generation prompt, no system prompt:
  Z-Image (`enable_thinking=True`):   `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`
  FLUX.2 klein (`enable_thinking=False`): the same followed by `<think>\\n\\n</think>\\n\\n`.

Python's `re` has no Unicode property classes: \\p{L} and \\p{N} are character classes built
from `unicodedata` (Unicode 14 in Python 3.11; letters assigned since are not letters here), and
\\s is the Unicode White_Space set that `tokenizers` uses (Python's own \\s also takes
U+001C..U+001F).
"""

import json
import re
import unicodedata
from pathlib import Path

import mlx.core as mx

from .bpe import byte_pair_encode, bytes_to_unicode, split_special, unicode_class

# transformers 5.24, models/qwen2/tokenization_qwen2.py (PRETOKENIZE_REGEX), as `tokenizers` reads it
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
PAD_TOKEN = "<|endoftext|>"
MAX_LENGTH = 512  # the pipelines' max_sequence_length
USER_TURN = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
NO_THINKING = "<think>\n\n</think>\n\n"
_WHITESPACE = "".join(re.escape(c) for c in map(chr, range(0x3001)) if c.isspace() and not "\x1c" <= c <= "\x1f")
_CACHE_LIMIT = 100_000  # words remembered, then the cache starts over


def chat_prompt(prompt: str, enable_thinking: bool = True) -> str:
    """Qwen3's chat template for one user message with the generation prompt (see above)."""
    return USER_TURN.format(prompt=prompt) + ("" if enable_thinking else NO_THINKING)


def qwen2_pattern() -> re.Pattern:
    """QWEN2_REGEX for Python's `re`: \\p{L}, \\p{N} and \\s spelled out as character classes."""
    L, N, S = unicode_class("L"), unicode_class("N"), _WHITESPACE
    return re.compile(
        rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\r\n]*"
        rf"|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+"
    )


class QwenTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added_tokens: dict[str, int],
                 pad_token: str = PAD_TOKEN, max_length: int = MAX_LENGTH):
        """vocab: symbol -> id (vocab.json); merges in rank order; added_tokens: content -> id."""
        table = bytes_to_unicode()
        absent = [c for c in table.values() if c not in vocab]
        if absent:
            raise ValueError(f"Qwen tokenizer: {len(absent)} of the 256 byte symbols are not in the vocabulary, e.g. {absent[:3]}")
        bad = [m for m in merges if len(m) != 2 or m[0] + m[1] not in vocab]
        if bad:
            raise ValueError(f"Qwen tokenizer: {len(bad)} merges are malformed or make a symbol the vocabulary lacks, e.g. {bad[:2]}")
        if pad_token not in added_tokens and pad_token not in vocab:
            raise ValueError(f"Qwen tokenizer: pad token {pad_token!r} is neither an added token nor in the vocabulary")
        self.vocab, self.added_tokens = vocab, dict(added_tokens)
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.pad_id = added_tokens.get(pad_token, vocab.get(pad_token))
        self.max_length = max_length
        self._pattern = qwen2_pattern()
        self._byte_char = table
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides) -> "QwenTokenizer":
        """A hub `tokenizer/` folder: `tokenizer.json`, or `vocab.json` + `merges.txt` with the
        added tokens from `tokenizer_config.json`. `overrides` replace constructor arguments."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        if (folder / "tokenizer.json").is_file():
            vocab, merges, added = _read_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
            added = _added_tokens([{"id": int(i), **t} for i, t in config.get("added_tokens_decoder", {}).items()])
        else:
            raise FileNotFoundError(f"Qwen tokenizer: neither tokenizer.json nor vocab.json + merges.txt in {folder}")
        pad = config.get("pad_token") or PAD_TOKEN
        return cls(vocab, merges, added, **{"pad_token": pad["content"] if isinstance(pad, dict) else pad, **overrides})

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as it is (no template, nothing added, neither truncated nor padded)."""
        ids = []
        for piece, added_id in split_special(text, self.added_tokens):
            if added_id is not None:
                ids.append(added_id)
                continue
            for word in self._pattern.findall(unicodedata.normalize("NFC", piece)):
                ids += self._encode_word(word)
        return ids

    def __call__(self, prompts: str | list[str], max_length: int | None = None, *, chat_template: bool = True,
                 enable_thinking: bool = True, padding: str = "max_length") -> tuple[mx.array, mx.array]:
        """Token ids and attention mask, both (B, L) int32, mask 0 on padding.

        Each prompt goes through the chat template (Z-Image: enable_thinking=True; FLUX.2 klein:
        False; `chat_template=False` tokenizes the text as it is), is truncated on the right to
        `max_length` (default 512) and padded on the right with <|endoftext|>: to `max_length`
        (padding="max_length", as both pipelines), or to the longest prompt ("longest")."""
        if padding not in ("max_length", "longest"):
            raise ValueError(f"Qwen tokenizer: padding must be 'max_length' or 'longest', got {padding!r}")
        max_length = max_length or self.max_length
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [chat_prompt(p, enable_thinking) if chat_template else p for p in prompts]
        rows = [self.encode(t)[:max_length] for t in texts]
        length = max_length if padding == "max_length" else max((len(r) for r in rows), default=0)
        ids = [r + [self.pad_id] * (length - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (length - len(r)) for r in rows]
        return mx.array(ids, dtype=mx.int32).reshape(len(rows), length), mx.array(mask, dtype=mx.int32).reshape(len(rows), length)

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            symbols = byte_pair_encode([self._byte_char[b] for b in word.encode("utf-8")], self.ranks)
            ids = [self.vocab[s] for s in symbols]  # every merge result is a token of the vocabulary
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _added_tokens(entries: list[dict]) -> dict[str, int]:
    """content -> id, matched in the raw text (a `normalized` token would be matched after NFC
    by `tokenizers`: the same for ASCII tokens like Qwen's); the stripping kinds are refused."""
    for t in entries:
        flags = [f for f in ("lstrip", "rstrip", "single_word") if t.get(f)]
        if flags:
            raise ValueError(f"Qwen tokenizer: added token {t['content']!r} sets {flags}, which this tokenizer does not support")
    return {t["content"]: t["id"] for t in entries}


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    """The `tokenizers` library's single-file format; refuses a model that is not Qwen2's BPE."""
    spec = _read_json(path)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("ignore_merges") or model.get("end_of_word_suffix"):
        raise ValueError(f"{path}: not a byte-level BPE as Qwen's (model {model.get('type')!r})")
    splits = [p for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", []) if p.get("type") == "Split"]
    patterns = {p.get("pattern", {}).get("Regex") for p in splits}
    if patterns and patterns != {QWEN2_REGEX}:
        raise ValueError(f"{path}: its pre-tokenizer pattern {sorted(patterns)} is not Qwen2's")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges, _added_tokens(spec.get("added_tokens", []))

