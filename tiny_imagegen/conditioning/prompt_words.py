"""A prompt's tokens grouped back into its words, at their rows of the text sequence a denoiser reads.

T5 sentencepiece "▁" starts a word, CLIP's pieces are found in the normalised prompt and start a
word after whitespace (its own "</w>" splits "orange-ish" into three), Qwen's byte-level pieces
start one with a space. Special, template and padding tokens are left out; punctuation joins the
word before it. SD3 reads CLIP and T5 rows side by side in one sequence (`sd3_words`); Qwen-Image
its own template less 34 tokens. Used by the attention maps (attention_maps.py): a word's map is
the sum of its tokens'.
"""

import string
from typing import NamedTuple, Sequence

from ..text.bpe import bytes_to_unicode
from ..text.clip_bpe import CLIPTokenizer, normalize
from ..text.qwen_bpe import USER_TURN, QwenTokenizer, chat_prompt
from ..text.t5_sentencepiece import T5Tokenizer

CLIP_ROWS = 77  # SD3's CLIP rows before T5's in the joint text sequence


class Word(NamedTuple):
    text: str  # as the tokenizer spells it (CLIP lowercases), without surrounding punctuation
    tokens: tuple[int, ...]  # positions in the text sequence the denoiser reads


def group_words(pieces: Sequence[tuple[int, str, bool]]) -> list[Word]:
    """(position, text, starts a new word) for each prompt token, in order -> the words. A piece
    without letters or digits (punctuation) joins the word before it (the first word: the next)."""
    groups: list[tuple[str, list[int]]] = []
    for pos, text, starts in pieces:
        if groups and (not starts or not groups[-1][0].strip()):  # continue (also after a bare "▁")
            groups[-1] = (groups[-1][0] + text, groups[-1][1] + [pos])
        else:
            groups.append((text, [pos]))
    words: list[tuple[str, list[int]]] = []
    carry: list[int] = []
    for text, positions in groups:
        if not any(c.isalnum() for c in text):
            (words[-1][1].extend(positions) if words else carry.extend(positions))
            continue
        words.append((text, carry + positions))
        carry = []
    strip = string.punctuation + string.whitespace
    return [Word(text.strip(strip) or text.strip(), tuple(sorted(p))) for text, p in words]


def t5_pieces(tokenizer: T5Tokenizer, prompt: str, length: int) -> list[tuple[int, str, bool, int]]:
    """(position, text, starts a word, index of the prompt's whitespace-separated word) per piece."""
    ids = tokenizer.encode(prompt)[:-1][: length - 1]  # as __call__ truncates, keeping </s>
    special = set(tokenizer.special.values())
    pieces, k = [], -1
    for i, t in enumerate(ids):
        piece = tokenizer.sp.id_to_piece(t)
        k += piece.startswith("▁")  # sentencepiece: whitespace -> "▁", one per word
        if t not in special:
            pieces.append((i, piece.replace("▁", " ").lstrip(), piece.startswith("▁"), k))
    return pieces


def t5_words(tokenizer: T5Tokenizer, prompt: str, length: int) -> list[Word]:
    """T5 (FLUX.1, tiny-shapes): the prompt's pieces at positions 0.., `</s>` and padding left out."""
    return group_words([p[:3] for p in t5_pieces(tokenizer, prompt, length)])


def clip_pieces(tokenizer: CLIPTokenizer, prompt: str) -> list[tuple[int, str, bool, int]]:
    """(position, text, starts a word, index of the prompt's whitespace-separated word) per piece:
    each piece is found in the normalised prompt and starts a word where whitespace precedes it."""
    ids = tokenizer.encode(prompt)[1:-1][: tokenizer.max_length - 2]
    inverse = {i: s for s, i in tokenizer.vocab.items()}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    text, cursor, pieces, k = normalize(prompt), 0, [], 0
    for pos, t in enumerate(ids, start=1):
        if t in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
            continue
        piece = bytes(byte_of[c] for c in inverse[t].removesuffix("</w>")).decode("utf-8", "replace")
        found = text.find(piece, cursor)
        starts = not pieces or found < 0 or text[cursor:found].isspace() or (found > 0 and text[found - 1] == " ")
        k = k if found < 0 else len(text[: found + 1].split()) - 1
        cursor = cursor if found < 0 else found + len(piece)
        pieces.append((pos, piece, starts, k))
    return pieces


