"""Per-word attention maps: where in the image each word of the prompt is attended.

For an MM-DiT (FLUX.1, FLUX.2, Z-Image, SD3.5, Qwen-Image) a map is the joint attention's
probability from each image token (query) to each text token (key) -- SD3.5's second, image-only
attention (MMDiT-X) is not read, Qwen-Image's padded text keys are masked out of the softmax; for a cross-attention model (SD 1.5's U-Net, a DiT with
cross-attention) the cross-attention probability. Either is averaged over heads, over the chosen
blocks and the chosen denoising steps, and laid out on the image's token grid:

    maps[b, y, x, j] = mean over (step, block) of  mean_h softmax_k(q_h(y, x) · k_h(k) / sqrt(d))[j]

with the softmax over every key the query sees (in joint attention the image's own tokens too), so
sum_j maps[b, y, x, j] over all text tokens is the image token's text share of attention (1 for
cross-attention). The U-Net's coarser levels are repeated up to the finest grid before averaging.

Text tokens are then grouped into the prompt's words (prompt_words.py: T5 sentencepiece "▁" starts
a word, CLIP's "</w>" ends one, Qwen's byte-level pieces start one with a space); special, template
and padding tokens are left out, punctuation joins the word before it. A word's map is the sum of
its tokens':
for SD3.5 its CLIP rows and its T5 rows of the joint text sequence [77 CLIP; T5] together
(`sd3_words`); for Qwen-Image its rows after the 34 dropped template tokens.

The read-out (layers/attention.py `reading_out`) runs only inside `generate_with_attention_maps`;
the normal path keeps the fused attention. Its cost: each probed attention call also computes one
head's scores at a time in float32 (B x L_img x L_keys x 4 bytes; FLUX.1 at 1024x1024: 75 MB), the
transformer runs uncompiled, and the collected sums are (B, L_img, L_txt) float32 per token grid
(FLUX.1 1024x1024 with 512 T5 tokens: 8 MB per image; `keep_each` keeps one per block and step).
"""

import inspect
import math
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..layers.attention import reading_out
from ..text.clip_bpe import CLIPTokenizer
from ..text.qwen_bpe import QwenTokenizer
from ..text.t5_sentencepiece import T5Tokenizer
from .prompt_words import (  # noqa: F401  (re-exported: the words are part of this module's API)
    CLIP_ROWS, Word, clip_pieces, clip_words, group_words, prompt_words, qwen_words, sd3_words, t5_pieces, t5_words,
)
from .qwen import QWEN_IMAGE_DROP, QWEN_IMAGE_TEMPLATE, QwenImagePromptEncoder

# ---- collecting during a generation ----------------------------------------------------------------


