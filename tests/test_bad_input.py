"""Bad and hostile input, class by class (issue 29): each ends in one line naming the flag, file,
line or field, exit status 2, and nothing written — never a traceback, a gigabyte allocation, a
file read outside a model folder, or exit 0 with a wrong image.

Most cases run `generate.main` in this process (the checks come before any model is loaded, so a
case takes milliseconds); the race, SIGTERM and `info | head` cases run the command as a user does.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "weights" / "tiny-shapes"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
FAST = ["--steps", "1"]


def generate(argv, capsys) -> tuple[int, str]:
    """generate's exit status and stderr, run in this process."""
    from tiny_imagegen.commands import generate as command

    try:
        status = command.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    return status, capsys.readouterr().err


def one_line(status, err, *words):
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


# ---- numbers out of range, non-finite numbers, options ignored ----------------------------------

ARGUMENTS = {
    "negative seed": (["--seed", -1], "--seed must be in [0, 18446744073709551615]"),
    "seed of 2^64": (["--seed", 2**64], "--seed must be in"),
    "seed + n overflows": (["--seed", 2**64 - 1, "--n-images", 2], "image i uses seed + i"),
    "a billion steps": (["--steps", 10**9], "--steps must be in [1, 10000]"),
    "zero steps": (["--steps", 0], "--steps must be in [1, 10000]"),
    "steps not a number": (["--steps", "many"], "argument --steps: invalid int value"),
    "nan guidance": (["--guidance", "nan"], "--guidance must be a finite number"),
    "inf guidance": (["--guidance", "inf"], "--guidance must be a finite number"),
    "nan true cfg": (["--true-cfg", "nan"], "--true-cfg must be a finite number"),
    "nan lora weight": (["--lora", "x.safetensors:nan"], "is not a finite number"),
    "inf lora weight": (["--lora", "x.safetensors:-inf"], "is not a finite number"),
    "huge lora weight": (["--lora", "x.safetensors:1e6"], "the weight must be in [-1000, 1000]"),
    "zero batch": (["--batch-size", 0], "--batch-size must be in [1, 10000]"),
    "too many images": (["--n-images", 10**7], "--n-images must be in [1, 10000]"),
    "bad truncation": (["--cfg-truncation", 2], "--cfg-truncation must be in [0, 1]"),
    "unknown dtype": (["--dtype", "float64"], "invalid choice: 'float64'"),
    "class label on a text model": (["--class-label", 207], "draws from text, not class labels"),
    "true cfg on a non-distilled model": (["--true-cfg", 3], "--true-cfg: tiny-shapes is not guidance-distilled"),
}


@pytest.mark.parametrize("case", list(ARGUMENTS))
def test_arguments_out_of_range(case, tmp_path, capsys):
    extra, message = ARGUMENTS[case]
    prompt = [] if "--class-label" in extra else ["--prompt", "a red circle"]
    argv = [*prompt, *FAST, "--output", tmp_path / "out.png", *extra]
    one_line(*generate(argv, capsys), message)
    assert not any(tmp_path.iterdir())


# ---- files --------------------------------------------------------------------------------------

PROMPT_FILES = {
    "a number as the prompt": ('{"prompt": 7}', "line 1: needs a non-empty 'prompt' (text), got 7"),
    "a string as the width": ('{"prompt": "a", "width": "64"}', "line 1: 'width' must be an integer, got '64'"),
    "a string as the steps": ('a red circle\n{"prompt": "a", "steps": "2"}', "line 2: 'steps' must be an integer"),
    "a list as the negative prompt": ('{"prompt": "a", "negative_prompt": ["x"]}', "'negative_prompt' must be text"),
    "a float seed": ('{"prompt": "a", "seed": 1.5}', "'seed' must be an integer, got 1.5"),
    "a negative seed": ('{"prompt": "a", "seed": -4}', "'seed' must be in [0, 18446744073709551615]"),
    "nan guidance": ('{"prompt": "a", "guidance": NaN}', "'guidance' must be a finite number"),
    "a float width": ('{"prompt": "a", "width": 64.0}', "line 1: 'width' must be an integer, got 64.0"),
    "an unknown key": ('{"prompt": "a", "sede": 1}', "unknown keys ['sede']"),
    "broken JSON": ('{"prompt": "a"', "line 1: Expecting"),
    "steps of 10^9": ('{"prompt": "a", "steps": 1000000000}', "'steps' must be in [1, 10000]"),
}


