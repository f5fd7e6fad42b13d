"""Tokenizers for the text encoders: CLIP's byte-level BPE (written here) and T5's SentencePiece."""

from .clip_bpe import CLIPTokenizer
from .t5_sentencepiece import T5Tokenizer