def token_grid(n_tokens: int, width: int, height: int) -> tuple[int, int]:
    """The (rows, cols) of n_tokens image tokens of a width x height image: square patches of a
    power-of-two side, rounded up as stride-2 convolutions round (the U-Net's coarser levels)."""
    for k in range(12):
        f = 2 ** k
        rows, cols = -(-height // f), -(-width // f)
        if rows * cols == n_tokens:
            return rows, cols
    raise ValueError(f"{n_tokens} image tokens are no power-of-two grid of a {width}x{height} image")


@dataclass
class Recorder:
    """Collection state of one generation; `__call__` is the read-out, `progress` the step clock.

    Each attention call the model makes within a step is one block (numbered in the model's
    order: FLUX's double then single blocks; the U-Net's down, mid, up transformers). Rows beyond
    the images' (the negative prompt of batched guidance) are dropped: the last rows where the
    batch is [negative; positive] (`negative_first`, SD3's order)."""

    width: int
    height: int
    group_sizes: list[int]  # images per micro-batch, in order
    blocks: set[int] | None = None  # None: all
    steps: set[int] | None = None  # None: all
    keep_each: bool = False
    negative_first: bool = False
    sums: dict = field(default_factory=dict)  # grid -> (sum over calls of (B, rows, cols, L), calls)
    each: list = field(default_factory=list)  # (step, block, (B, rows, cols, L)) when keep_each
    _group: int = 0
    _step: int = 0
    _block: int = 0
    _parts: list = field(default_factory=list)  # finished micro-batches' sums

    def __call__(self, probs: mx.array) -> None:  # (B', L_img, L_txt) from layers/attention.py
        block, self._block = self._block, self._block + 1
        if self.blocks is not None and block not in self.blocks:
            return
        if self.steps is not None and self._step not in self.steps:
            return
        n = self.group_sizes[self._group]
        p = np.array(probs[-n:] if self.negative_first else probs[:n], dtype=np.float32)
        p = p.reshape(p.shape[0], *token_grid(p.shape[1], self.width, self.height), p.shape[2])
        total, n = self.sums.get(p.shape[1:3], (0.0, 0))
        self.sums[p.shape[1:3]] = (total + p, n + 1)
        if self.keep_each:
            self.each.append((self._step, block, p))

    def progress(self, done: int, total: int, seconds: float) -> None:
        """Pipeline.run_steps' progress: step `done` - 1 has finished."""
        self._step, self._block = done % total, 0
        if done == total:  # a micro-batch is finished
            self._parts.append(self.sums)
            self.sums, self._group = {}, self._group + 1

    def mean(self) -> np.ndarray:
        """(B, rows, cols, L_txt): the mean over the recorded calls, on the finest grid."""
        out = []
        for sums in self._parts:
            if not sums:
                raise ValueError("no attention was recorded: check the blocks and steps chosen")
            rows, cols = max(sums, key=lambda g: g[0] * g[1])
            acc, calls = 0.0, 0
            for (r, c), (total, n) in sums.items():
                f = -(-rows // r)  # a coarser level's cell covers f x f finest cells (the last ones cropped)
                up = np.repeat(np.repeat(total, f, axis=1), f, axis=2)[:, :rows, :cols]
                acc, calls = acc + up, calls + n
            out.append(acc / calls)
        width = max(o.shape[-1] for o in out)  # text padded per micro-batch (Qwen-Image): zeros beyond
        return np.concatenate([np.pad(o, [(0, 0)] * 3 + [(0, width - o.shape[-1])]) for o in out])


@dataclass
class AttentionMaps:
    prompts: list[str]  # one per image
    maps: np.ndarray  # (B, rows, cols, L_txt) per text token, see the module docstring
    words: list[list[Word]]  # per image
    each: list  # (step, block, (B, rows, cols, L_txt)) when collected with keep_each
    blocks: list[int] | None
    steps: list[int] | None

    def word_maps(self, i: int) -> tuple[list[str], np.ndarray]:
        """Image i's words and their maps (n_words, rows, cols): the sum over each word's tokens."""
        return [w.text for w in self.words[i]], per_word(self.maps[i], self.words[i])


def per_word(maps: np.ndarray, words: list[Word]) -> np.ndarray:
    """(..., L_txt) per token -> (n_words, ...) per word: the sum over each word's tokens."""
    return np.stack([maps[..., list(w.tokens)].sum(-1) for w in words]) if words else np.zeros((0, *maps.shape[:-1]))


def find_tokenizer(pipe):
    """The tokenizer of the text the denoiser reads (T5 for FLUX.1, CLIP for SD 1.5, Qwen)."""
    enc = pipe.text_encoder
    for path in (("tokenizer",), ("encoder", "tokenizer"), ("encoders", "t5_tokenizer")):
        obj = enc
        for name in path:
            obj = getattr(obj, name, None)
        if isinstance(obj, (T5Tokenizer, CLIPTokenizer, QwenTokenizer)):
            return obj
    raise ValueError(f"{pipe.name}: attention maps need a text-conditioned model "
                    "(FLUX.1, FLUX.2, Z-Image, SD 1.5, SD3.5, Qwen-Image)")


def word_reader(pipe):
    """prompt -> its words at their rows of the text sequence `pipe`'s denoiser reads."""
    enc = pipe.text_encoder
    sd3 = getattr(enc, "encoders", None)
    if isinstance(getattr(sd3, "clip_l_tokenizer", None), CLIPTokenizer):  # SD3: CLIP and T5 rows
        options = getattr(enc, "options", {})  # read when called: `condition` sets use_t5 per generation

        def sd3_reader(prompt):
            with_t5 = sd3.t5 is not None and options.get("use_t5", True)
            return sd3_words(sd3.clip_l_tokenizer, sd3.t5_tokenizer if with_t5 else None, prompt, sd3.t5_length)
        return sd3_reader
    qwen_image = getattr(enc, "encoder", None)
    if isinstance(qwen_image, QwenImagePromptEncoder):  # its own template, 34 tokens dropped
        return lambda prompt: qwen_words(qwen_image.tokenizer, prompt, qwen_image.max_sequence_length,
                                         QWEN_IMAGE_TEMPLATE, QWEN_IMAGE_DROP)
    tokenizer = find_tokenizer(pipe)
    return lambda prompt: prompt_words(tokenizer, prompt, pipe.defaults.text_length)


def generate_with_attention_maps(pipe, prompt: str | list[str], *, blocks: Sequence[int] | None = None,
                                 at_steps: Sequence[int] | None = None, keep_each: bool = False, **kwargs):
    """pipe.generate(prompt, **kwargs) -> (images, AttentionMaps). `blocks` / `at_steps`: indices
    of the attention calls within a forward and of the denoising steps to average (None: all).
    Guidance is run batched ([pos; neg] in one forward) so that each step is one forward."""
    if pipe.text_encoder is None:  # released by an earlier generate: re-loaded, as generate would
        pipe.text_encoder = pipe._load_text_encoder()
    words_of = word_reader(pipe)
    if "batch_cfg" in inspect.signature(pipe.sample).parameters:
        kwargs["batch_cfg"] = True
    if prompt is None and kwargs.get("conditioning") is not None:
        prompts = list(kwargs["conditioning"].prompts)
    else:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    seed = kwargs.get("seed", 0)
    n_images = len(seed) // len(prompts) if isinstance(seed, (list, tuple)) else kwargs.get("n_images", 1)
    per_image = [p for p in prompts for _ in range(n_images)]
    d = pipe.defaults
    width, height = kwargs.get("width") or d.width, kwargs.get("height") or d.height
    size = kwargs.get("batch_size") or len(per_image)
    groups = [min(size, len(per_image) - s) for s in range(0, len(per_image), size)]
    rec = Recorder(width, height, groups, None if blocks is None else set(blocks),
                   None if at_steps is None else set(at_steps), keep_each,
                   negative_first=getattr(pipe, "negative_first", False))
    user_progress = kwargs.pop("progress", None)

    def progress(done, total, seconds):
        rec.progress(done, total, seconds)
        if user_progress:
            user_progress(done, total, seconds)

    with reading_out(rec):
        images = pipe.generate(prompt, progress=progress, **kwargs)
    words = [words_of(p) for p in per_image]
    maps = AttentionMaps(per_image, rec.mean(), words, rec.each, None if blocks is None else sorted(blocks),
                         None if at_steps is None else sorted(at_steps))
    return images, maps


# ---- pictures -----------------------------------------------------------------------------------


def colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8: black, purple, orange, yellow (an "inferno"-like ramp, piecewise linear)."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
    t = np.clip(x, 0, 1) * (len(stops) - 1)
    i = np.minimum(t.astype(int), len(stops) - 2)
    w = (t - i)[..., None]
    return (stops[i] * (1 - w) + stops[i + 1] * w).astype(np.uint8)


def overlay(image, heat: np.ndarray, peak: float | None = None, alpha: float = 0.6):
    """A PIL image with a (rows, cols) map over it, scaled to [0, peak] (default: its maximum)."""
    from PIL import Image

    peak = float(heat.max()) if peak is None else peak
    small = Image.fromarray(colormap(heat / max(peak, 1e-12)))
    big = small.resize(image.size, Image.BILINEAR)
    return Image.blend(image.convert("RGB"), big, alpha)


def contact_sheet(image, labels: list[str], heats: np.ndarray, tile: int = 192, columns: int = 6):
    """The image, then one overlay per word, each labelled with the word and its share of the
    image's attention mass; every map is scaled to its own maximum."""
    from PIL import Image, ImageDraw

    base = image.convert("RGB").resize((tile, tile), Image.NEAREST)
    total = max(float(heats.sum()), 1e-12)
    tiles = [(base, "image")] + [(overlay(base, h), f"{w} {h.sum() / total:.0%}") for w, h in zip(labels, heats)]
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 16)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (im, text) in enumerate(tiles):
        x, y = (n % cols) * tile, (n // cols) * (tile + 16)
        sheet.paste(im, (x, y + 16))
        draw.text((x + 3, y + 2), text, fill="black")
    return sheet


def save_word_maps(folder, stem: str, image, maps: AttentionMaps, i: int) -> list:
    """Write image i's maps: `<stem>-<k>-<word>.png` per word (scaled to its own maximum; its share
    of the image's attention to the prompt's words in the PNG text) and `<stem>-sheet.png`."""
    from pathlib import Path

    from PIL.PngImagePlugin import PngInfo

    folder = Path(folder)
    labels, heats = maps.word_maps(i)
    total = max(float(heats.sum()), 1e-12)
    written = []
    for k, (word, heat) in enumerate(zip(labels, heats)):
        info = PngInfo()
        for key, value in (("prompt", maps.prompts[i]), ("word", word), ("share", f"{heat.sum() / total:.4f}"),
                           ("blocks", str(maps.blocks or "all")), ("steps", str(maps.steps or "all"))):
            info.add_text(key, value)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in word)[:40]
        path = folder / f"{stem}-{k:02d}-{safe}.png"
        overlay(image, heat).save(path, pnginfo=info)
        written.append(path)
    sheet = folder / f"{stem}-sheet.png"
    contact_sheet(image, labels, heats).save(sheet)
    return written + [sheet]
