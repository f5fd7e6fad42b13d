"""Qwen tokenizer speed on the real vocabulary, and Qwen3 weight memory, against transformers.

Tokenizer: a 512-token prompt (varied English prompt text with punctuation, digits and a little
CJK; template applied, padded to 512) through ours and transformers' Qwen2Tokenizer (Rust
`tokenizers`), both on the full real vocabulary rebuilt from the quicktok wheel (cached by
tests/reference/_qwen_vocab.py; built on first use, ~10 s). Cold = the word cache emptied
before each call (every word byte-pair encoded), warm = the same prompt again. Median of N runs.

Memory: Qwen3-4B / Qwen3-8B weights in bf16, 8-bit and 4-bit by the converter's policy, computed
from shapes only (nothing is allocated), for all layers and for the layers the pipelines run
(Z-Image: 35, FLUX.2 klein: 27).

Full width (`--full-width 2`): Qwen3-4B's layer shapes with random weights, ours against
transformers in fp32 on 512 tokens (error and time; set LD_PRELOAD to OpenBLAS on Linux).

    python benchmarks/qwen_text.py [--runs 50] [--full-width LAYERS]
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mlx.core as mx  # noqa: E402

from tiny_imagegen.checkpoints.convert import stored_tensors  # noqa: E402
from tiny_imagegen.models.qwen3 import QWEN3_4B, QWEN3_8B, Qwen3Model  # noqa: E402
from tiny_imagegen.text import QwenTokenizer  # noqa: E402
from tiny_imagegen.text.qwen_bpe import chat_prompt  # noqa: E402


def long_prompt(tokenizer: QwenTokenizer, tokens: int = 512, seed: int = 0, pseudo_words: bool = False) -> str:
    """Seeded prompt-like text, grown word by word until it is `tokens` tokens with the template.
    `pseudo_words`: random letter strings instead, nearly all distinct (the worst case for a cold
    word cache: every word is byte-pair encoded, into several tokens each)."""
    r = random.Random(seed)
    pseudo = lambda: "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(3, 10)))
    words = ("a photograph of an old lighthouse on a rocky coast at dusk, waves crashing, dramatic "
             "clouds, golden hour light, 35mm film, shallow depth of field, highly detailed, "
             "the keeper's cottage glows warmly; seagulls circle overhead (three of them) while "
             "a small red boat drifts near the pier in 1987 style 東京 café naïve 8k").split()
    text = ""
    while len(tokenizer.encode(chat_prompt(text))) < tokens:
        text += ("" if not text else " ") + (pseudo() if pseudo_words else r.choice(words))
    return text


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def tokenizer_speed(runs: int) -> None:
    from reference._qwen_vocab import real_tokenizer_folder

    folder = real_tokenizer_folder()
    t = time.perf_counter()
    ours = QwenTokenizer.from_folder(folder)
    load = time.perf_counter() - t
    print(f"ours: loaded in {load:.2f} s")
    try:
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(folder)
    except ImportError:
        theirs = None
    for kind in ("prompt words", "pseudo-words"):
        prompt = long_prompt(ours, pseudo_words=kind == "pseudo-words")
        n = len(ours.encode(chat_prompt(prompt)))

        def cold():
            ours._cache.clear()
            ours([prompt], max_length=512)

        line = (f"{n}-token prompt ({kind}): ours cold {median_ms(cold, runs):.1f} ms, "
                f"warm {median_ms(lambda: ours([prompt], max_length=512), runs):.1f} ms")
        if theirs is not None:
            text = chat_prompt(prompt)
            ids = theirs([text], padding="max_length", max_length=512, truncation=True).input_ids
            assert ids == ours([prompt], max_length=512)[0].tolist(), "ids differ from transformers"
            ms = median_ms(lambda: theirs([text], padding="max_length", max_length=512, truncation=True), runs)
            line += f"; transformers (Rust) {ms:.1f} ms, ids equal"
        print(line)


def memory() -> None:
    for name, config in (("Qwen3-4B", QWEN3_4B), ("Qwen3-8B", QWEN3_8B)):
        for layers in (config.num_hidden_layers, config.num_hidden_layers - 1, 27):
            model = Qwen3Model(config, num_layers=layers)
            sizes = []
            for bits in (None, 8, 4):
                tensors, _ = stored_tensors("qwen3", model, bits, 64, mx.bfloat16)
                sizes.append(sum(v.nbytes for v in tensors.values()) / 2**30)
            print(f"{name}, {layers} layers: bf16 {sizes[0]:.2f} GiB, 8-bit {sizes[1]:.2f} GiB, 4-bit {sizes[2]:.2f} GiB")


def full_width(layers: int, tokens: int = 512) -> None:
    """Qwen3-4B's width (2560, 32/8 heads, head_dim 128, MLP 9728) with `layers` layers and a
    small vocabulary, random weights (transformers' init), fp32: ours against transformers on the
    same weights and 512 tokens (batch 1), error and time (median of 3, after one warm-up)."""
    import dataclasses
    import tempfile

    import torch
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3Model as HFModel

    from tiny_imagegen.checkpoints.qwen3 import load_qwen3

    config = dataclasses.replace(QWEN3_4B, num_hidden_layers=layers, vocab_size=1024)
    torch.manual_seed(0)
    theirs = HFModel(HFConfig(**{k: v for k, v in dataclasses.asdict(config).items() if k != "rope_theta"},
                              rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})).eval()
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = load_qwen3(tmp, mx.float32)
        mx.eval(ours.parameters())
    with torch.no_grad():
        ref = theirs(ids).last_hidden_state.numpy()
        torch_ms = median_ms(lambda: theirs(ids), 4)
    x = mx.array(ids.numpy()).astype(mx.int32)
    run = lambda: mx.eval(ours(x))
    run()
    ours_ms = median_ms(run, 3)
    h = ours(x)
    err = float(mx.abs(h - mx.array(ref)).max())
    print(f"Qwen3-4B width, {layers} layers, {tokens} tokens, fp32: max abs error {err:.2e} (max |h| "
          f"{float(abs(ref).max()):.2f}); ours {ours_ms / 1000:.2f} s, transformers {torch_ms / 1000:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--full-width", type=int, default=0, metavar="LAYERS",
                        help="also compare a Qwen3-4B-wide model of LAYERS layers with transformers (~1 GB per layer)")
    args = parser.parse_args()
    tokenizer_speed(args.runs)
    memory()
    if args.full_width:
        full_width(args.full_width)


if __name__ == "__main__":
    main()
