"""The real Qwen vocabulary, offline: rebuilt from the rank table in the `quicktok-v1` wheel.

No Qwen tokenizer file is reachable here, but the MIT-licensed `quicktok-v1==0.4.0` wheel on the
package index carries `quicktok/data/qwen3.vocab` (its NOTICE: derived from the Qwen tokenizer,
Apache-2.0; "Qwen2.5 and Qwen3 share the same byte-level BPE"). That file is a binary rank table,
`u32 n`, then n x `(u16 length, bytes, u32 rank)`, where the rank is the token id; `qwen3.special`
is `u32 m`, then m x `(u32 id, u16 length, utf-8)` for the 26 added tokens 151643..151668.

From it we write what the hub's `tokenizer/` folder holds for transformers' Qwen2Tokenizer:
`vocab.json` (GPT-2's byte -> printable character spelling), `merges.txt` and a
`tokenizer_config.json` with the added tokens and a Qwen3-style chat template. A rank table
becomes merges the way tiktoken vocabularies are converted: for each token of more than one byte,
byte-pair-encode its own bytes using only the tokens ranked below it; that ends in two parts,
and (left, right) is the token's merge, listed in rank order: 151,387 merges, the count of
Qwen2's published merges.txt.

Everything is cached under $TINY_IMAGEGEN_CACHE (default ~/.cache/tiny_imagegen)/qwen3-vocab,
the wheel's two data files checked by sha256; nothing of it is committed (the rebuilt folder is
4.7 MB). `real_tokenizer_folder()` downloads (pip, once) and rebuilds when the cache is empty.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

QUICKTOK_WHEEL = "quicktok-v1==0.4.0"
# the cp311 manylinux wheel (sha256 e2a85a1f...c99b); pinned so that any machine fetches the same file
PIP_PLATFORM = ["--only-binary=:all:", "--platform", "manylinux2014_x86_64", "--python-version", "3.11",
                "--implementation", "cp"]
DATA_SHA256 = {
    "qwen3.vocab": "6114087889f61af31f72abe80529bbd09826df4d396753a281a14bcc21abc2fa",
    "qwen3.special": "d3fccd273ee759d3d91c2a73458db4f5738d56e104f8cccfd21cb36f401b020a",
}
# Qwen3's tokenizer_config.json marks these added tokens "special": false (they still are cut out
# of the text before BPE; the flag only matters when decoding with skip_special_tokens)
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}

# A reconstruction of the user / generation-prompt path of Qwen3's chat template (the official one
# ships in the checkpoint's tokenizer_config.json; tools and reasoning-content handling left out).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("TINY_IMAGEGEN_CACHE") or Path.home() / ".cache" / "tiny_imagegen"
    return Path(root) / "qwen3-vocab"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (as in GPT-2's encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def quicktok_data() -> dict[str, bytes]:
    """The wheel's qwen3.vocab and qwen3.special, from the cache or fetched with pip."""
    folder = cache_dir() / "quicktok"
    if not all((folder / name).is_file() for name in DATA_SHA256):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *PIP_PLATFORM, "-d", tmp,
                            QUICKTOK_WHEEL], check=True)
            wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
            for name in DATA_SHA256:
                (folder / name).write_bytes(wheel.read(f"quicktok/data/{name}"))
    data = {name: (folder / name).read_bytes() for name in DATA_SHA256}
    for name, blob in data.items():
        if hashlib.sha256(blob).hexdigest() != DATA_SHA256[name]:
            raise RuntimeError(f"{folder / name}: sha256 differs from the pinned one; delete {folder} and retry")
    return data


def read_rank_table(blob: bytes) -> list[bytes]:
    """Token byte strings indexed by rank (= id)."""
    (n,), offset, tokens = struct.unpack_from("<I", blob, 0), 4, {}
    for _ in range(n):
        (length,) = struct.unpack_from("<H", blob, offset)
        token = blob[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", blob, offset + 2 + length)
        tokens[rank] = token
        offset += 6 + length
    assert offset == len(blob) and sorted(tokens) == list(range(n)), "not a rank table"
    return [tokens[r] for r in range(n)]


def read_specials(blob: bytes) -> list[tuple[int, str]]:
    (m,), offset, out = struct.unpack_from("<I", blob, 0), 4, []
    for _ in range(m):
        token_id, length = struct.unpack_from("<IH", blob, offset)
        out.append((token_id, blob[offset + 6 : offset + 6 + length].decode("utf-8")))
        offset += 6 + length
    return out


def derive_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token: rank-limited BPE of the token's own bytes."""
    rank = {t: r for r, t in enumerate(tokens)}
    merges = []
    for r, token in enumerate(tokens):
        if len(token) == 1:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            ranks = [rank.get(a + b, r) for a, b in zip(parts, parts[1:])]
            i = min(range(len(ranks)), key=ranks.__getitem__)
            assert ranks[i] < r, f"token {r} {token!r} cannot be built from lower-ranked tokens"
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer_folder(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]],
                           specials: list[tuple[int, str]], model_max_length: int = 131072) -> None:
    """vocab.json (without the added tokens, as Qwen's), merges.txt, tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": t not in NOT_SPECIAL} for i, t in specials}
    config = {
        "added_tokens_decoder": added, "bos_token": None, "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": model_max_length, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")


def spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def real_vocabulary() -> tuple[list[bytes], list[tuple[bytes, bytes]], list[tuple[int, str]]]:
    data = quicktok_data()
    tokens = read_rank_table(data["qwen3.vocab"])
    return tokens, derive_merges(tokens), read_specials(data["qwen3.special"])


def real_tokenizer_folder() -> Path:
    """The whole real vocabulary as a hub-style tokenizer folder in the cache (built once)."""
    folder = cache_dir() / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        tokens, merges, specials = real_vocabulary()
        tmp = folder.with_name(f"tokenizer.tmp-{os.getpid()}")
        write_tokenizer_folder(tmp, {spell(t): i for i, t in enumerate(tokens)},
                               [(spell(a), spell(b)) for a, b in merges], specials)
        tmp.rename(folder)
    return folder
