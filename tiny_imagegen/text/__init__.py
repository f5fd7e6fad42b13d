"""Tokenizers for the text encoders: CLIP's and Qwen's byte-level BPE (written here, one BPE core) and T5's SentencePiece."""

from .clip_bpe import CLIPTokenizer
from .qwen_bpe import QwenTokenizer
from .t5_sentencepiece import T5Tokenizer
