"""How one `generate` call's images line up: the prompts' conditioning with one row per image, and
one seed per image, so that any image can be made again alone."""

from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_map


@dataclass
class Conditioning:
    """What the denoiser reads of the prompts, one row per image: `positive` and, when guidance
    needs it, `negative` (each a dict of arrays with the batch first). Made by `Pipeline.condition`,
    reusable across `generate` calls."""

    prompts: list[str]
    positive: dict
    negative: dict | None = None

    def rows(self, index: list[int]) -> "Conditioning":
        idx = mx.array(index)
        take = lambda tree: None if tree is None else tree_map(lambda a: a[idx], tree)  # noqa: E731
        return Conditioning([self.prompts[i] for i in index], take(self.positive), take(self.negative))


def expand_seeds(n_prompts: int, n_images: int, seed: int | list[int]) -> list[int]:
    """One seed per output image: image i of a prompt uses seed + i; a list gives each image its
    own (n_images then follows from its length, a multiple of the prompt count)."""
    if isinstance(seed, int):
        return [seed + i for _ in range(n_prompts) for i in range(n_images)]
    if not seed or len(seed) % n_prompts:
        raise ValueError(f"{len(seed)} seeds for {n_prompts} prompts: "
                         "give one seed per image (a multiple of the prompt count), or one int")
    return [int(s) for s in seed]
