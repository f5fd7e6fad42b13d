"""T5's tokenizer: a SentencePiece unigram model (Kudo & Richardson 2018) plus T5's conventions.

SentencePiece does the work: NFKC-style normalisation, whitespace as the `▁` symbol, and the most
likely segmentation of each text into pieces of `spiece.model`. T5 adds (as transformers' T5
tokenizer does; in transformers 5 that is the `tokenizers`-backed class, the former
`T5TokenizerFast`, converted from the same `spiece.model`):

- special tokens written in the text are cut out before SentencePiece sees it: `<pad>` = 0,
  `</s>` = 1, `<unk>` = 2, and the sentinels `<extra_id_0>` ... `<extra_id_99>`, which count down
  from the top of the vocabulary (`<extra_id_i>` = pieces + 99 - i);
- `</s>` is appended; a longer text is cut to `max_length - 1` tokens before it;
- padding with `<pad>` to `max_length` (FLUX: 256 for schnell, 512 for dev), mask 0 on padding.
"""

import json
import re
from pathlib import Path

import mlx.core as mx
import sentencepiece


class T5Tokenizer:
    def __init__(self, model_file: str | Path, max_length: int = 512, extra_ids: int = 100):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"T5 tokenizer: no sentencepiece model at {model_file}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()
        if (self.pad_id, self.eos_id) != (0, 1):
            raise ValueError(f"{model_file}: T5 expects <pad> = 0 and </s> = 1, found {self.pad_id} and {self.eos_id}")
        pieces = self.sp.get_piece_size()
        self.special = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, self.sp.unk_id())}
        self.special.update({f"<extra_id_{i}>": pieces + extra_ids - 1 - i for i in range(extra_ids)})
        # longest first, so that <extra_id_10> is not read as <extra_id_1> followed by "0>"
        self._special_pattern = re.compile("|".join(map(re.escape, sorted(self.special, key=len, reverse=True))))
        self.max_length = max_length

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = 512) -> "T5Tokenizer":
        """A hub tokenizer folder: `spiece.model`, and `extra_ids` from `tokenizer_config.json`."""
        folder = Path(folder)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(folder / "spiece.model", max_length=max_length, extra_ids=config.get("extra_ids", 100))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` followed by `</s>`, neither truncated nor padded."""
        ids, start = [], 0
        for m in self._special_pattern.finditer(text):
            ids += self.sp.encode(text[start : m.start()]) + [self.special[m[0]]]
            start = m.end()
        return ids + self.sp.encode(text[start:]) + [self.eos_id]

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> tuple[mx.array, mx.array]:
        """Token ids and attention mask, both (B, max_length) int32."""
        max_length = max_length or self.max_length
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = [], []
        for prompt in prompts:
            tokens = self.encode(prompt)
            if len(tokens) > max_length:
                tokens = [*tokens[: max_length - 1], self.eos_id]
            padding = max_length - len(tokens)
            ids.append(tokens + [self.pad_id] * padding)
            mask.append([1] * len(tokens) + [0] * padding)
        return mx.array(ids, dtype=mx.int32), mx.array(mask, dtype=mx.int32)
