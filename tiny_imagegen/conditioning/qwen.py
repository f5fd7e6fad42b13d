"""Prompts -> Qwen3 hidden states, the way Z-Image and FLUX.2 klein read a prompt (and, at the end,
Qwen-Image: Qwen2.5-VL's language model, the same decoder with two switches, in its own template).

Both families tokenize with Qwen's chat template and run Qwen3 with the padding mask; they differ
in the template, in which hidden states they take and in what they do with the padding
(REFERENCE-NOTES-FAMILIES A1, B1; diffusers 0.42.1 `ZImagePipeline._encode_prompt`,
`Flux2KleinPipeline._get_qwen3_prompt_embeds`):

| | template | hidden states | padding |
| --- | --- | --- | --- |
| Z-Image | `enable_thinking=True` (user turn + `<|im_start|>assistant\\n`) | `[-2]`, (B, L, D) | dropped: each prompt its own length |
| FLUX.2 klein | `enable_thinking=False` (+ `<think>\\n\\n</think>\\n\\n`) | `[9] | [18] | [27]` per token, (B, L, 3 D) | kept: all 512 rows go to the transformer |

Both truncate to 512 tokens after the template. Z-Image's pads are dropped and, with causal
attention and right padding, the real tokens' states do not depend on them: so its encoder pads
only to the longest prompt (`keep_padding=False`), which gives the same states in less time.

    encoder = QwenPromptEncoder.zimage("Z-Image-Turbo")      # or .flux2_klein(folder)
    embeds, mask = encoder(["a red cat"])                     # (B, L, D), (B, L) int32
    caption = [embeds[i, : int(mask[i].sum())] for i in range(len(embeds))]
"""

from pathlib import Path
from typing import Sequence

import mlx.core as mx

from ..checkpoints.qwen3 import load_qwen3
from ..models.qwen3 import Qwen3Config, Qwen3Model, hidden_state_indices
from ..text import QwenTokenizer
from ..text.qwen_bpe import chat_prompt

ZIMAGE_HIDDEN_STATES = (-2,)
FLUX2_HIDDEN_STATES = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 512


def load_tokenizer_and_encoder(folder: str | Path, dtype: mx.Dtype | None = None, bits: int | None = None,
                                num_layers: int | None = None) -> tuple[QwenTokenizer, Qwen3Model]:
    """`folder/tokenizer` and `folder/text_encoder` (the first `num_layers` decoder layers, lazily;
    `bits`: 4 or 8 quantizes the decoder's Linears)."""
    model = load_qwen3(Path(folder) / "text_encoder", dtype, num_layers=num_layers)
    if bits:
        from ..checkpoints.quantize import quantize_component

        quantize_component("qwen3", model, bits)
    return QwenTokenizer.from_folder(Path(folder) / "tokenizer"), model


class QwenPromptEncoder:
    def __init__(self, tokenizer: QwenTokenizer, model: Qwen3Model, hidden_states: Sequence[int], enable_thinking: bool,
                 keep_padding: bool, max_length: int = MAX_SEQUENCE_LENGTH):
        self.tokenizer, self.model = tokenizer, model
        self.hidden_states, self.enable_thinking = tuple(hidden_states), enable_thinking
        self.keep_padding, self.max_length = keep_padding, max_length

    @classmethod
    def from_folder(cls, folder: str | Path, hidden_states: Sequence[int], enable_thinking: bool, keep_padding: bool,
                    dtype: mx.Dtype | None = None, bits: int | None = None,
                    max_length: int = MAX_SEQUENCE_LENGTH) -> "QwenPromptEncoder":
        """`folder` holds `tokenizer/` and `text_encoder/` as the hub repos do. Only the decoder
        layers the hidden states need are built and read. `bits`: 4 or 8 quantizes the decoder's
        Linears (the policy of checkpoints/convert.py)."""
        config = Qwen3Config.from_config_json(Path(folder) / "text_encoder" / "config.json")
        layers = max(hidden_state_indices(hidden_states, config.num_hidden_layers))
        tokenizer, model = load_tokenizer_and_encoder(folder, dtype, bits, min(layers, config.num_hidden_layers))
        return cls(tokenizer, model, hidden_states, enable_thinking, keep_padding, max_length)

    @classmethod
    def zimage(cls, folder: str | Path, **kwargs) -> "QwenPromptEncoder":
        return cls.from_folder(folder, ZIMAGE_HIDDEN_STATES, enable_thinking=True, keep_padding=False, **kwargs)

    @classmethod
    def flux2_klein(cls, folder: str | Path, **kwargs) -> "QwenPromptEncoder":
        return cls.from_folder(folder, FLUX2_HIDDEN_STATES, enable_thinking=False, keep_padding=True, **kwargs)

    def __call__(self, prompts: str | list[str]) -> tuple[mx.array, mx.array]:
        """Prompt embeddings (B, L, len(hidden_states) x D) in the model dtype, the hidden states
        concatenated per token, and the mask (B, L) int32 (1 = prompt token). L is max_length
        with keep_padding, else the longest prompt."""
        ids, mask = self.tokenizer(prompts, max_length=self.max_length, enable_thinking=self.enable_thinking,
                                   padding="max_length" if self.keep_padding else "longest")
        states = self.model.hidden_states(ids, mask, indices=self.hidden_states)
        embeds = states[0] if len(states) == 1 else mx.concatenate(states, axis=-1)
        return embeds, mask

    def tokens_cut(self, prompt: str) -> int:
        """How many tokens of the templated prompt the truncation drops (the template's tail goes
        first: past ~500 prompt tokens the model no longer sees `<|im_end|>...assistant`)."""
        return max(0, len(self.tokenizer.encode(chat_prompt(prompt, self.enable_thinking))) - self.max_length)


