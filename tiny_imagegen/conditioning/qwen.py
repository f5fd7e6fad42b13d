"""Prompts -> Qwen3 hidden states, the way Z-Image and FLUX.2 klein read a prompt.

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
        folder = Path(folder)
        config = Qwen3Config.from_config_json(folder / "text_encoder" / "config.json")
        layers = max(hidden_state_indices(hidden_states, config.num_hidden_layers))
        model = load_qwen3(folder / "text_encoder", dtype, num_layers=min(layers, config.num_hidden_layers))
        if bits:
            from ..checkpoints.quantize import quantize_component

            quantize_component("qwen3", model, bits)
        tokenizer = QwenTokenizer.from_folder(folder / "tokenizer")
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