@pytest.mark.parametrize("case", list(PROMPT_FILES))
def test_prompt_file_values_of_the_wrong_type(case, tmp_path, capsys):
    text, message = PROMPT_FILES[case]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text + "\n")
    status, err = generate(["--prompt-file", prompts, *FAST, "--output", tmp_path / "o.png"], capsys)
    one_line(status, err, str(prompts), message)
    assert not (tmp_path / "o.png").exists()


def test_prompt_file_not_utf8(tmp_path, capsys):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("a red circle\nune île\n".encode("latin-1"))
    status, err = generate(["--prompt-file", prompts, "--output", tmp_path / "o.png"], capsys)
    one_line(status, err, f"--prompt-file {prompts} line 2: not UTF-8 text (byte 0xee)")


def test_output_naming_a_folder_fails_before_generating(tmp_path, capsys):
    folder = tmp_path / "taken.png"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        status, err = generate(["--prompt", "x", "--output", folder, *extra], capsys)
        one_line(status, err, f"--output {folder} is a folder")
        assert "denoising" not in err  # refused before any step
    assert list(folder.iterdir()) == []


def test_stepwise_output_naming_a_file(tmp_path, capsys):
    file = tmp_path / "steps"
    file.write_text("keep me")
    status, err = generate(["--prompt", "x", "--stepwise-output", file, "--output", tmp_path / "o.png"], capsys)
    one_line(status, err, f"--stepwise-output {file} is a file")
    assert file.read_text() == "keep me" and not (tmp_path / "o.png").exists()


def _png_with(tmp_path, **text) -> Path:
    from tiny_imagegen.commands.metadata import save_png

    path = tmp_path / "made.png"
    save_png(Image.new("RGB", (8, 8)), path, {"prompt": "a red circle", "software": "tiny_imagegen 0", **text})
    return path


REPLAYED = {
    "loras not a list": ({"loras": '"x.safetensors"'}, "the stored 'loras' must be a JSON list"),
    "loras not JSON": ({"loras": "[x"}, "the stored 'loras' must be a JSON list"),
    "unknown dtype": ({"dtype": "float64"}, "the stored 'dtype' must be one of auto, float32"),
    "nan guidance": ({"guidance": "nan"}, "the stored 'guidance' must be a finite number"),
    "inf strength": ({"strength": "inf"}, "the stored 'strength' must be a finite number"),
    "text steps": ({"steps": "lots"}, "the stored 'steps' must be in [1, 10000], got 'lots'"),
    "negative seed": ({"seed": "-5"}, "the stored 'seed' must be in [0, 18446744073709551615]"),
    "seed of 2^64": ({"seed": str(2**64)}, "the stored 'seed' must be in"),
    "unknown quantization": ({"quantization": "3-bit"}, "the stored 'quantization' must be one of none, 4-bit, 8-bit"),
    "nan true cfg": ({"true_cfg": "nan"}, "the stored 'true_cfg' must be a finite number"),
    "nan lora weight": ({"loras": '["x.safetensors:nan"]'}, "is not a finite number"),
}


@pytest.mark.parametrize("case", list(REPLAYED))
def test_replayed_metadata_keeps_the_flags_types_and_choices(case, tmp_path, capsys):
    text, message = REPLAYED[case]
    png = _png_with(tmp_path, **text)
    status, err = generate(["--config-from-metadata", png, "--output", tmp_path / "o.png"], capsys)
    one_line(status, err, message)
    assert not (tmp_path / "o.png").exists()


def test_info_into_a_closed_pipe(tmp_path):
    png = _png_with(tmp_path, negative_prompt="x" * 20000)  # 50 copies: 1 MB, beyond any pipe's buffer
    r = subprocess.run(f"{sys.executable} -m tiny_imagegen info {' '.join([str(png)] * 50)} | head -1",
                       shell=True, capture_output=True, text=True, env=ENV, timeout=120)
    assert r.stdout.strip() == str(png)
    assert r.stderr == "", r.stderr  # no BrokenPipeError traceback, no "Exception ignored" either


# ---- LoRA files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer():
    from tiny_imagegen.checkpoints.convert import load_component

    return load_component(TINY, "transformer")


def _lora(path, transformer, rank=2, alpha=None, metadata=None, extra=(), fmt="kohya"):
    """A LoRA of `fmt` on one layer of the tiny-shapes transformer (plus `extra` stray keys)."""
    from tiny_imagegen.checkpoints.lora import SUFFIXES, layer_names
    from tiny_imagegen.layers.lora import get_layer, linear_shape

    name, target = next(iter(layer_names(fmt, {"transformer": transformer}).items()))
    a_key, b_key, alpha_key = SUFFIXES[fmt]
    inputs = linear_shape(get_layer(transformer, target.module))[1]
    tensors = {f"{name}.{a_key}": mx.zeros((rank, inputs)), f"{name}.{b_key}": mx.zeros((target.stop - target.start, rank))}
    if alpha is not None:
        tensors[f"{name}.{alpha_key}"] = mx.array(alpha)
    tensors.update({k: mx.zeros((1,)) for k in extra})
    mx.save_safetensors(str(path), tensors, metadata=metadata or {})
    return path