# ---- Qwen-Image (QwenImagePipeline._get_qwen_prompt_embeds, encode_prompt; QP:174-268) --------------

QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_IMAGE_DROP = 34  # the system block and "<|im_start|>user\n" in the real vocabulary (QP:176)
QWEN_IMAGE_TOKENIZER_MAX = 1024  # the tokenizer keeps DROP + this many tokens (QP:201)


class QwenImagePromptEncoder:
    """prompts -> (embeds (B, L, 3584), mask (B, L) int32 or None), as QwenImagePipeline encodes:

    the whole templated string is tokenized (never the prompt alone: a prompt starting with a
    newline merges with the template's), padded to the longest in the batch and cut at 1058 tokens;
    the language model's `hidden_states[-1]` (after the final norm); per prompt the real rows only,
    less the first 34 (the template's system turn); zero-padded to the longest with a 0/1 mask; cut
    to `max_sequence_length` (512); a mask of all ones is None (no padding: nothing to mask)."""

    def __init__(self, tokenizer: QwenTokenizer, model: Qwen3Model, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        if not 1 <= max_sequence_length <= QWEN_IMAGE_TOKENIZER_MAX:
            raise ValueError(f"Qwen-Image: max_sequence_length must be 1..{QWEN_IMAGE_TOKENIZER_MAX}, "
                             f"got {max_sequence_length}")
        self.tokenizer, self.model, self.max_sequence_length = tokenizer, model, max_sequence_length

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: mx.Dtype | None = None, bits: int | None = None,
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> "QwenImagePromptEncoder":
        """`folder` holds `tokenizer/` and `text_encoder/` (Qwen2.5-VL) as the hub repo does."""
        return cls(*load_tokenizer_and_encoder(folder, dtype, bits), max_sequence_length)

    def __call__(self, prompts: str | list[str]) -> tuple[mx.array, mx.array | None]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [QWEN_IMAGE_TEMPLATE.format(p) for p in prompts]
        ids, mask = self.tokenizer(texts, max_length=QWEN_IMAGE_TOKENIZER_MAX + QWEN_IMAGE_DROP, chat_template=False,
                                   padding="longest")
        hidden = self.model(ids, mask)  # (B, L, D), right-padded
        lengths = [max(0, int(n) - QWEN_IMAGE_DROP) for n in mask.sum(axis=1).tolist()]
        longest = max(lengths)
        rows = [mx.pad(hidden[i, QWEN_IMAGE_DROP : QWEN_IMAGE_DROP + n], [(0, longest - n), (0, 0)])
                for i, n in enumerate(lengths)]
        keep = min(longest, self.max_sequence_length)
        embeds = mx.stack(rows)[:, :keep]
        new_mask = (mx.arange(longest)[None] < mx.array(lengths)[:, None]).astype(mx.int32)[:, :keep]
        return embeds, None if bool(mx.all(new_mask)) else new_mask

    def tokens_cut(self, prompt: str) -> int:
        return qwen_image_tokens_cut(self.tokenizer, prompt, self.max_sequence_length)


def qwen_image_tokens_cut(tokenizer: QwenTokenizer, prompt: str, max_sequence_length: int) -> int:
    """How many of the prompt's embeddings Qwen-Image cuts: by the tokenizer's 1058 and then by
    max_sequence_length (the `<|im_end|>...assistant` tail goes first)."""
    n = len(tokenizer.encode(QWEN_IMAGE_TEMPLATE.format(prompt))) - QWEN_IMAGE_DROP
    return max(0, n - max_sequence_length)
