"""What the attention-map read-out costs: peak memory and time of one MM-DiT forward with and
without it, in the same process (docs/attention-maps.md).

A FLUX.1-shaped model cut down in depth and width (random weights: the cost does not depend on
them): `--heads` heads of 128 channels, 2 double and 2 single blocks, a `--size` pixel image
(16 pixels per token) and `--text` text tokens. The read-out adds, per probed block, one head's
scores in float32 at a time and the (B, L_img, L_txt) result; the fused attention is unchanged.

    python benchmarks/attention_maps_memory.py                 # 512x512, 256 text tokens
    python benchmarks/attention_maps_memory.py --size 1024 --text 512
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from tiny_imagegen.conditioning.attention_maps import Recorder  # noqa: E402
from tiny_imagegen.layers.attention import reading_out  # noqa: E402
from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args(argv)
    cfg = MMDiTConfig(num_heads=args.heads, depth_double=2, depth_single=2, context_dim=256, vec_dim=64)
    model = MMDiT(cfg)
    mx.eval(model.parameters())
    g = args.size // 16
    txt_ids, img_ids = model.position_ids(g, g, args.text)
    rope = model.rope_table(img_ids, txt_ids)
    inputs = (mx.random.normal((1, g * g, 64)), img_ids, mx.random.normal((1, args.text, 256)), txt_ids,
              mx.array([0.5]), mx.random.normal((1, 64)))
    mx.eval(rope, *[a for a in inputs if isinstance(a, mx.array)])

    def forward():
        out = model(*inputs, rope=rope)
        mx.eval(out)

    forward()  # warm-up
    rows = []
    for name in ("fused attention only", "with the read-out"):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        start = time.perf_counter()
        if name == "with the read-out":
            rec = Recorder(args.size, args.size, [1])
            with reading_out(rec):
                forward()
        else:
            forward()
        rows.append((name, time.perf_counter() - start, (mx.get_peak_memory() - base) / 2**20))
    scores = g * g * (g * g + args.text) * 4 / 2**20
    print(f"{args.size}x{args.size} px: {g * g} image + {args.text} text tokens, {args.heads} heads x 128, "
          f"2 double + 2 single blocks, float32, {mx.default_device()}")
    print(f"one head's scores in float32: {scores:.1f} MiB; one (L_img, L_txt) map: {g * g * args.text * 4 / 2**20:.1f} MiB")
    print("| forward | seconds | peak above the weights, MiB |\n|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
