"""Attention maps (attention_maps.py, the read-out in layers/attention.py).

On tiny random models of every text-conditioned family (FLUX.1's MM-DiT, FLUX.2, Z-Image, SD 1.5's
U-Net, a DiT with cross-attention) the recorded maps equal the attention probabilities computed
naively in numpy from the same q and k (captured at the read-out), and sum over the text tokens to
the image tokens' text share of attention (1 for cross-attention). Words are grouped per tokenizer,
special, template and padding tokens left out. On the shipped tiny-shapes model the pipeline-level
API leaves the image unchanged and averages what it keeps per block and step.
"""

import mlx.core as mx
import numpy as np
import pytest

from conftest import fixture_path
from tiny_imagegen.conditioning import attention_maps as am
from tiny_imagegen.layers import attention as attn
from tiny_imagegen.text import CLIPTokenizer, QwenTokenizer, T5Tokenizer

# ---- the read-out against numpy --------------------------------------------------------------------


def naive(q, k, span, key_mask=None) -> np.ndarray:
    """mean_h softmax(q k^T / sqrt(d)) over all keys, rows span.image, columns span.text, in float64."""
    q, k = np.array(q, np.float64), np.array(k, np.float64)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)  # grouped-query heads
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = np.where(np.array(key_mask)[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p[:, :, span.image][..., span.text].mean(1), p[:, :, span.image].mean(1)


def test_text_attention_equals_numpy():
    keys = mx.random.split(mx.random.key(0), 3)
    q, k = mx.random.normal((2, 4, 13, 8), key=keys[0]) * 2, mx.random.normal((2, 2, 13, 8), key=keys[1]) * 2
    mask = mx.array(np.arange(13)[None] < np.array([[13], [9]]))  # the second row: 4 keys of batch padding
    span = attn.TextSpan(slice(5, None), slice(0, 5))
    got = np.array(attn.text_attention(q, k, span, 8 ** -0.5, mask))
    want, _ = naive(q, k, span, mask)
    err = np.abs(got - want).max()
    print(f"text_attention vs numpy: max |diff| = {err:.2e}")
    assert got.shape == (2, 8, 5) and err < 1e-6


def test_normal_path_reads_nothing_out():
    seen = []
    q = mx.random.normal((1, 2, 6, 4))
    attn.attention(q, q, q, span=attn.TextSpan(slice(2, None), slice(0, 2)))
    with attn.reading_out(seen.append):
        attn.attention(q, q, q)  # no span: not a text-conditioned call
        attn.attention(q, q, q, span=attn.TextSpan(slice(2, None), slice(0, 2)))
    attn.attention(q, q, q, span=attn.TextSpan(slice(2, None), slice(0, 2)))
    assert len(seen) == 1 and seen[0].shape == (1, 4, 2) and not attn.reading_out_active()


# ---- every family: recorded maps = numpy from the same q/k ---------------------------------------


def _flux1():
    from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig

    m = MMDiT(MMDiTConfig(in_channels=16, num_heads=2, head_dim=16, depth_double=2, depth_single=1,
                          context_dim=24, vec_dim=8, axes_dim=(4, 6, 6)))
    gh, gw, n_txt = 3, 4, 5
    txt_ids, img_ids = m.position_ids(gh, gw, n_txt)
    g = mx.random.normal
    run = lambda: m(g((1, gh * gw, 16)), img_ids, g((1, n_txt, 24)), txt_ids, mx.array([0.7]), g((1, 8)))  # noqa: E731
    return run, (64, 48), [(gh, gw)] * 3, attn.TextSpan(slice(n_txt, None), slice(0, n_txt)), False


def _flux2():
    from tiny_imagegen.models.flux2 import Flux2Config, Flux2Transformer

    m = Flux2Transformer(Flux2Config(in_channels=16, num_heads=2, head_dim=32, depth_double=1, depth_single=2,
                                     context_dim=24, axes_dim=(8, 8, 8, 8)))
    gh, gw, n_txt = 4, 3, 6
    txt_ids, img_ids = m.position_ids(gh, gw, n_txt)
    g = mx.random.normal
    run = lambda: m(g((1, gh * gw, 16)), img_ids, g((1, n_txt, 24)), txt_ids, mx.array([0.4]))  # noqa: E731
    return run, (48, 64), [(gh, gw)] * 3, attn.TextSpan(slice(n_txt, None), slice(0, n_txt)), False


def _zimage():
    from tiny_imagegen.models.zimage import ZImageConfig, ZImageTransformer

    m = ZImageTransformer(ZImageConfig(dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=24,
                                       axes_dims=(4, 6, 6), axes_lens=(128, 32, 32)))
    H, W = 6, 8  # latents: a 3 x 4 token grid of 12 tokens, padded to 32; captions of 5 and 40 rows
    cap = mx.random.normal((2, 40, 24))
    run = lambda: m(mx.random.normal((2, H, W, 16)), mx.array([0.3, 0.3]), cap, [5, 40])  # noqa: E731
    return run, (64, 48), [(3, 4)] * 2, attn.TextSpan(slice(0, 12), slice(32, None)), False


def _unet():
    from tiny_imagegen.models.unet import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_heads=(2, 2),
                     cross_attention_dim=12, norm_num_groups=8)
    m = UNet2DConditionModel(cfg)
    run = lambda: m(mx.random.normal((1, 6, 10, 4)), 500, mx.random.normal((1, 7, 12)))  # noqa: E731
    # cross-attention at level 0 (down: 1, up: 2 layers) and the middle, a 3 x 5 grid
    return run, (80, 48), [(6, 10), (3, 5), (6, 10), (6, 10)], attn.CROSS, True


def _dit_cross():
    from tiny_imagegen.models.dit import DiT, DiTConfig

    m = DiT(DiTConfig(sample_size=8, num_heads=2, head_dim=16, depth=2, out_channels=None, num_classes=None,
                      text_dim=12, context_dim=10, conditioning="cross-attention"))
    run = lambda: m(mx.random.normal((1, 8, 6, 4)), mx.array([300]), mx.random.normal((1, 12)),  # noqa: E731
                    mx.random.normal((1, 5, 10)))
    return run, (48, 64), [(4, 3)] * 2, attn.CROSS, True


def _sd3():
    from tiny_imagegen.models.sd3 import SD3Config, SD3Transformer

    # blocks 0 and 1 MMDiT-X (a second, image-only attention: not read), block 2 pre-only text
    m = SD3Transformer(SD3Config(num_heads=2, head_dim=16, depth=3, context_dim=24, pooled_dim=8, pos_embed_max_size=8,
                                 sample_size=8, dual_attention_layers=(0, 1)))
    m.pos_embed = mx.random.normal(m.pos_embed.shape)
    n_txt = 5  # latents 6 x 8: a 3 x 4 token grid, joined [image; text]
    run = lambda: m(mx.random.normal((1, 6, 8, 16)), mx.random.normal((1, n_txt, 24)), mx.array([0.6]),  # noqa: E731
                    mx.random.normal((1, 8)))
    return run, (64, 48), [(3, 4)] * 3, attn.TextSpan(slice(0, 12), slice(12, None)), False


def _qwen_image():
    from tiny_imagegen.models.qwen_image import QwenImageConfig, QwenImageTransformer

    m = QwenImageTransformer(QwenImageConfig(in_channels=16, out_channels=4, num_heads=2, head_dim=16, depth=2,
                                             context_dim=24, axes_dim=(4, 6, 6)))
    gh, gw, n_txt = 3, 5, 7  # two prompts of 7 and 4 text rows, the second padded (masked keys)
    mask = mx.array(np.arange(n_txt)[None] < np.array([[7], [4]]))
    run = lambda: m(mx.random.normal((2, gh * gw, 16)), mx.random.normal((2, n_txt, 24)), mx.array([0.5, 0.5]),  # noqa: E731
                    (gh, gw), mask)
    return run, (80, 48), [(gh, gw)] * 2, attn.TextSpan(slice(n_txt, None), slice(0, n_txt)), False


FAMILIES = {"flux1": _flux1, "flux2": _flux2, "zimage": _zimage, "sd15-unet": _unet, "dit-cross": _dit_cross,
            "sd3.5": _sd3, "qwen-image": _qwen_image}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_maps_equal_numpy_attention(monkeypatch, family):
    mx.random.seed(0)
    run, (width, height), grids, span, cross = FAMILIES[family]()
    captured, real = [], attn._read_out
    monkeypatch.setattr(attn, "_read_out", lambda q, k, s, key_mask=None: (
        s is not None and captured.append((q, k, key_mask)), real(q, k, s, key_mask))[1])
    rec = am.Recorder(width, height, group_sizes=[99], keep_each=True)
    with attn.reading_out(rec):
        mx.eval(run())
    n_calls = len(grids)
    assert len(captured) == len(rec.each) == n_calls, f"{len(captured)} probed calls, {len(rec.each)} kept"
    worst, worst_share = 0.0, 0.0
    for (q, k, key_mask), (_, block, got), (rows, cols) in zip(captured, rec.each, grids):
        want, all_keys = naive(q, k, span, key_mask)  # (B, L_img, L_txt), (B, L_img, L_all)
        assert got.shape == (want.shape[0], rows, cols, want.shape[2]), (got.shape, want.shape)
        worst = max(worst, np.abs(got.reshape(want.shape) - want).max())
        if key_mask is not None:  # padded text keys: exactly no attention
            padded = ~np.array(key_mask)[:, span.text]  # (B, L_txt)
            assert np.all(got.reshape(want.shape).transpose(0, 2, 1)[padded] == 0)
        text_share = want.sum(-1)  # the image tokens' share of attention on the text keys
        worst_share = max(worst_share, np.abs(got.sum(-1).reshape(text_share.shape) - text_share).max())
        if cross:
            assert np.allclose(text_share, 1.0, atol=1e-6)
        else:
            assert text_share.max() < 1 - 1e-3  # joint attention: the image also attends to itself
            assert np.allclose(all_keys.sum(-1), 1.0, atol=1e-9)
    print(f"{family}: {n_calls} calls, max |maps - numpy| = {worst:.2e}, max |sum over text - text share| = "
          f"{worst_share:.2e}")
    assert worst < 2e-6 and worst_share < 2e-6


def test_sd3_second_attention_is_not_read(monkeypatch):
    """SD3.5's MMDiT-X blocks attend twice; only the joint attention (with text) is read."""
    mx.random.seed(0)
    run = _sd3()[0]
    spans, real = [], attn._read_out
    monkeypatch.setattr(attn, "_read_out", lambda q, k, s, key_mask=None: (spans.append(s), real(q, k, s, key_mask))[1])
    with attn.reading_out(lambda p: None):
        mx.eval(run())
    assert [s is None for s in spans] == [False, True, False, True, False]  # blocks 0, 1: joint, then image-only


def test_coarser_levels_are_repeated_onto_the_finest_grid():
    rec = am.Recorder(width=40, height=24, group_sizes=[1])  # tokens of 8 pixels: 3 x 5; of 16: 2 x 3
    fine, coarse = np.random.default_rng(0).random((1, 15, 2)), np.random.default_rng(1).random((1, 6, 2))
    rec(mx.array(fine, mx.float32))
    rec(mx.array(coarse, mx.float32))
    rec.progress(1, 1, 0.0)
    up = np.repeat(np.repeat(coarse.reshape(1, 2, 3, 2), 2, 1), 2, 2)[:, :3, :5]
    assert np.allclose(rec.mean(), (fine.reshape(1, 3, 5, 2) + up) / 2)


def test_blocks_steps_and_negative_rows():
    rec = am.Recorder(width=32, height=32, group_sizes=[1, 2], blocks={1}, steps={0}, keep_each=True)
    for images in (1, 2):
        for step in range(2):
            for block in range(3):  # each map is 100 * step + 10 * block + image row, negative rows -1
                rows = [100 * step + 10 * block + r for r in range(images)] + [-1] * images
                rec(mx.array(np.array(rows, np.float32)[:, None, None] * np.ones((1, 4, 2), np.float32)))
            rec.progress(step + 1, 2, 0.0)
    assert [(s, b) for s, b, _ in rec.each] == [(0, 1), (0, 1)]
    assert rec.mean()[:, 0, 0, 0].tolist() == [10.0, 10.0, 11.0]


# ---- words ---------------------------------------------------------------------------------------

PROMPT = "a Red square, to the left of an orange-ish triangle!  (very) blue"
WORDS = ["a", "red", "square", "to", "the", "left", "of", "an", "orange-ish", "triangle", "very", "blue"]


def _texts(words):
    return [w.text.lower() for w in words]


def test_group_words_joins_pieces_and_punctuation():
    pieces = [(0, "(", True), (1, "or", False), (2, "ange", False), (3, ",", False), (4, "sq", True), (5, "uare", False),
              (6, "!", True), (7, "", True), (8, "red", False)]
    assert am.group_words(pieces) == [am.Word("orange", (0, 1, 2, 3)), am.Word("square", (4, 5, 6)),
                                      am.Word("red", (7, 8))]


def test_t5_words():
    tok = T5Tokenizer.from_folder(fixture_path("text_encoders", "flux", "tokenizer_2"))
    words = am.t5_words(tok, "a red square, to the left of a blue circle", length=64)
    assert _texts(words) == ["a", "red", "square", "to", "the", "left", "of", "a", "blue", "circle"]
    ids = tok.encode("a red square, to the left of a blue circle")
    used = sorted(p for w in words for p in w.tokens)
    assert used == list(range(len(ids) - 1))  # every piece but </s>; the padding beyond never
    short = am.t5_words(tok, "a red square to the left of a blue circle", length=6)
    assert max(p for w in short for p in w.tokens) == 4  # truncated as the tokenizer truncates


@pytest.mark.parametrize("vocab", [("flux", "tokenizer"), ("clip_vit_l14_tokenizer",)])
def test_clip_words(vocab):
    tok = CLIPTokenizer.from_folder(fixture_path("text_encoders", *vocab))
    words = am.clip_words(tok, PROMPT)
    assert _texts(words) == WORDS
    ids = tok.encode(PROMPT)
    assert min(words[0].tokens) == 1 and max(words[-1].tokens) == len(ids) - 2  # start and end tokens left out
    assert sorted(p for w in words for p in w.tokens) == list(range(1, len(ids) - 1))


@pytest.mark.parametrize("vocab", ["tokenizer_small", "tokenizer_real_pruned"])
def test_qwen_words(vocab):
    tok = QwenTokenizer.from_folder(fixture_path("qwen3", vocab))
    words = am.qwen_words(tok, PROMPT, 512)
    assert _texts(words) == WORDS
    prefix = len(tok.encode("<|im_start|>user\n"))
    n = len(tok.encode(PROMPT))
    assert sorted(p for w in words for p in w.tokens) == list(range(prefix, prefix + n))  # template left out


# ---- the pipeline API on the shipped tiny-shapes model -------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from tiny_imagegen.pipelines import Pipeline

    return Pipeline.from_pretrained("weights/tiny-shapes", progress=False)


def test_pipeline_maps_on_tiny_shapes(tiny):
    prompt = "a red square to the left of a blue circle"
    plain = tiny.generate(prompt, seed=3, steps=4)
    images, maps = am.generate_with_attention_maps(tiny, prompt, seed=3, steps=4, keep_each=True)
    assert np.array_equal(np.asarray(images[0]), np.asarray(plain[0]))  # the read-out changes nothing
    assert maps.maps.shape == (1, 8, 8, 16)  # 64 px, 8 px per token; 16 T5 tokens
    assert _texts(maps.words[0]) == prompt.split()
    assert len(maps.each) == 4 * 4  # 4 steps x (2 double + 2 single blocks)
    assert np.allclose(maps.maps, np.mean([p for _, _, p in maps.each], axis=0), atol=1e-6)
    assert 0 < maps.maps.sum(-1).min() and maps.maps.sum(-1).max() < 1
    labels, per_word = maps.word_maps(0)
    assert labels == prompt.split() and per_word.shape == (10, 8, 8)
    _, chosen = am.generate_with_attention_maps(tiny, prompt, seed=3, steps=4, blocks=[0, 3], at_steps=[1, 2])
    kept = [p for s, b, p in maps.each if b in (0, 3) and s in (1, 2)]
    assert np.allclose(chosen.maps, np.mean(kept, axis=0), atol=1e-6)


def test_generate_command_writes_word_maps(tmp_path, capsys):
    from tiny_imagegen.commands.generate import main

    out, maps = tmp_path / "img.png", tmp_path / "maps"
    assert main(["--model", "weights/tiny-shapes", "--prompt", "a blue circle above a green square", "--seed", "2",
                 "--steps", "3", "--output", str(out), "--attention-maps", str(maps), "--attention-blocks", "0,1"]) == 0
    from PIL import Image

    names = sorted(p.name for p in maps.iterdir())
    assert names == [f"img-{k:02d}-{w}.png" for k, w in enumerate("a blue circle above a green square".split())] + \
        ["img-sheet.png"]
    info = Image.open(maps / "img-01-blue.png").text
    assert info["word"] == "blue" and info["blocks"] == "[0, 1]" and 0 < float(info["share"]) < 1
    assert main(["--model", "weights/tiny-shapes", "--prompt", "x", "--output", str(tmp_path / "b.png"),
                 "--attention-maps", str(maps), "--attention-steps", "1,x"]) == 2
    assert "--attention-steps takes comma-separated indices" in capsys.readouterr().err


def test_sd3_words_join_clip_and_t5_rows():
    """SD3's maps index the joint text sequence [77 CLIP rows; T5 rows]: a word is its CLIP pieces
    and its T5 pieces, matched by the prompt word they lie in; without T5 its CLIP pieces only."""
    repo = fixture_path("sd3_pipeline", "repo")
    clip, t5 = CLIPTokenizer.from_folder(repo / "tokenizer"), T5Tokenizer.from_folder(repo / "tokenizer_3")
    words = am.sd3_words(clip, t5, PROMPT, t5_length=64)
    assert _texts(words) == WORDS
    clip_rows = [p for p in am.clip_pieces(clip, PROMPT)]
    t5_rows = [am.CLIP_ROWS + p for p, *_ in am.t5_pieces(t5, PROMPT, 64)]
    used = sorted(p for w in words for p in w.tokens)
    assert used == sorted([p for p, *_ in clip_rows] + t5_rows)  # every piece of both, once; no special, no padding
    for w in words:  # each word has rows in both parts
        clip_part, t5_part = [p for p in w.tokens if p < 77], [p for p in w.tokens if p >= 77]
        assert clip_part and t5_part, w
    raw = PROMPT.split()  # the whitespace-separated words the pieces are matched through
    for w in words:
        k = WORDS.index(w.text.lower())
        t5_part = [text for pos, text, _, j in am.t5_pieces(t5, PROMPT, 64) if am.CLIP_ROWS + pos in w.tokens]
        assert all(text in raw[k] for text in t5_part), (w, t5_part)
    short = am.sd3_words(clip, t5, PROMPT, t5_length=6)  # T5 cut after 5 pieces: later words CLIP-only
    assert _texts(short) == WORDS and max(p for w in short for p in w.tokens if p >= 77) == 77 + 4
    assert am.sd3_words(clip, None, PROMPT, 64) == am.clip_words(clip, PROMPT)


def test_qwen_image_words_follow_its_template_and_drop():
    """Qwen-Image reads its system template's hidden states less the first 34 tokens: a word's rows
    are its templated positions - 34; the template's tail (<|im_end|>... assistant) is left out."""
    from tiny_imagegen.conditioning.qwen import QWEN_IMAGE_DROP, QWEN_IMAGE_TEMPLATE

    for vocab in (fixture_path("qwen_image_pipeline", "repo", "tokenizer"), fixture_path("qwen3", "tokenizer_real_pruned")):
        tok = QwenTokenizer.from_folder(vocab)
        words = am.qwen_words(tok, PROMPT, 512, QWEN_IMAGE_TEMPLATE, QWEN_IMAGE_DROP)
        assert _texts(words) == WORDS
        start = len(tok.encode(QWEN_IMAGE_TEMPLATE.split("{}")[0])) - QWEN_IMAGE_DROP
        n = len(tok.encode(PROMPT))
        assert sorted(p for w in words for p in w.tokens) == list(range(start, start + n))
        cut = am.qwen_words(tok, PROMPT, start + 3, QWEN_IMAGE_TEMPLATE, QWEN_IMAGE_DROP)  # max_sequence_length
        assert sorted(p for w in cut for p in w.tokens) == list(range(start, start + 3))


# ---- SD3.5 and Qwen-Image pipelines (the tiny random repos of their parity tests) -----------------


def _sd3_pipe():
    from tiny_imagegen.pipelines import Pipeline

    pipe = Pipeline.from_pretrained(str(fixture_path("sd3_pipeline", "repo")), keep_text_encoders=True)
    pipe.text_encoder.encoders.t5_length = 16
    return pipe


def test_sd3_pipeline_maps():
    """Batched CFG is [negative; positive]: the maps are the positive rows; the skip-layer pass and
    the MMDiT-X second attention are not read; words hold CLIP and T5 rows (77 + 16 of them)."""
    pipe, prompt = _sd3_pipe(), "a red circle to the left of a blue square"
    run = dict(seed=1, steps=3, width=32, height=48, negative_prompt="blurry")
    plain = pipe.generate(prompt, guidance=5.0, slg=(1,), slg_stop=0.6, **run)
    images, maps = am.generate_with_attention_maps(pipe, prompt, guidance=5.0, slg=(1,), slg_stop=0.6,
                                                   keep_each=True, **run)
    assert np.array_equal(np.asarray(images[0]), np.asarray(plain[0]))  # the read-out changes nothing
    assert maps.maps.shape == (1, 3, 2, 77 + 16)  # 16 px per token
    assert len(maps.each) == 3 * 3  # 3 steps x 3 joint attentions: no negative, no skip-layer pass
    assert _texts(maps.words[0]) == prompt.split()
    assert all(min(w.tokens) < 77 <= max(w.tokens) for w in maps.words[0][:6])  # T5 cut at 16 keeps 6 words
    share = maps.maps.sum(-1)
    assert 0 < share.min() and share.max() < 1
    # step 0 sees the same noise with and without guidance: its maps must be the positive rows'
    _, first = am.generate_with_attention_maps(pipe, prompt, guidance=5.0, at_steps=[0], **run)
    _, alone = am.generate_with_attention_maps(pipe, prompt, guidance=1.0, at_steps=[0], **run)
    _, negative = am.generate_with_attention_maps(pipe, "blurry", guidance=1.0, at_steps=[0], **run)
    err = np.abs(first.maps - alone.maps).max()
    print(f"sd3: step-0 maps batched CFG vs positive alone: max |diff| = {err:.2e}")
    assert err < 1e-5 and np.abs(first.maps - negative.maps).max() > 1e-3
    _, no_t5 = am.generate_with_attention_maps(pipe, prompt, guidance=1.0, t5=False, **run)
    assert _texts(no_t5.words[0]) == prompt.split() and max(p for w in no_t5.words[0] for p in w.tokens) < 77


def test_qwen_image_pipeline_maps():
    """True CFG runs the negative as its own forward: not read. Two prompts of different lengths:
    the shorter's padded text rows get no attention, and micro-batches of one (each its own
    length) give the same maps as one batch of two."""
    from tiny_imagegen.pipelines import Pipeline

    pipe = Pipeline.from_pretrained(str(fixture_path("qwen_image_pipeline", "repo")), keep_text_encoders=True)
    prompts = ["a red cat sitting on a mat", "the quick brown fox jumps over the lazy dog near a river bank"]
    run = dict(seed=[4, 5], steps=3, width=80, height=48, negative_prompt="blurry")
    plain = pipe.generate(prompts, guidance=3.0, **run)
    images, maps = am.generate_with_attention_maps(pipe, prompts, guidance=3.0, keep_each=True, **run)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, plain))
    assert len(maps.each) == 3 * 2  # 3 steps x 2 blocks, the negative's forward not read
    assert [_texts(w) for w in maps.words] == [p.split() for p in prompts]
    from tiny_imagegen.conditioning.qwen import QWEN_IMAGE_DROP, QWEN_IMAGE_TEMPLATE

    rows = [len(pipe.tokenizer.encode(QWEN_IMAGE_TEMPLATE.format(p))) - QWEN_IMAGE_DROP for p in prompts]
    assert maps.maps.shape == (2, 3, 5, rows[1]) and rows[0] < rows[1]  # the prompt + the template's tail
    assert np.all(maps.maps[0, ..., rows[0]:] == 0) and maps.maps[0, ..., : rows[0]].min() > 0  # padding: masked
    share = maps.maps.sum(-1)
    assert 0 < share.min() and share.max() < 1
    _, single = am.generate_with_attention_maps(pipe, prompts, guidance=3.0, batch_size=1, **run)
    err = np.abs(single.maps - maps.maps).max()
    print(f"qwen-image: maps in micro-batches of 1 vs one batch of 2: max |diff| = {err:.2e}")
    assert err < 1e-5
    _, first = am.generate_with_attention_maps(pipe, prompts[:1], guidance=3.0, at_steps=[0], **{**run, "seed": 4})
    _, alone = am.generate_with_attention_maps(pipe, prompts[:1], guidance=1.0, at_steps=[0], **{**run, "seed": 4})
    assert np.abs(first.maps - alone.maps).max() < 1e-6


@pytest.mark.parametrize("repo, extra", [("sd3_pipeline", ["--guidance", "4"]), ("qwen_image_pipeline", [])])
def test_generate_command_writes_word_maps_for_new_families(tmp_path, repo, extra):
    from tiny_imagegen.commands.generate import main

    out, maps, prompt = tmp_path / "img.png", tmp_path / "maps", "a blue circle above a green square"
    assert main(["--model", str(fixture_path(repo, "repo")), "--prompt", prompt, "--seed", "2", "--steps", "2",
                 "--width", "32", "--height", "32", "--output", str(out), "--attention-maps", str(maps), *extra]) == 0
    names = sorted(p.name for p in maps.iterdir())
    assert names == [f"img-{k:02d}-{w}.png" for k, w in enumerate(prompt.split())] + ["img-sheet.png"]
