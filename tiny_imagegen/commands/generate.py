"""The `generate` command: prompts in, PNGs out (`tiny-imagegen generate`, examples/generate.py).

Every check that can fail is made before any model is loaded (inputs.py: sizes, the output
paths, the init image, the prompt file). Images are written to a temporary file beside the target
and renamed into place, so an interrupted run never leaves a half-written image, and an existing
file is never overwritten unless --overwrite says so. Each PNG carries its parameters
(metadata.py), which `--config-from-metadata` reads back.
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

from .. import __version__
from .inputs import DEFAULT_MODEL, UsageError, check_image, check_size, check_writable, output_paths, read_jobs
from .metadata import replay_arguments, save_png


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images from text prompts with a diffusion model in MLX.")
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
                        "precision, README: bf16, float16, quantized models)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="compute dtype; auto: bfloat16 on GPUs, float32 on the CPU")
    p.add_argument("--image", help="init image for image-to-image")
    p.add_argument("--strength", type=float, default=0.75,
                   help="image-to-image: how much of the schedule to run, 0 < s <= 1 (default %(default)s)")
    p.add_argument("--output", default="out.png",
                   help="PNG path; with several images a pattern with {i} (index) and/or {seed} "
                        "(default: %(default)s, numbered out-0.png ... when several)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--config-from-metadata", metavar="IMAGE.png",
                   help="take every parameter stored in an image written by generate; flags given override them")
    p.add_argument("--stepwise-output", type=Path, metavar="DIR",
                   help="also write the decoded latents after every step into DIR (the denoising made visible)")
    p.add_argument("--cache", metavar="fbc[:THRESHOLD]",
                   help="step caching: skip the transformer's later blocks on steps where its first block's "
                        "output barely changed (First-Block Cache, as diffusers'; threshold default 0.05, higher "
                        "skips more). For 20-50 step models; step-distilled ones (schnell, klein, Turbo) gain nothing")
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
        for dest, value in stored.items():
            if dest not in given and hasattr(args, dest):
                setattr(args, dest, [value] if dest == "seed" else value)
    return args


class ProgressBar:
    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width

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


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def family_options(pipe, values: dict) -> dict:
    """Flags that only some families take (name -> (value, default)): the ones set are passed to
    generate, and a family whose sampler has no such option refuses them in one line."""
    import inspect

    accepted = inspect.signature(pipe.sample).parameters
    options = {}
    for name, (value, default) in values.items():
        if value == default:
            continue
        if name not in accepted:
            raise UsageError(f"--{name.replace('_', '-')} is not an option of {pipe.name} ({pipe.family} models)")
        options[name] = value
    return options


def stepwise_writer(pipe, folder: Path, first_index: int):
    """preview(step, latents): decode the latents after each step and write step-<k>[-<i>].png."""
    from ..models.vae import to_pil

    def preview(step: int, latents):
        images = to_pil(pipe.decode(pipe.preview_latents(latents)))
        for j, image in enumerate(images):
            suffix = f"-{first_index + j}" if len(images) > 1 or first_index else ""
            image.save(folder / f"step-{step:03d}{suffix}.png")

    return preview


def run(args: argparse.Namespace) -> list[Path]:
    from ..checkpoints.quantize import Quantization
    from ..checkpoints.lora import lora_metadata, parse_lora_spec
    from ..checkpoints.mapping import CheckpointError
    from ..hub import ModelNotAvailable
    from ..pipeline import MAX_SIDE, Pipeline
    from ..step_cache import CacheConfig

    if args.model == "list":
        from .models import print_models

        print_models()
        return []
    jobs = read_jobs(args)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.modulation_bits is not None and not args.quantize:
        raise UsageError("--modulation-bits needs --quantize: it sets the adaLN modulation's bits of a quantized model")
    if not 0.0 < args.strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    for n, job in enumerate(jobs, 1):
        where = f"--prompt-file line {n}: " if args.prompt_file else ""
        for side in ("width", "height"):
            check_size(side, getattr(job, side), MAX_SIDE, where)
    paths = output_paths(args.output, [s for job in jobs for s in job.seeds], args.overwrite)
    if args.stepwise_output is not None:
        args.stepwise_output.mkdir(parents=True, exist_ok=True)
        check_writable(args.stepwise_output, f"--stepwise-output {args.stepwise_output}")
    init_image = check_image(args.image)
    try:
        cache = CacheConfig.parse(args.cache)
    except ValueError as e:
        raise UsageError(f"--cache: {e}") from None
    cache = str(cache) if cache else None  # as stored in the PNG and replayed
    dtype = None if args.dtype == "auto" else getattr(mx, args.dtype)

    start = time.perf_counter()
    try:
        quantize = args.quantize and Quantization(args.quantize, modulation_bits=args.modulation_bits)
        pipe = Pipeline.from_pretrained(args.model, dtype=dtype, quantize=quantize,
                                        keep_text_encoders=args.keep_text_encoders or len(jobs) > 1,
                                        loras=[parse_lora_spec(x) for x in args.lora or []])
    except (CheckpointError, FileNotFoundError, ModelNotAvailable, ValueError) as e:
        raise UsageError(str(e)) from None
    load_time = time.perf_counter() - start
    if args.verbose:
        from .system import system_lines

        print("\n".join(system_lines()[1:]), file=sys.stderr)
        print(f"model {pipe.name}: device {mx.default_device()}, dtype {pipe.dtype}, "
              f"loaded in {load_time:.1f} s", file=sys.stderr)

    options = family_options(pipe, {"true_cfg": (args.true_cfg, 1.0), "sampler": (args.sampler, None),
                                    "karras": (args.karras, False), "cfg_channels": (args.cfg_channels, None),
                                    "shift": (args.shift, None), "cfg_normalization": (args.cfg_normalization, 0.0),
                                    "cfg_truncation": (args.cfg_truncation, 1.0), "cache": (cache, None)})
    if init_image is not None and not pipe.img2img:
        raise UsageError(f"--image: {pipe.name} ({pipe.family} models) has no image-to-image here")
    rank, size, writes = 0, 1, True
    if args.distributed:
        from .. import distributed

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
        start, offset = offset, offset + len(job.seeds)
        indices = [start + i for i in range(len(job.seeds)) if start + i in mine]  # this rank's images of the job
        if not indices:
            continue
        job_seeds = [job.seeds[i - start] for i in indices]
        width, height = job.width or pipe.defaults.width, job.height or pipe.defaults.height
        steps = job.steps or pipe.defaults.steps
        guidance = pipe.defaults.guidance if job.guidance is None else job.guidance
        try:
            pipe.check_size(width, height)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if (job.guidance is not None and not job.negative_prompt and pipe.uses_negative(guidance, options)
                and not pipe.uses_negative(pipe.defaults.guidance, options)):
            warn(f"--guidance {guidance:g} on {pipe.name} runs classifier-free guidance against an empty negative "
                 "prompt: a second pass every step, twice the time (this model's default needs none)")
        cut = pipe.tokens_cut(job.prompt)
        if cut:
            warn(f"the prompt is {cut} token(s) longer than {pipe.name}'s text length "
                 f"({pipe.defaults.text_length}): they are cut off")
        first = indices[0]
        preview = stepwise_writer(pipe, args.stepwise_output, first) if args.stepwise_output else None
        try:  # what only the family can check (e.g. a class name DiT does not know)
            images = pipe.generate(job.prompt, width=width, height=height, steps=steps, guidance=guidance,
                                   seed=job_seeds, negative_prompt=job.negative_prompt, image=init_image,
                                   strength=args.strength, progress=ProgressBar(), batch_size=args.batch_size,
                                   vae_tiling={"auto": None, "on": True, "off": False}[args.vae_tiling],
                                   preview=preview, **options)
        except ValueError as e:
            raise UsageError(str(e)) from None
        metadata = {
            "prompt": job.prompt, "negative_prompt": job.negative_prompt, "steps": steps, "guidance": guidance,
            "width": width, "height": height, "model": pipe.name,
            "quantization": f"{args.quantize}-bit" if args.quantize else "none",
            **({"modulation_bits": args.modulation_bits} if args.quantize and args.modulation_bits else {}),
            "dtype": str(pipe.dtype).split(".")[-1], "software": f"tiny_imagegen {__version__}", **options,
            **(lora_metadata(pipe.loras) if getattr(pipe, "loras", None) else {}),
        }
        if init_image is not None:
            metadata.update(image=args.image, strength=args.strength)
        for image, s, index in zip(images, job_seeds, indices):
            if not writes:  # tensor parallel: every rank made the same image, rank 0 writes it
                continue
            path = paths[index]
            save_png(image, path, {**metadata, "seed": s})
            written.append(path)
            print(f"wrote {path}")
        if args.verbose and cache and getattr(pipe, "step_cache", None):
            runs = [f"{s.step - len(s.skipped)}/{s.step}" for s in pipe.step_cache.states]
            print(f"step cache {cache}: the remaining blocks ran on {', '.join(runs)} forwards "
                  "(per guidance pass, last micro-batch)", file=sys.stderr)
        if args.verbose:
            t, m = pipe.timings, pipe.peak_memory
            print(f"prompt {n + 1}/{len(jobs)}: text {t.get('text', 0):.2f} s ({m.get('text', 0) / 2**30:.2f} GiB peak), "
                  f"denoise {t['denoise']:.2f} s ({m['denoise'] / 2**30:.2f} GiB), decode {t['decode']:.2f} s "
                  f"({m['decode'] / 2**30:.2f} GiB)", file=sys.stderr)
    if args.verbose:
        print(f"{len(written)} image(s) in {time.perf_counter() - start - load_time:.2f} s after loading, "
              f"peak memory {max(pipe.peak_memory.values()) / 2**30:.2f} GiB", file=sys.stderr)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial image written", file=sys.stderr)
        return 130
    return 0