def _lora_error(path, transformer):
    from tiny_imagegen.checkpoints.lora import apply_loras
    from tiny_imagegen.checkpoints.mapping import CheckpointError

    with pytest.raises(CheckpointError) as e:
        apply_loras({"transformer": transformer}, [(str(path), 1.0)])
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    return message


def test_lora_of_rank_zero(tmp_path, transformer):
    message = _lora_error(_lora(tmp_path / "r0.safetensors", transformer, rank=0, alpha=4.0), transformer)
    assert "r0.safetensors" in message and "rank 0" in message


def test_lora_alpha_not_a_number(tmp_path, transformer):
    path = _lora(tmp_path / "nan.safetensors", transformer, alpha=float("nan"))
    assert "not one finite number" in _lora_error(path, transformer)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "big", "transformer.r": 2})}
    path = _lora(tmp_path / "alpha.safetensors", transformer, metadata=meta, fmt="diffusers")
    message = _lora_error(path, transformer)
    assert "alpha.safetensors" in message and "lora_alpha is 'big', not a finite number" in message
    meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 4, "transformer.r": 0})}
    message = _lora_error(_lora(tmp_path / "r.safetensors", transformer, metadata=meta, fmt="diffusers"), transformer)
    assert "transformer.r is 0, not a positive integer" in message


def test_lora_metadata_not_json(tmp_path, transformer):
    path = _lora(tmp_path / "meta.safetensors", transformer, metadata={"lora_adapter_metadata": "{not json"},
                 fmt="diffusers")
    message = _lora_error(path, transformer)
    assert message.startswith(f"{path}: its lora_adapter_metadata is not JSON")


def test_lora_unknown_keys_one_line_and_all_with_verbose(tmp_path, capsys):
    from tiny_imagegen.checkpoints.convert import load_component

    stray = [f"lora_unet_nowhere_{i}.lora_down.weight" for i in range(15)]
    path = _lora(tmp_path / "stray.safetensors", load_component(TINY, "transformer"), extra=stray)
    base = ["--prompt", "a red circle", *FAST, "--lora", path, "--output", tmp_path / "o.png"]
    one_line(*generate(base, capsys), "stray.safetensors (kohya format) does not fit this model: 15 unknown key(s):",
             "(--verbose lists them all)")
    status, err = generate([*base, "--verbose"], capsys)
    assert status == 2 and "Traceback" not in err
    assert all(k.removesuffix(".lora_down.weight") in err for k in stray)
    assert not (tmp_path / "o.png").exists()


# ---- hostile converted folders ------------------------------------------------------------------


def _folder(tmp_path, change) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    manifest = json.loads((folder / "model.json").read_text())
    change(manifest)
    (folder / "model.json").write_text(json.dumps(manifest))
    return folder


def _set(path: str, value):
    """A change to model.json: the value at a dotted path (created where missing)."""
    *head, last = path.split(".")

    def change(m):
        for key in head:
            m = m.setdefault(key, {})
        m[last] = value

    return change


def _rename(component: str, name: str):
    def change(m):
        old = m["components"][component]["file"]
        m["components"][component]["file"] = name
        m["files"][name] = m["files"].pop(old)

    return change


