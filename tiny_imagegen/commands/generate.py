"""The `generate` command: prompts in, PNGs out (`tiny-imagegen generate`, examples/generate.py).

Every check that can fail is made before any model is loaded (validation.py: each value's type
and range, whether from a flag, the prompt file or replayed metadata; inputs.py: sizes, the output
paths, the init image, the prompt file); a bad input is one line and exit status 2, SIGTERM
unwinds as Ctrl-C does (docs/bad-input.md). Images are written to a temporary file beside the target
and renamed into place, so an interrupted run never leaves a half-written image, and an existing
file is never overwritten unless --overwrite says so. Each PNG carries its parameters
(metadata.py), which `--config-from-metadata` reads back.
"""

import argparse
import signal
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import mlx.core as mx

from .. import __version__
from .inputs import DEFAULT_MODEL, UsageError
from .metadata import check_inputs_unchanged, replay_arguments, save_png
from .rendering import check_inputs, load_pipeline, render, sampler_options
from .validation import OneLineParser

CLASS_CONDITIONAL = ("dit",)  # families whose "prompt" is a class label (--class-label)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Generate images from text prompts with a diffusion model in MLX.")
    p.add_argument("--prompt", help="what to draw (default: a demo prompt for the shipped model)")
    p.add_argument("--prompt-file", type=Path,
                   help="one prompt per line, or JSON lines {\"prompt\": ..., \"seed\": ..., \"width\": ..., "
                        "\"height\": ..., \"negative_prompt\": ..., \"steps\": ..., \"guidance\": ...}; "
                        "the model is loaded once for all")
    p.add_argument("--class-label", action="append", metavar="ID|NAME",
                   help="class-conditional models (DiT-XL/2): an ImageNet class id or name, in place of --prompt; "
                        "repeat for several")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (classifier-free guidance)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a registered model (`--model list` shows them), a hub repo id, a local folder laid out "
                        "like the hub repo, or a folder written by convert (default: %(default)s)")
    p.add_argument("--steps", type=int, help="denoising steps (default per model)")
    p.add_argument("--guidance", type=float,
                   help="FLUX.1-dev: the distilled guidance input (default 3.5); Z-Image: the CFG scale g of "
                        "pos + g(pos - neg), any g > 0 runs a second pass; other models: the classifier-free "
                        "guidance scale, > 1 runs a second pass with --negative-prompt")
    p.add_argument("--true-cfg", type=float, default=1.0,
                   help="guidance-distilled models: real classifier-free guidance on top (default off)")
    p.add_argument("--sampler", choices=("ddim", "euler"),
                   help="noise-prediction models (SD 1.5, DiT): DDIM (default) or Euler")
    p.add_argument("--karras", action="store_true", help="Euler sampler: Karras-spaced sigmas (SD 1.5)")
    p.add_argument("--cfg-channels", type=int,
                   help="DiT: guide only the first N latent channels (3: the original DiT sample.py; default all, as diffusers)")
    p.add_argument("--shift", type=float, help="Z-Image: the static schedule shift (default 3)")
    p.add_argument("--cfg-normalization", type=float, default=0.0,
                   help="Z-Image: cap the guided prediction's norm at this multiple of the positive one (0 = off)")
    p.add_argument("--cfg-truncation", type=float, default=1.0,
                   help="Z-Image: no guidance past this model time in [0, 1] (1 = guide every step)")
    p.add_argument("--slg", nargs="?", const="7,8,9", metavar="LAYERS",
                   help="SD3.5: skip-layer guidance, a conditional pass without these blocks (comma-separated; "
                        "default 7,8,9 as for SD3.5 Medium), at steps 1%%..20%% of the run; needs --guidance > 1")
    p.add_argument("--slg-scale", type=float, default=2.8, help="SD3.5: skip-layer guidance scale (default %(default)s)")
    p.add_argument("--clip-skip", type=int, help="SD3.5: read CLIP this many layers before the penultimate one")
    p.add_argument("--no-t5", action="store_true",
                   help="SD3.5: leave T5-XXL out (zeros in its place, as the reference allows): 9.5 GB less in bf16")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16 (default per model)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16 (default per model)")
    p.add_argument("--seed", type=int, action="append",
                   help="the same seed gives the same image (default: random); repeat for several images")
    p.add_argument("--n-images", type=int, default=1, help="images per prompt; image i uses seed + i")
    p.add_argument("--batch-size", type=int, help="images per denoising pass (default: all; the same images)")
    p.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                   help="a LoRA file (local, or a hub file org/name/file.safetensors) and its weight (default 1); "
                        "repeatable; merged into full-precision weights, beside quantized ones")
    p.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the transformer and text encoder on load")
    p.add_argument("--modulation-bits", type=int, choices=(4, 8),
                   help="with --quantize 4: the MM-DiT's adaLN modulation at these bits (8: closer to full "
                        "precision; docs/quantization-and-memory.md)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="compute dtype; auto: bfloat16 on GPUs, float32 on the CPU")
    p.add_argument("--image", metavar="IMAGE",
                   help="init image: image-to-image with --strength, inpainting with --mask (FLUX.1, SD 1.5: "
                        "both; FLUX.2 klein: inpainting only); the output size defaults to its own")
    p.add_argument("--strength", type=float, default=0.75,
                   help="image-to-image and inpainting: how much of the schedule to run, 0 < s <= 1; 1 starts "
                        "from pure noise (default %(default)s)")
    p.add_argument("--mask", metavar="MASK",
                   help="inpainting: a greyscale image of --image's size, white = repaint, black = keep")
    p.add_argument("--ref", action="append", metavar="IMAGE",
                   help="a reference image to edit from (FLUX.2 klein: up to 10, repeat the flag; the output "
                        "size defaults to the first's); not an init image: nothing is noised")
    p.add_argument("--output", default="out.png",
                   help="PNG path; with several images a pattern with {i} (index) and/or {seed} "
                        "(default: %(default)s, numbered out-0.png ... when several)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--config-from-metadata", metavar="IMAGE.png",
                   help="take every parameter stored in an image written by generate; flags given override them")
    p.add_argument("--stepwise-output", type=Path, metavar="DIR",
                   help="also write the decoded latents after every step into DIR (the denoising made visible)")
    p.add_argument("--attention-maps", type=Path, metavar="DIR",
                   help="also write, per image, a heatmap per prompt word of where the image attends to it "
                        "(text-conditioned models; docs/attention-maps.md) and a contact sheet into DIR")
    p.add_argument("--attention-blocks", metavar="I,J,...",
                   help="--attention-maps: average these attention blocks only (0-based, model order; default all)")
    p.add_argument("--attention-steps", metavar="I,J,...",
                   help="--attention-maps: average these denoising steps only (0-based; default all)")
    p.add_argument("--cache", metavar="fbc[:THRESHOLD] | mag[:THRESHOLD]",
                   help="step caching, as diffusers' hooks: 'fbc' (First-Block Cache) skips the transformer's later "
                        "blocks on steps where its first block's output barely changed (threshold default 0.05); "
                        "'mag' (MagCache) skips all blocks on steps a schedule of the model's calibrated magnitude "
                        "ratios allows (threshold default 0.06; models with ratios: tiny-shapes, FLUX.1; "
                        "'mag:calibrate' measures them, printed with --verbose). Higher skips more. For 20-50 step "
                        "models; step-distilled ones (schnell, klein, Turbo) gain nothing")
    p.add_argument("--distributed", choices=("data", "tensor"),
                   help="under mlx.launch: 'data' gives each rank its share of the images (each made and written "
                        "once); 'tensor' splits the FLUX.1 transformer's blocks across the ranks (rank 0 writes)")
    p.add_argument("--vae-tiling", choices=("auto", "on", "off"), default="auto",
                   help="decode in overlapping tiles to bound memory; auto: above 768x768 pixels")
    p.add_argument("--keep-text-encoders", action="store_true", help="do not free the text encoders after encoding")
    p.add_argument("--verbose", "-v", action="store_true", help="print device, dtype, per-phase time and peak memory")
    p.add_argument("--version", action="version", version=f"tiny_imagegen {__version__}")
    return p


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations the user set on the command line (so metadata does not override them)."""
    given = set()
    for action in parser._actions:
        if any(a == o or a.startswith(o + "=") for a in argv for o in action.option_strings):
            given.add(action.dest)
    return given


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.config_from_metadata:
        try:
            stored = replay_arguments(args.config_from_metadata)
        except ValueError as e:
            parser.exit(2, f"error: --config-from-metadata {e}\n")
        given = given_flags(parser, argv)
        try:  # the input images must be the ones the image was made from
            check_inputs_unchanged(args.config_from_metadata, skip=given)
        except ValueError as e:
            parser.exit(2, f"error: --config-from-metadata {e}\n")
        for dest, value in stored.items():
            if dest not in given and hasattr(args, dest):
                setattr(args, dest, [value] if dest == "seed" else value)
    return args


class ProgressBar:
    def __init__(self, stream=None, width: int = 30):
        self.stream, self.width = stream or sys.stderr, width

    def __call__(self, step: int, total: int, elapsed: float) -> None:
        """A bar redrawn in place on a terminal; a line per step in a log."""
        filled = self.width * step // total
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"denoising [{bar}] {step}/{total}  {elapsed / step:.2f} s/step, {elapsed:.1f} s"
        if self.stream.isatty():
            self.stream.write("\r" + line + ("\n" if step == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def stepwise_writer(pipe, folder: Path, first_index: int):
    """preview(step, latents): decode the latents after each step and write step-<k>[-<i>].png."""
    from ..models.pixels import to_pil

    def preview(step: int, latents):
        images = to_pil(pipe.decode(pipe.preview_latents(latents)))
        for j, image in enumerate(images):
            suffix = f"-{first_index + j}" if len(images) > 1 or first_index else ""
            image.save(folder / f"step-{step:03d}{suffix}.png")

    return preview


def index_list(text: str | None, flag: str) -> list[int] | None:
    """"0,2,5" -> [0, 2, 5]; None -> None (all)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated indices such as 0,2,5, got {text!r}") from None
    if any(v < 0 for v in values):
        raise UsageError(f"{flag}: indices start at 0, got {text!r}")
    return values


def run(args: argparse.Namespace) -> list[Path]:
    if args.model == "list":
        from .models import print_models

        print_models()
        return []
    jobs, paths, edit = check_inputs(args)
    generate = None  # the pipeline's own
    if args.attention_maps is not None:
        from ..conditioning.attention_maps import generate_with_attention_maps, save_word_maps

        generate = partial(generate_with_attention_maps, blocks=index_list(args.attention_blocks, "--attention-blocks"),
                           at_steps=index_list(args.attention_steps, "--attention-steps"))

    start = time.perf_counter()
    pipe = load_pipeline(args, keep_text_encoders=args.keep_text_encoders or len(jobs) > 1)
    load_time = time.perf_counter() - start
    if args.verbose:
        from .system import system_lines

        print("\n".join(system_lines()[1:]), file=sys.stderr)
        print(f"model {pipe.name}: device {mx.default_device()}, dtype {pipe.dtype}, "
              f"loaded in {load_time:.1f} s", file=sys.stderr)

    options = sampler_options(pipe, args)
    problem = pipe.refusal(edit.image is not None, edit.mask is not None, len(edit.references), pipe.name)
    if problem:  # a hub repo id the registry does not know: its family is known only now
        raise UsageError(problem)
    if args.class_label and pipe.family not in CLASS_CONDITIONAL:
        raise UsageError(f"--class-label: {pipe.name} ({pipe.family} models) draws from text, not class labels: "
                         "use --prompt")
    if "true_cfg" in options and not getattr(pipe, "distilled", False):  # it would be ignored, yet recorded
        raise UsageError(f"--true-cfg: {pipe.name} is not guidance-distilled, so its --guidance is already "
                         "classifier-free guidance: use --guidance")
    if "cache" in options:
        from ..diffusion.step_cache import check_method

        try:
            check_method(options["cache"], pipe.defaults.mag_ratios)
        except ValueError as e:
            raise UsageError(f"--cache {options['cache']}: {pipe.name} ({pipe.family}): {e}") from None
    rank, size, writes = 0, 1, True
    if args.distributed:
        from ..pipelines import distributed

        group = distributed.init()
        rank, size = group.rank(), group.size()
        if args.distributed == "tensor":
            try:
                distributed.shard_mmdit(pipe.transformer, group)
            except ValueError as e:
                raise UsageError(f"--distributed tensor: {e}") from None
            writes = rank == 0
        if args.verbose:
            print(f"rank {rank} of {size} ({args.distributed} parallel)", file=sys.stderr)
    mine = set(distributed.my_share(len(paths), rank, size)) if args.distributed == "data" else set(range(len(paths)))
    written, offset = [], 0
    for n, job in enumerate(jobs):
        first, offset = offset, offset + len(job.seeds)
        indices = [first + i for i in range(len(job.seeds)) if first + i in mine]  # this rank's images of the job
        if not indices:
            continue
        job = replace(job, seeds=[job.seeds[i - first] for i in indices])
        preview = stepwise_writer(pipe, args.stepwise_output, indices[0]) if args.stepwise_output else None
        images, metadata = render(pipe, args, job, options, edit, ProgressBar(), preview, generate)
        if args.attention_maps is not None:
            images, maps = images
        for j, (image, s, index) in enumerate(zip(images, job.seeds, indices)):
            if not writes:  # tensor parallel: every rank made the same image, rank 0 writes it
                continue
            path = paths[index]
            try:
                save_png(image, path, {**metadata, "seed": s}, overwrite=args.overwrite)
            except FileExistsError:
                raise UsageError(f"{path} exists (written meanwhile by another run?): not replaced; "
                                 "choose another --output or pass --overwrite") from None
            except OSError as e:
                raise UsageError(f"cannot write {path}: {e.strerror}") from None
            written.append(path)
            print(f"wrote {path}")
            if args.attention_maps is not None:
                sheet = save_word_maps(args.attention_maps, path.stem, image, maps, j)[-1]
                print(f"wrote {len(maps.words[j])} word maps and {sheet}")
        if args.verbose and args.cache and getattr(pipe, "step_cache", None):
            runs = [f"{c.step - len(c.skipped)}/{c.step}" for c in pipe.step_cache.states]
            ran = "all blocks" if args.cache.startswith("mag") else "the remaining blocks"  # MagCache skips them all
            print(f"step cache {args.cache}: {ran} ran on {', '.join(runs)} forwards "
                  "(per guidance pass, last micro-batch)", file=sys.stderr)
            for c in pipe.step_cache.states:
                if getattr(c, "calibrate", False):  # MagCache calibration: the ratios this pass measured
                    print("mag_ratios=(" + ", ".join(f"{r:.5f}" for r in c.measured) + ")", file=sys.stderr)
        if args.verbose:
            t, m = pipe.timings, pipe.peak_memory
            print(f"prompt {n + 1}/{len(jobs)}: text {t.get('text', 0):.2f} s ({m.get('text', 0) / 2**30:.2f} GiB peak), "
                  f"denoise {t['denoise']:.2f} s ({m['denoise'] / 2**30:.2f} GiB), decode {t['decode']:.2f} s "
                  f"({m['decode'] / 2**30:.2f} GiB)", file=sys.stderr)
    if args.verbose:
        print(f"{len(written)} image(s) in {time.perf_counter() - start - load_time:.2f} s after loading, "
              f"peak memory {max(pipe.peak_memory.values()) / 2**30:.2f} GiB", file=sys.stderr)
    return written


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as on Ctrl-C (no .tmp file left)."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"{'terminated' if terminated else 'interrupted'}: no partial image written", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
