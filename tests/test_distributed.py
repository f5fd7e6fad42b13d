"""One model across processes (distributed.py), two ranks on this machine over the ring backend,
started by mlx.launch as on two Macs: the tensor-parallel forward equals the whole model's, and a
data-parallel prompt file writes every image exactly once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tiny_imagegen.pipelines.distributed import my_share

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")

SHARDED_FORWARD = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import tiny_imagegen, mlx.core as mx
from tiny_imagegen.pipelines.distributed import init, shard_mmdit
from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig
group = init()
mx.random.seed(0)  # the same weights on every rank
model = MMDiT(MMDiTConfig(in_channels=16, num_heads=4, head_dim=16, depth_double=2, depth_single=2, context_dim=24,
                          vec_dim=8, axes_dim=(4, 6, 6), guidance_embed=True))
mx.eval(model.parameters())
k = mx.random.key(1)
img, txt, y = mx.random.normal((2, 6, 16), key=k), mx.random.normal((2, 5, 24), key=mx.random.key(2)), mx.random.normal((2, 8), key=k)
txt_ids, img_ids = model.position_ids(2, 3, 5)
args = (img, img_ids, txt, txt_ids, mx.array([0.3, 0.7]), y, mx.array([3.5, 3.5]))
"""


SHARDED_QWEN_IMAGE = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import tiny_imagegen, mlx.core as mx
from tiny_imagegen.pipelines.distributed import init, shard_mmdit
from tiny_imagegen.models.qwen_image import QwenImageConfig, QwenImageTransformer
group = init()
mx.random.seed(0)
model = QwenImageTransformer(QwenImageConfig(in_channels=16, out_channels=4, num_heads=4, head_dim=16, depth=2,
                                             context_dim=24, axes_dim=(4, 6, 6)))
mx.eval(model.parameters())
img, txt = mx.random.normal((2, 6, 16), key=mx.random.key(1)), mx.random.normal((2, 5, 24), key=mx.random.key(2))
mask = mx.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the second prompt padded: the key mask crosses the split
args = (img, txt, mx.array([0.3, 0.7]), (2, 3), mask)
"""


# after a script above has built `model` on every rank (the same seed: the same weights) and `args`
SHARD_AND_COMPARE = """
whole = model(*args)
count = lambda: sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
n_whole = count()
shard_mmdit(model, group)
# one file per rank: the ranks share one stdout, where their lines can interleave mid-line
open(f"result-{group.rank()}.txt", "w").write(
    f"{group.rank()} {group.size()} {float(mx.abs(model(*args) - whole).max())} {count() / n_whole}")
"""


def launch(tmp_path, *command, n=2):
    if not Path(LAUNCH).exists():
        pytest.fail("mlx.launch not found beside the Python interpreter (it comes with mlx)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([LAUNCH, "-n", str(n), "--backend", "ring", "--", *command], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)


def test_share_gives_every_item_to_exactly_one_rank():
    for n_items in (0, 1, 5, 8):
        for size in (1, 2, 3):
            shares = [my_share(n_items, r, size) for r in range(size)]
            assert sorted(i for s in shares for i in s) == list(range(n_items))
    with pytest.raises(ValueError):
        my_share(3, 2, 2)


@pytest.mark.parametrize("family", ["flux1", "qwen_image"])
def test_tensor_parallel_forward_equals_the_whole_model(tmp_path, family):
    script = tmp_path / "sharded.py"
    script.write_text((SHARDED_FORWARD if family == "flux1" else SHARDED_QWEN_IMAGE) + SHARD_AND_COMPARE)
    r = launch(tmp_path, sys.executable, str(script))
    results = [f.read_text().split() for f in sorted(tmp_path.glob("result-*.txt"))]
    assert r.returncode == 0 and len(results) == 2, r.stdout + r.stderr
    for rank, size, err, share in results:
        print(f"rank {rank}/{size}: max abs difference to the unsharded forward {float(err):.2e}, "
              f"holds {100 * float(share):.0f}% of the parameters")
        assert float(err) < 1e-5 and size == "2"
        assert float(share) < 0.8  # the block linears are split


def test_data_parallel_prompt_file_writes_every_image_once(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    out = tmp_path / "out" / "img.png"
    out.parent.mkdir()
    r = launch(tmp_path, sys.executable, "-m", "tiny_imagegen", "generate", "--prompt-file", str(prompts),
               "--n-images", "2", "--steps", "2", "--output", str(out), "--distributed", "data")
    assert r.returncode == 0, r.stdout + r.stderr
    wrote = [line.split(" ", 1)[1] for line in r.stdout.splitlines() if line.startswith("wrote ")]
    files = sorted(p.name for p in out.parent.iterdir())
    assert len(files) == 6 and sorted(Path(w).name for w in wrote) == files  # 3 prompts x 2 images, once each
    seeds = sorted((Image.open(out.parent / f).text["prompt"], Image.open(out.parent / f).text["seed"]) for f in files)
    assert len(set(seeds)) == 6
    print(json.dumps(seeds))