FOLDERS = {
    "file ../x": (_rename("t5", "../secret.safetensors"), "file '../secret.safetensors' is outside the model folder"),
    "absolute file": (_rename("vae", "/etc/passwd"), "file '/etc/passwd' is outside the model folder"),
    "a listed file outside": (lambda m: m["files"].update({"/etc/hostname": {"size": 1, "sha256": "0"}}),
                              "file '/etc/hostname' is outside the model folder"),
    "head_dim 10^9": (_set("components.transformer.config.head_dim", 10**9), "config.head_dim 1000000000 is not an integer in 1..1024"),
    "vocabulary 10^9": (_set("components.t5.config.vocab_size", 10**9), "config.vocab_size"),
    "text length 10^9": (_set("pipeline.defaults.text_length", 10**9), "pipeline.defaults.text_length"),
    "negative text length": (_set("pipeline.defaults.text_length", -5), "text_length -5 is not an integer in 1..4096"),
    "no text tokens on a text model": (_set("pipeline.defaults.text_length", 0), "text_length 0 is not an integer in 1..4096"),
    "steps 10^9": (_set("pipeline.defaults.steps", 10**9), "pipeline.defaults.steps"),
    "a string for an int": (_set("components.transformer.config.depth_double", "2"), "depth_double '2' is not an integer"),
    "a float for an int": (_set("components.t5.config.d_model", 128.0), "d_model 128.0 is not an integer"),
    "nan for a float": (_set("components.vae.config.scaling_factor", float("nan")), "scaling_factor nan is not a finite"),
    "a list too long": (_set("components.vae.config.block_out_channels", [8] * 100), "not a list of at most 64 values"),
    "MagCache ratios, 10^5 of them": (_set("pipeline.defaults.mag_ratios", [1.0] * 10**5),
                                      "mag_ratios [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,... (100000 values) is not a list"),
    "a MagCache ratio not a number": (_set("pipeline.defaults.mag_ratios", [1.0, "x"]), "mag_ratios 'x' is not a finite number"),
    "a negative MagCache ratio": (_set("pipeline.defaults.mag_ratios", [1.0, -0.5]), "mag_ratios -0.5 is not a number in 0..100"),
    "a MagCache retention above 1": (_set("pipeline.defaults.mag_retention", 1.5), "mag_retention 1.5 is not a number in 0..1"),
    "unknown family": (_set("pipeline.family", "flux9"), "pipeline.family 'flux9' is not a family this code runs"),
    "unknown component": (_set("components.warp_drive", {"file": "t5.safetensors"}), "components['warp_drive'] is not a component"),
    "no files key": (lambda m: m.pop("files"), "'files' is missing or not an object"),
    "wrong recorded size": (lambda m: m["files"]["t5.safetensors"].update(size=12),
                            "is 1,366,680 bytes, model.json records 12"),
    "unknown quantization": (_set("quantization", {"bits": 3, "group_size": 64}), "quantization.bits 3 is not one of"),
    "components a list": (_set("components", []), "'components' is missing or not an object"),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_hostile_converted_folder(case, tmp_path, capsys):
    change, message = FOLDERS[case]
    folder = _folder(tmp_path, change)
    status, err = generate(["--model", folder, "--prompt", "a red circle", *FAST, "--width", 64, "--height", 64,
                            "--output", tmp_path / "o.png"], capsys)
    one_line(status, err, message)
    assert not (tmp_path / "o.png").exists()


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    from tiny_imagegen.checkpoints.convert import check_files
    from tiny_imagegen.checkpoints.manifest import ManifestError

    outside = tmp_path / "outside.safetensors"
    shutil.copy(TINY / "t5.safetensors", outside)
    folder = _folder(tmp_path, lambda m: None)
    (folder / "t5.safetensors").unlink()
    (folder / "t5.safetensors").symlink_to(outside)
    with pytest.raises(ManifestError, match="'t5.safetensors' is outside the model folder"):
        check_files(folder)


# ---- convert, the Python API --------------------------------------------------------------------


def test_convert_bad_input_exits_2(tmp_path):
    for argv, message in ((["--model", tmp_path / "nothing-here", "--output", tmp_path / "o"], "error: "),
                          (["--model", TINY, "--output", tmp_path / "o", "--quantize", "3"], "invalid choice: 3")):
        r = subprocess.run([sys.executable, "-m", "tiny_imagegen", "convert", *map(str, argv)],
                           capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_batched_position_ids_are_refused_alike_in_every_family():
    """diffusers' FLUX.1 takes (B, L, 3) ids and uses ids[0]; here FLUX.1 and FLUX.2 both refuse
    them in one line (positions are shared by the batch)."""
    from tiny_imagegen.models.flux2 import Flux2Config, Flux2Transformer
    from tiny_imagegen.models.mmdit import MMDiT, MMDiTConfig

    flux1 = MMDiT(MMDiTConfig(in_channels=16, num_heads=2, head_dim=16, depth_double=1, depth_single=1, context_dim=8,
                              vec_dim=8, axes_dim=(4, 6, 6)))
    flux2 = Flux2Transformer(Flux2Config(in_channels=16, num_heads=2, head_dim=16, depth_double=1, depth_single=1,
                                         context_dim=8, axes_dim=(4, 4, 4, 4)))
    img, txt, t = mx.zeros((2, 4, 16)), mx.zeros((2, 3, 8)), mx.array([0.5, 0.5])
    for model, extra in ((flux1, {"y": mx.zeros((2, 8))}), (flux2, {})):
        txt_ids, img_ids = model.position_ids(2, 2, 3)
        good = model(img, img_ids, txt, txt_ids, t, **extra)
        assert good.shape == (2, 4, 16)
        batched = np.stack([img_ids, img_ids])
        with pytest.raises(ValueError, match=r"img_ids must be \(4, \d\), shared by the batch; got \(2, 4, \d\)"):
            model(img, batched, txt, txt_ids, t, **extra)


# ---- races and signals --------------------------------------------------------------------------


def test_save_png_never_replaces_without_overwrite(tmp_path):
    from tiny_imagegen.commands.metadata import save_png

    out = tmp_path / "o.png"
    out.write_bytes(b"the other run's image")
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (4, 4)), out, {"prompt": "x"}, overwrite=False)
    assert out.read_bytes() == b"the other run's image" and [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_two_runs_on_one_output(tmp_path):
    """Started together, both find the output free; exactly one writes it, the other exits 2."""
    out = tmp_path / "o.png"
    runs = [subprocess.Popen([sys.executable, "-m", "tiny_imagegen", "generate", "--steps", "3", "--seed", str(s),
                              "--output", str(out)], stderr=subprocess.PIPE, text=True, env=ENV) for s in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    assert sorted(r for r, _ in results) == [0, 2], results
    seed = next(s for s, (r, _) in zip((1, 2), results) if r == 0)
    err = next(e for r, e in results if r == 2)
    assert "Traceback" not in err and "exists" in err.strip().splitlines()[-1], err  # after the progress lines
    assert Image.open(out).text["seed"] == str(seed)  # the winner's image, not replaced by the loser
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


SLOW_SAVE = """
import sys, time
import PIL.Image
original = PIL.Image.Image.save
def slow(self, fp, *args, **kwargs):
    fp.write(b"partial")
    fp.flush()
    time.sleep(60)
PIL.Image.Image.save = slow
from tiny_imagegen.commands.generate import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_the_png_write_leaves_no_tmp(tmp_path):
    out = tmp_path / "o.png"
    p = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "--steps", "1", "--output", str(out)],
                         stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".o.png.*.tmp")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".o.png.*.tmp")), "the write never started"
    p.send_signal(signal.SIGTERM)
    status, err = p.wait(timeout=60), p.stderr.read()
    assert status == 128 + signal.SIGTERM and "terminated: no partial image written" in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the .tmp nor a partial o.png


def test_valid_input_still_runs(tmp_path, capsys):
    """The bounds are not tighter than real use: the largest seed, a seed list, a JSON prompt file."""
    prompts = tmp_path / "p.txt"
    prompts.write_text('{"prompt": "a blue square", "seed": 18446744073709551614, "steps": 1, "guidance": 4}\n')
    status, err = generate(["--prompt-file", prompts, "--n-images", 2, "--output", tmp_path / "o-{i}.png"], capsys)
    assert status == 0, err
    assert [Image.open(tmp_path / f"o-{i}.png").text["seed"] for i in (0, 1)] == [str(2**64 - 2), str(2**64 - 1)]
    assert math.isfinite(float(Image.open(tmp_path / "o-0.png").text["guidance"]))


def test_published_configs_are_within_the_bounds():
    """manifest.py's bounds are above every published model's config and sampling defaults."""
    import dataclasses
    import importlib
    import pkgutil

    import tiny_imagegen.models
    from tiny_imagegen import registry
    from tiny_imagegen.checkpoints.components import COMPONENTS, import_ref
    from tiny_imagegen.checkpoints.manifest import check_config, check_manifest

    def fail(field, what):
        raise AssertionError(f"{field} {what}")

    refs = {import_ref(c.config): c.config for c in COMPONENTS.values()}
    configs = [cls() for cls in refs]  # the defaults: the published full-size models
    for info in pkgutil.iter_modules(tiny_imagegen.models.__path__):  # presets such as QWEN3_8B, T5_V1_1_XXL
        module = importlib.import_module(f"tiny_imagegen.models.{info.name}")
        configs += [v for v in vars(module).values() if type(v) in refs]
    for config in configs:
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
        check_config(refs[type(config)], values, fail)
    assert len(configs) >= len(COMPONENTS) + 3
    manifest = json.loads((TINY / "model.json").read_text())
    for spec in registry.MODELS:
        defaults = json.loads(json.dumps(dataclasses.asdict(spec.defaults)))  # as model.json holds them: lists
        manifest["pipeline"] = {"family": spec.family, "defaults": defaults}
        check_manifest(TINY, manifest)
