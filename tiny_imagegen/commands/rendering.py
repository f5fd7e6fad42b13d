"""What `generate` and `serve` share: the checks that need no model (`check_inputs`), the pipeline
the flags name (`load_pipeline`), the family's own options (`sampler_options`), and one prompt's
images with the metadata each carries (`render`), so that the server writes the command's bytes.
"""

import argparse
import sys
from functools import partial

import mlx.core as mx

from .. import __version__
from .inputs import UsageError, check_output_folder, check_size, input_hashes, output_paths, read_edit_inputs, read_jobs
from .validation import FIELDS, check_arguments


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


def slg_layers(value: str | None) -> list[int] | None:
    """--slg 7,8,9 -> [7, 8, 9]."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise UsageError(f"--slg {value!r}: give block indices separated by commas, e.g. 7,8,9") from None


def check_inputs(args: argparse.Namespace):
    """Every check that needs no model: -> (jobs, output paths, the input images), or one UsageError."""
    from ..checkpoints.lora_specs import parse_lora_spec
    from ..pipelines.pipeline import MAX_SIDE

    try:  # every value against its type and range (validation.py), before anything else
        check_arguments(args)
        for spec, (_, weight) in zip(args.lora or [], [parse_lora_spec(x) for x in args.lora or []]):
            FIELDS["lora_weight"].check(weight, f"--lora {spec!r}: the weight")
    except ValueError as e:
        raise UsageError(str(e)) from None
    jobs = read_jobs(args)
    if args.modulation_bits is not None and not args.quantize:
        raise UsageError("--modulation-bits needs --quantize: it sets the adaLN modulation's bits of a quantized model")
    for n, job in enumerate(jobs, 1):
        where = f"--prompt-file line {n}: " if args.prompt_file else ""
        for side in ("width", "height"):
            check_size(side, getattr(job, side), MAX_SIDE, where)
    paths = output_paths(args.output, [s for job in jobs for s in job.seeds], args.overwrite)
    if args.stepwise_output is not None:
        check_output_folder(args.stepwise_output)
    if args.attention_maps is not None:
        check_output_folder(args.attention_maps, "--attention-maps")
    from ..diffusion.step_cache import CacheConfig

    try:
        cache = CacheConfig.parse(args.cache)
    except ValueError as e:
        raise UsageError(f"--cache: {e}") from None
    args.cache = str(cache) if cache else None  # as stored in the PNG and replayed
    from ..pipelines.loading import pipeline_class

    edit = read_edit_inputs(args, pipeline_class(args.model))
    for notice in edit.notices:
        warn(notice)
    return jobs, paths, edit


def load_pipeline(args: argparse.Namespace, keep_text_encoders: bool):
    """The pipeline that generate's arguments name (model, dtype, quantization, LoRAs); a model or
    file that cannot be loaded is a UsageError. `tiny-imagegen serve` keeps what this returns loaded."""
    from ..checkpoints.lora_specs import parse_lora_spec
    from ..checkpoints.mapping import CheckpointError
    from ..checkpoints.quantize import Quantization
    from ..registry.hub import ModelNotAvailable
    from ..pipelines.pipeline import Pipeline

    dtype = None if args.dtype == "auto" else getattr(mx, args.dtype)
    try:
        quantize = args.quantize and Quantization(args.quantize, modulation_bits=args.modulation_bits)
        return Pipeline.from_pretrained(args.model, dtype=dtype, quantize=quantize,
                                        keep_text_encoders=keep_text_encoders,
                                        loras=[parse_lora_spec(x) for x in args.lora or []])
    except (CheckpointError, FileNotFoundError, ModelNotAvailable, ValueError) as e:
        if args.verbose and getattr(e, "details", None):  # e.g. every unknown key of a LoRA file
            print("\n".join(e.details), file=sys.stderr)
        raise UsageError(str(e)) from None


def sampler_options(pipe, args: argparse.Namespace) -> dict:
    """The family-specific flags that are set, checked against the pipeline's sampler."""
    return family_options(pipe, {"true_cfg": (args.true_cfg, 1.0), "sampler": (args.sampler, None),
                                 "karras": (args.karras, False), "cfg_channels": (args.cfg_channels, None),
                                 "shift": (args.shift, None), "cfg_normalization": (args.cfg_normalization, 0.0),
                                 "cfg_truncation": (args.cfg_truncation, 1.0), "slg": (slg_layers(args.slg), None),
                                 "slg_scale": (args.slg_scale, 2.8), "clip_skip": (args.clip_skip, None),
                                 "t5": (not args.no_t5, True), "cache": (args.cache, None)})


def render(pipe, args: argparse.Namespace, job, options: dict, edit, progress, preview, generate=None):
    """One prompt's images (PIL, one per seed) and the metadata every one of them carries (plus its
    seed): what `generate` writes, and what `serve` writes, byte for byte. `edit`: the input images
    (commands/inputs.py EditInputs). `generate(pipe, prompt, **kw)` stands in for `pipe.generate`
    (the attention-map read-out: it returns (images, maps))."""
    from ..checkpoints.lora_specs import lora_metadata

    try:
        width, height = pipe.output_size(job.width, job.height, edit.image, edit.references)
        pipe.check_size(width, height)
    except ValueError as e:
        raise UsageError(str(e)) from None
    steps = job.steps or pipe.defaults.steps
    guidance = pipe.defaults.guidance if job.guidance is None else job.guidance
    if (job.guidance is not None and not job.negative_prompt and pipe.uses_negative(guidance, options)
            and not pipe.uses_negative(pipe.defaults.guidance, options)):
        warn(f"--guidance {guidance:g} on {pipe.name} runs classifier-free guidance against an empty negative "
             "prompt: a second pass every step, twice the time (this model's default needs none)")
    cut = pipe.tokens_cut(job.prompt)
    if cut:
        warn(f"the prompt is {cut} token(s) longer than {pipe.name}'s text length "
             f"({pipe.defaults.text_length}): they are cut off")
    try:  # what only the family can check (e.g. a class name DiT does not know)
        generate_images = partial(generate, pipe) if generate else pipe.generate
        images = generate_images(job.prompt, width=width, height=height, steps=steps, guidance=guidance,
                                 seed=job.seeds, negative_prompt=job.negative_prompt, image=edit.image,
                                 strength=args.strength, mask=edit.mask, references=edit.references or None,
                                 progress=progress, batch_size=args.batch_size,
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
        **input_hashes(args),
    }
    if edit.image is not None:
        metadata.update(strength=args.strength)
    return images, metadata
