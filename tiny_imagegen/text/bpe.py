"""The core of byte-level byte-pair encoding (Sennrich et al. 2016; GPT-2, Radford et al. 2019),
shared by CLIP's tokenizer (clip_bpe.py) and Qwen's (qwen_bpe.py).

- A word's UTF-8 bytes are spelled with 256 printable stand-in characters (`bytes_to_unicode`),
  so vocab.json and merges.txt can list every token as text, whatever bytes it holds.
- `byte_pair_encode`: starting from those symbols, the adjacent pair listed earliest in
  merges.txt is merged, everywhere in the word, until no listed pair is left.
- `split_special`: added tokens written in the text (`<|endoftext|>`, `<|im_start|>`, ...) are cut
  out before any of this and map straight to their ids.
- `unicode_class`: Python's `re` has no `\\p{L}`; the tokenizers' patterns get a character class
  built from `unicodedata` instead.
"""

import re
import sys
import unicodedata
from functools import lru_cache


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: printable
    Latin-1 bytes stand for themselves, the others are shifted to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def byte_pair_encode(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols, the lowest-ranked listed pair first, until none is listed."""
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def split_special(text: str, special: dict[str, int]) -> list[tuple[str, int | None]]:
    """Cut special tokens out of `text`: a list of (piece, None) and (token, id). At each position
    the longest token wins (leftmost-longest, as the `tokenizers` library matches added tokens)."""
    if not special:
        return [(text, None)]
    pieces, start = [], 0
    for m in re.finditer("|".join(map(re.escape, sorted(special, key=len, reverse=True))), text):
        pieces += [(text[start : m.start()], None), (m[0], special[m[0]])]
        start = m.end()
    return [*pieces, (text[start:], None)]


@lru_cache(maxsize=None)
def unicode_class(categories: str) -> str:
    """The inside of a `re` character class holding every code point whose general category
    starts with one of `categories` (e.g. "L" = \\p{L}, "N" = \\p{N}), as ranges: built once from
    this Python's `unicodedata` (Unicode 14 for Python 3.11; the `tokenizers` library's Oniguruma
    tables may be newer, which only matters for characters assigned since)."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] in categories:
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)