def clip_words(tokenizer: CLIPTokenizer, prompt: str) -> list[Word]:
    """CLIP (SD 1.5): start token at 0, the prompt's pieces after it, end and padding left out.
    CLIP's "</w>" ends a pre-tokenizer word ("orange-ish" is three); words here are the prompt's
    whitespace-separated ones."""
    return group_words([p[:3] for p in clip_pieces(tokenizer, prompt)])


def qwen_words(tokenizer: QwenTokenizer, prompt: str, length: int, template: str | None = None,
               drop: int = 0) -> list[Word]:
    """Qwen: the template's tokens are left out; the prompt's tokens keep their positions in the
    sequence the denoiser reads. Z-Image and FLUX.2: Qwen3's chat template (`template` None), all
    its tokens kept, cut at `length`; Qwen-Image: its system template ("{}" the prompt) less its
    first `drop` tokens (QWEN_IMAGE_DROP), then cut at `length`: position = templated - drop.
    A piece that begins with whitespace starts a word."""
    text = chat_prompt(prompt) if template is None else template.format(prompt)
    before = USER_TURN.split("{prompt}")[0] if template is None else template.split("{}")[0]
    ids = tokenizer.encode(text)
    inverse = {i: s for s, i in tokenizer.vocab.items()}
    added = {i: s for s, i in tokenizer.added_tokens.items()}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    lo = len(before.encode())
    hi = lo + len(prompt.encode())
    pieces, offset = [], 0
    for pos, t in enumerate(ids):
        raw = added[t].encode() if t in added else bytes(byte_of[c] for c in inverse[t])
        if t not in added and lo <= offset and offset + len(raw) <= hi and 0 <= pos - drop < length:
            text = raw.decode("utf-8", "replace")
            pieces.append((pos - drop, text.strip(), not pieces or text[:1].isspace()))
        offset += len(raw)
    return group_words(pieces)


def sd3_words(clip_tokenizer: CLIPTokenizer, t5_tokenizer: T5Tokenizer | None, prompt: str,
              t5_length: int) -> list[Word]:
    """SD3: the joint text sequence is [77 CLIP rows (CLIP-L and bigG side by side, one row per
    token: both tokenize alike); t5_length T5 rows] (conditioning/sd3.py), so a word has tokens in
    both: its CLIP pieces (rows 1..) and its T5 pieces (rows 77 + i), and its map is their sum.
    The two are matched through the prompt's whitespace-separated word each piece lies in (not
    through their spelling: T5 drops what it cannot spell, CLIP lowercases); the words are CLIP's,
    then any that only T5 keeps (CLIP cuts at 77 tokens, T5 at t5_length). Without T5 (`--no-t5`:
    zeros in its rows, no prompt there) the CLIP rows only."""
    clip = clip_pieces(clip_tokenizer, prompt)
    words = group_words([p[:3] for p in clip])
    if t5_tokenizer is None:
        return words
    t5_rows: dict[int, list[int]] = {}  # prompt word index -> T5 rows
    t5 = t5_pieces(t5_tokenizer, prompt, t5_length)
    for pos, _, _, k in t5:
        t5_rows.setdefault(k, []).append(CLIP_ROWS + pos)
    word_of = {pos: k for pos, _, _, k in clip}
    joined = []
    for w in words:
        ks = sorted({word_of[p] for p in w.tokens})
        joined.append(Word(w.text, w.tokens + tuple(r for k in ks for r in t5_rows.pop(k, []))))
    rest = [(CLIP_ROWS + pos, text, starts) for pos, text, starts, k in t5 if k in t5_rows]
    return joined + group_words(rest)


def prompt_words(tokenizer, prompt: str, length: int) -> list[Word]:
    """The words of `prompt` for any of the three tokenizers; `length`: the text sequence length."""
    if isinstance(tokenizer, T5Tokenizer):
        return t5_words(tokenizer, prompt, length)
    if isinstance(tokenizer, CLIPTokenizer):
        return clip_words(tokenizer, prompt)
    if isinstance(tokenizer, QwenTokenizer):
        return qwen_words(tokenizer, prompt, length)
    raise TypeError(f"no word grouping for a {type(tokenizer).__name__}")
