"""One model across several machines (`mx.distributed`, processes started by `mlx.launch`).

Two ways to use N ranks:

- data parallel (`generate --distributed data`): every rank loads the whole model and makes its
  share of the images of a prompt file, image k going to rank k mod N; the output paths are
  computed from the whole list first, so each image is made once and written once, by its rank.
- tensor parallel (`generate --distributed tensor`, FLUX.1-style MM-DiTs and Qwen-Image): every block's linears
  are split across the ranks as Megatron-LM splits a transformer (Shoeybi et al. 2019) and the MLX
  FLUX example shards its model: q/k/v and the MLP's first linear by output features (each rank
  holds H/N heads and 1/N of the MLP's hidden units, "all-to-sharded"), the attention output and
  the MLP's second linear by input features, summed over the ranks ("sharded-to-all", one
  all-reduce each). A double block thus costs 4 all-reduces (two per stream), a single block 1 (its
  fused linear1 is split per segment: q, k, v and the MLP input; linear2 per segment of its input:
  attention output and MLP hidden). The adaLN modulation, embedders and final layer stay whole on
  every rank (they are ~1/3 of FLUX.1's parameters), so each rank holds ~1/3 + 2/(3N) of the
  transformer. All ranks compute the same image; rank 0 writes it.

    mlx.launch --hostfile hosts.json --backend ring -- tiny-imagegen generate --distributed data --prompt-file p.txt
"""

import mlx.core as mx
from mlx.nn.layers.distributed import shard_linear


def init(backend: str = "ring") -> "mx.distributed.Group":
    """This process's group (a group of 1 when not started by mlx.launch)."""
    return mx.distributed.init(backend=backend)


def my_share(n_items: int, rank: int, size: int) -> list[int]:
    """The item indices rank `rank` of `size` handles: k with k mod size == rank. Over all ranks
    every index appears exactly once."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in 0..{size - 1}")
    return list(range(rank, n_items, size))


def shard_mmdit(model, group: "mx.distributed.Group") -> None:
    """Split the blocks of an MM-DiT across `group`'s ranks, in place: FLUX.1-style (models/mmdit.py,
    axial RoPE: double and single blocks) or Qwen-Image's (models/qwen_image.py: 60 double blocks
    of the same body; its MSRoPE table is one for every head, its text key mask has no head axis)."""
    from ..models.mmdit import MMDiT
    from ..models.qwen_image import QwenImageTransformer

    if not isinstance(model, (MMDiT, QwenImageTransformer)):
        raise ValueError("tensor parallelism is implemented for FLUX.1-style MM-DiTs and Qwen-Image, "
                         f"not {type(model).__name__}")
    n = group.size()
    cfg = model.config
    if cfg.num_heads % n:
        raise ValueError(f"{cfg.num_heads} heads do not split over {n} ranks")
    if getattr(cfg, "rope", "axial") != "axial":
        raise ValueError("tensor parallelism needs axial RoPE (one table for every head)")
    if n == 1:
        return
    D, M = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    for block in model.double_blocks:
        for attn, mlp in ((block.img_attn, block.img_mlp), (block.txt_attn, block.txt_mlp)):
            attn.qkv = shard_linear(attn.qkv, "all-to-sharded", segments=3, group=group)
            attn.proj = shard_linear(attn.proj, "sharded-to-all", group=group)
            attn.num_heads //= n
            mlp.layers[0] = shard_linear(mlp.layers[0], "all-to-sharded", group=group)
            mlp.layers[2] = shard_linear(mlp.layers[2], "sharded-to-all", group=group)
    for block in getattr(model, "single_blocks", []):
        width = 3 * D + M  # linear1's outputs: [q | k | v | MLP input]
        block.linear1 = shard_linear(block.linear1, "all-to-sharded", segments=[D / width, 2 * D / width, 3 * D / width],
                                     group=group)
        block.linear2 = shard_linear(block.linear2, "sharded-to-all", segments=[D / (D + M)], group=group)
        block.num_heads //= n
        block.mlp_hidden //= n
    mx.eval(model.parameters())
