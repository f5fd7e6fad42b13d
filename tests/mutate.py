"""Plant plausible one-line bugs, one at a time, and see whether the tests catch each of them.

    python tests/mutate.py                 # every mutation (about 12 minutes on 2 cores)
    python tests/mutate.py --list          # the mutations and the tests each one runs
    python tests/mutate.py rope euler      # only mutations whose id contains one of these words

The tree (the package, tests/, examples/, weights/, benchmarks/, docs/ and the top files) is
copied once into a temporary directory. There each distinct test selection first runs on the
unmutated copy and must pass (else a "caught" would mean nothing: the script stops). Then each
mutation replaces one exact line fragment (it must occur exactly once in its file), runs the few
test files that should notice it (pytest -x: the first failure is enough), and puts the file
back. Your checkout is never touched. A mutation is *caught* when pytest fails, *missed* when the
tests still pass; the script exits 1 if any is missed or if a mutation's text no longer occurs
(the code moved on: update the list).

This is for contributors and reviewers, not CI: when you add a test, add the bug it guards against
here; when you add code, add the one-line slip a reader could make in it. docs/testing.md says more.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("tiny_imagegen", "tests", "examples", "weights", "benchmarks", "docs", "pyproject.toml", "README.md",
          "requirements.txt", "requirements-dev.txt")


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str  # relative to the repository root
    old: str  # occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: test files, ::names, or "-k" and an expression


MUTATIONS = [
    # ---- layers ---------------------------------------------------------------------------------
    Mutation("modulation without 1 +", "tiny_imagegen/layers/modulation.py",
             "return x * (1 + scale[:, None]) + shift[:, None]", "return x * scale[:, None] + shift[:, None]",
             ("tests/test_mmdit.py", "-k", "matches")),
    Mutation("attention scale 1/d", "tiny_imagegen/layers/attention.py",
             "out = sdpa(q, k, v, scale=q.shape[-1] ** -0.5)\n", "out = sdpa(q, k, v, scale=q.shape[-1] ** -1.0)\n",
             ("tests/test_attention.py", "tests/test_mmdit.py")),
    Mutation("silu_fast with sigmoid's half sign flipped", "tiny_imagegen/layers/activations.py",
             "return (h + h * tanh_rational(h)).astype(x.dtype)",
             "return (h - h * tanh_rational(h)).astype(x.dtype)",
             ("tests/test_activations.py",)),
    Mutation("row split without the bias", "tiny_imagegen/layers/linear.py",
             "y = y + self.bias  # after the sum",
             "y = y  # after the sum",
             ("tests/test_speed_setup.py", "-k", "row_split")),
    Mutation("pieces drop the last remainder", "tiny_imagegen/device/streams.py",
             "return [slice(i, min(i + step, n)) for i in range(0, n, step)]",
             "return [slice(i, min(i + step, n - 1)) for i in range(0, n, step)]",
             ("tests/test_speed_setup.py", "-k", "row_split")),
    Mutation("rope reversed", "tiny_imagegen/layers/rope.py",
             "rotated = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)",
             "rotated = mx.stack([x0 * cos + x1 * sin, -x0 * sin + x1 * cos], axis=-1)", ("tests/test_rope.py",)),
    Mutation("rope tables rounded to the model dtype (float32 island)", "tiny_imagegen/layers/rope.py",
             "return _rotate_pairs(x, *rope)", "return _rotate_pairs(x, *(t.astype(x.dtype) for t in rope))",
             ("tests/test_rope.py",)),
    Mutation("timestep sinusoid sin first", "tiny_imagegen/layers/embeddings.py",
             "args * arg_scale\n    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)",
             "args * arg_scale\n    return mx.concatenate([mx.sin(args), mx.cos(args)], axis=-1)",
             ("tests/test_mmdit.py", "-k", "matches")),
    Mutation("timestep sinusoid in bf16 (float32 island)", "tiny_imagegen/layers/embeddings.py",
             "    t = time_factor * t.astype(mx.float32)\n", "    t = (time_factor * t.astype(mx.float32)).astype(mx.bfloat16)\n",
             ("tests/test_bf16_islands.py",)),
    Mutation("timestep frequencies' exp in float32", "tiny_imagegen/layers/embeddings.py",
             "    return mx.array([math.exp(e) for e in exponent.tolist()], mx.float32)", "    return mx.exp(exponent)",
             ("tests/test_numpy_free.py", "-k", "sinusoid")),
    Mutation("numpy imported by the position ids (the first image's path)", "tiny_imagegen/layers/positions.py",
             "if TYPE_CHECKING:\n    import numpy as np\n", "import numpy as np\n",
             ("tests/test_numpy_free.py", "-k", "never_imports")),
    Mutation("pack_latents patch order", "tiny_imagegen/layers/embeddings.py",
             "z = z.transpose(0, 1, 3, 5, 2, 4)  # (B, h/p, w/p, C, ph, pw)",
             "z = z.transpose(0, 1, 3, 5, 4, 2)  # (B, h/p, w/p, C, ph, pw)", ("tests/test_pipeline.py", "-k", "matches")),
    Mutation("gelu tanh without 0.5", "tiny_imagegen/layers/activations.py",
             "return (0.5 * x32 * (1 + tanh_rational(u))).astype(x.dtype)",
             "return (x32 * (1 + tanh_rational(u))).astype(x.dtype)", ("tests/test_activations.py",)),
    Mutation("lora merged with the wrong sign", "tiny_imagegen/layers/lora.py",
             "linear.weight = (w.astype(mx.float32) + lora_delta(a, b, scale)).astype(w.dtype)",
             "linear.weight = (w.astype(mx.float32) - lora_delta(a, b, scale)).astype(w.dtype)",
             ("tests/test_lora.py", "-k", "transformer_output")),
    # ---- models -------------------------------------------------------------------------------
    Mutation("single block residual dropped", "tiny_imagegen/models/mmdit.py",
             "return x + gate[:, None] * self.linear2(out)", "return gate[:, None] * self.linear2(out)",
             ("tests/test_mmdit.py", "-k", "matches")),
    Mutation("t5 relative buckets: direction flipped", "tiny_imagegen/models/t5.py",
             "direction = (relative_position > 0).astype(mx.int32) * num_buckets",
             "direction = (relative_position < 0).astype(mx.int32) * num_buckets", ("tests/test_t5.py",)),
    Mutation("vae latents shift and scale in the wrong order", "tiny_imagegen/models/vae.py",
             "return (z - self.config.shift_factor) * self.config.scaling_factor",
             "return z * self.config.scaling_factor - self.config.shift_factor",
             ("tests/test_flux_paths.py", "-k", "image_to_image")),
    Mutation("to_pil rounds halves up", "tiny_imagegen/models/pixels.py",
             "pixels = mx.round(x * 255).astype(mx.uint8)", "pixels = mx.floor(x * 255 + 0.5).astype(mx.uint8)",
             ("tests/test_numpy_free.py", "-k", "to_pil")),
    Mutation("qwen vae: q and k of the fused to_qkv swapped", "tiny_imagegen/checkpoints/qwen_image.py",
             'for c, x in enumerate("qkv")', 'for c, x in enumerate("kqv")', ("tests/test_qwen_vae.py", "-k", "fp32")),
    Mutation("z-image pad token ignored", "tiny_imagegen/models/zimage.py",
             "x_pad = mx.broadcast_to(self.x_pad_token, (B, layout.img_len - layout.n_img, cfg.dim))",
             "x_pad = mx.zeros((B, layout.img_len - layout.n_img, cfg.dim), dtype=x.dtype)", ("tests/test_zimage.py",)),
    # ---- samplers -----------------------------------------------------------------------------
    Mutation("euler step backwards", "tiny_imagegen/diffusion/flow_matching.py",
             "return (x.astype(mx.float32) + (t_next - t) * v.astype(mx.float32)).astype(x.dtype)",
             "return (x.astype(mx.float32) + (t - t_next) * v.astype(mx.float32)).astype(x.dtype)",
             ("tests/test_pipeline.py", "-k", "matches")),
    Mutation("euler update in the model's dtype (float32 island)", "tiny_imagegen/diffusion/flow_matching.py",
             "return (x.astype(mx.float32) + (t_next - t) * v.astype(mx.float32)).astype(x.dtype)",
             "return (x.astype(v.dtype) + (t_next - t) * v).astype(x.dtype)", ("tests/test_bf16_islands.py",)),
    Mutation("flux time shift inverted", "tiny_imagegen/diffusion/flow_matching.py",
             "return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)) if t > 0 else 0.0",
             "return math.exp(-mu) / (math.exp(-mu) + (1.0 / t - 1.0)) if t > 0 else 0.0",
             ("tests/test_sampling.py",)),
    Mutation("img2img noise and init swapped", "tiny_imagegen/pipelines/flux1.py",
             "x = noise_image(x0, eps, schedule[0])", "x = noise_image(eps, x0, schedule[0])",
             ("tests/test_flux_paths.py", "-k", "image_to_image")),
    Mutation("img2img one step too few", "tiny_imagegen/diffusion/flow_matching.py",
             "    return schedule[start:]\n", "    return schedule[start + 1:]\n",
             ("tests/test_flux_paths.py", "-k", "image_to_image")),
    Mutation("z-image guidance sign", "tiny_imagegen/diffusion/flow_matching.py",
             "return pos + scale * (pos - neg)", "return pos - scale * (pos - neg)",
             ("tests/test_zimage_guidance.py",)),
    Mutation("z-image renormalisation against the guided norm", "tiny_imagegen/diffusion/flow_matching.py",
             "limit = factor * mx.sqrt(mx.sum(mx.square(pred_pos.astype(mx.float32)), axis=axes, keepdims=True))",
             "limit = factor * mx.sqrt(mx.sum(mx.square(pred), axis=axes, keepdims=True))",
             ("tests/test_zimage_guidance.py",)),
    Mutation("ddpm x0 from v: sign", "tiny_imagegen/diffusion/ddpm.py",
             "return a * x - b * out, a * out + b * x", "return a * x + b * out, a * out + b * x",
             ("tests/test_ddpm.py",)),
    Mutation("ddpm cumulative product in float32", "tiny_imagegen/diffusion/ddpm.py",
             "return np.cumprod(alphas.astype(np.float64)).astype(np.float32)",
             "return np.cumprod(alphas.astype(np.float32)).astype(np.float32)", ("tests/test_ddpm.py",)),
    # ---- tokenizers ---------------------------------------------------------------------------
    Mutation("clip tokenizer does not lowercase", "tiny_imagegen/text/clip_bpe.py",
             'return "".join(c.lower() for c in text)', 'return "".join(c for c in text)', ("tests/test_tokenizers.py",)),
    Mutation("t5 tokenizer without </s>", "tiny_imagegen/text/t5_sentencepiece.py",
             "return ids + self.sp.encode(text[start:]) + [self.eos_id]", "return ids + self.sp.encode(text[start:])",
             ("tests/test_tokenizers.py",)),
    Mutation("qwen tokenizer: contractions case-sensitive", "tiny_imagegen/text/qwen_bpe.py",
             """rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|""", """rf"(?:'s|'t|'re|'ve|'m|'ll|'d)|""",
             ("tests/test_qwen_tokenizer.py", "-k", "battery or random")),
    # ---- text encoders ------------------------------------------------------------------------
    Mutation("clip pooled at the last token, not the end token", "tiny_imagegen/models/clip.py",
             "return mx.argmax(input_ids, axis=-1)", "return mx.full((input_ids.shape[0],), input_ids.shape[1] - 1)",
             ("tests/test_clip.py", "-k", "equals_transformers or pooled")),
    Mutation("qwen3 key norm skipped", "tiny_imagegen/models/qwen3.py",
             "q, k = self.q_norm(q), self.k_norm(k)", "q = self.q_norm(q)",
             ("tests/test_qwen3.py", "-k", "every_hidden_state_fp32")),
    # ---- LoRA ---------------------------------------------------------------------------------
    Mutation("rsLoRA alpha / r", "tiny_imagegen/checkpoints/lora.py",
             'return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)', "return alpha / r",
             ("tests/test_lora_peft.py",)),
    Mutation("PEFT rank_pattern ignored", "tiny_imagegen/checkpoints/lora.py",
             'r = number(f"{prefix}r", _pattern(patterns[0], module, cfg.get("r", rank)), rank=True)',
             'r = number(f"{prefix}r", cfg.get("r", rank), rank=True)',
             ("tests/test_lora_peft.py",)),
    Mutation("PEFT alpha_pattern ignored", "tiny_imagegen/checkpoints/lora.py",
             'alpha = number(f"{prefix}lora_alpha", _pattern(patterns[1], module, cfg["lora_alpha"]), rank=False)',
             'alpha = number(f"{prefix}lora_alpha", cfg["lora_alpha"], rank=False)',
             ("tests/test_lora_peft.py",)),
    Mutation("kohya alpha ignored", "tiny_imagegen/checkpoints/lora.py",
             "scale = alpha.item() / rank", "scale = 1.0",
             ("tests/test_lora.py", "-k", "transformer_output")),
    # ---- step caching -------------------------------------------------------------------------
    Mutation("mag cache: accumulated error must stay strictly under the threshold", "tiny_imagegen/diffusion/mag_cache.py",
             "self.err <= np.float32(self.threshold)", "self.err < np.float32(self.threshold)",
             ("tests/test_mag_cache.py", "-k", "diffusers_skips")),
    Mutation("mag cache: one skip fewer in a row than K", "tiny_imagegen/diffusion/mag_cache.py",
             "self.skips <= self.max_skip_steps", "self.skips < self.max_skip_steps",
             ("tests/test_mag_cache.py", "-k", "diffusers_skips")),
    Mutation("mag cache: residual without the input subtracted", "tiny_imagegen/diffusion/mag_cache.py",
             "st.remember(take(out_img, s) - take(img, s))", "st.remember(take(out_img, s))",
             ("tests/test_mag_cache.py", "-k", "diffusers_skips")),
    # ---- pipelines ----------------------------------------------------------------------------
    Mutation("flux1 true cfg sign flipped (batched)", "tiny_imagegen/pipelines/flux1.py",
             "return classifier_free_guidance(v[:B], v[B:], scale)", "return classifier_free_guidance(v[B:], v[:B], scale)",
             ("tests/test_flux_paths.py", "-k", "true_cfg")),
    Mutation("flux1 true cfg sign flipped (unbatched)", "tiny_imagegen/pipelines/flux1.py",
             "v = classifier_free_guidance(v, v_neg, scale)", "v = classifier_free_guidance(v_neg, v, scale)",
             ("tests/test_flux_paths.py", "-k", "true_cfg")),
    Mutation("flux1 cfg at a scale of 1 or less (schnell's guidance 0)", "tiny_imagegen/pipelines/flux1.py",
             "return self.cfg_scale(guidance, options) > 1.0", "return self.cfg_scale(guidance, options) != 1.0",
             ("tests/test_flux_paths.py", "-k", "one_or_less or image_to_image")),
    Mutation("flux2 unbatched cfg sign flipped", "tiny_imagegen/pipelines/flux2.py",
             "v = classifier_free_guidance(v, forward(x, cond.negative[\"txt\"], ts, caches and caches.negative), guidance)",
             "v = classifier_free_guidance(forward(x, cond.negative[\"txt\"], ts, caches and caches.negative), v, guidance)",
             ("tests/test_flux2_pipeline.py", "-k", "fp32")),
    Mutation("z-image truncation >= at the boundary", "tiny_imagegen/pipelines/zimage.py",
             "if guidance <= 0 or t > cfg_truncation:", "if guidance <= 0 or t >= cfg_truncation:",
             ("tests/test_zimage_guidance.py",)),
    Mutation("z-image unbatched cfg uses the positive twice", "tiny_imagegen/pipelines/zimage.py",
             "forward(x, t, neg, lambda c: c.negative)", "forward(x, t, pos, lambda c: c.negative)", ("tests/test_zimage_guidance.py",)),
    Mutation("sd15 cfg sign flipped", "tiny_imagegen/pipelines/sd15.py",
             "eps = classifier_free_guidance(eps[:B], eps[B:], guidance)",
             "eps = classifier_free_guidance(eps[B:], eps[:B], guidance)",
             ("tests/test_sd15_pipeline.py", "-k", "matches_diffusers")),
    Mutation("dit keeps the learned variance channels", "tiny_imagegen/pipelines/dit.py",
             "t, y, cache=context)[..., :C]  # eps; the learned variance dropped",
             "t, y, cache=context)[..., -C:]  # eps; the learned variance dropped",
             ("tests/test_dit_pipeline.py", "-k", "matches_diffusers")),
]


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.pyc")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        rc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", help="run only mutations whose id contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the unmutated tests first")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.words or any(w in m.id for w in args.words)]
    if args.list:
        for m in chosen:
            print(f"{m.id:58s} {m.file}  ->  {' '.join(m.tests)}")
        return 0
    missing = [m for m in chosen if (ROOT / m.file).read_text().count(m.old) != 1]
    for m in missing:
        print(f"STALE   {m.id}: its text occurs {(ROOT / m.file).read_text().count(m.old)} times in {m.file}")
    chosen = [m for m in chosen if m not in missing]
    results = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                rc, seconds = run_tests(tree, tests, args.timeout)
                verdict = "passes" if rc == 0 else f"FAILS (exit {rc})"
                print(f"baseline {verdict}: pytest {' '.join(tests)} ({seconds:.0f} s)", flush=True)
                if rc != 0:
                    print("the unmutated tests must pass first: fix them (or the copied tree, COPIED)")
                    return 1
        for i, m in enumerate(chosen, 1):
            path = tree / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                rc, seconds = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = "caught" if rc == 1 else ("TIMEOUT" if rc == -1 else ("MISSED" if rc == 0 else f"error {rc}"))
            results.append((m, verdict))
            print(f"[{i}/{len(chosen)}] {verdict:8s} {m.id}  ({seconds:.0f} s: {' '.join(m.tests)})", flush=True)
    caught = sum(v == "caught" for _, v in results)
    print(f"\n{caught} of {len(results)} mutations caught" + (f"; {len(missing)} stale" if missing else ""))
    for m, v in results:
        if v != "caught":
            print(f"  {v}: {m.id} ({m.file})")
    return 0 if caught == len(results) and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
