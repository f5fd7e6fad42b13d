"""The command line as users run it: subcommands, prompt files, repeatable seeds, re-running from
an image's metadata, previews per step, warnings, and the registry listing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from test_pipeline import hub_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2"]  # the shipped tiny model (64x64), two steps: a fraction of a second


def cli(*args, cwd=None, script="generate.py"):
    cmd = [sys.executable, str(ROOT / "examples" / script)] if script else [sys.executable, "-m", "tiny_imagegen"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300)


def test_version_and_subcommands():
    from tiny_imagegen import __version__

    for r in (cli("--version"), cli("--version", script=None)):
        assert r.returncode == 0 and r.stdout.strip() == f"tiny_imagegen {__version__}"
    r = cli(script=None)
    assert r.returncode == 2 and all(c in r.stdout for c in ("generate", "convert", "train", "evaluate", "info", "models"))
    r = cli("paint", script=None)
    assert r.returncode == 2 and "unknown command 'paint'" in r.stderr


def test_model_list_shows_every_registered_model(tmp_path):
    from tiny_imagegen import registry

    for r in (cli("--model", "list"), cli("models", script=None)):
        assert r.returncode == 0, r.stderr
        rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
        assert set(registry.names()) <= set(rows)
        assert "shipped" in rows["tiny-shapes"] and "Apache-2.0" in rows["flux1-schnell"]
        assert "33.7 GB" in rows["flux1-schnell"] and "9.9 GB" in rows["flux1-schnell"]  # bf16 / 4-bit on disk
        assert "(gated)" in rows["flux1-dev"]


def test_info_and_config_from_metadata_remake_the_image(tmp_path):
    first = tmp_path / "a.png"
    r = cli("--prompt", "a green square", "--seed", 11, *FAST, "--output", first)
    assert r.returncode == 0, r.stderr
    r = cli("info", first, script=None)
    assert r.returncode == 0 and "a green square" in r.stdout and "seed             11" in r.stdout
    again = tmp_path / "b.png"
    r = cli("--config-from-metadata", first, "--output", again)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(again).text == Image.open(first).text
    other = tmp_path / "c.png"  # a flag given overrides the stored value
    assert cli("--config-from-metadata", first, "--seed", 12, "--output", other).returncode == 0
    assert Image.open(other).text["seed"] == "12"
    r = cli("--config-from-metadata", ROOT / "README.md", "--output", tmp_path / "d.png")
    assert r.returncode == 2 and "not a readable image" in r.stderr
    r = cli("info", ROOT / "README.md", script=None)
    assert r.returncode == 2 and "error:" in r.stderr


def test_prompt_file_loads_the_model_once(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n" + json.dumps({"prompt": "a blue square", "seed": 40}) + "\n"
                       + json.dumps({"prompt": "a yellow triangle", "width": 32, "height": 32}) + "\n")
    r = cli("--prompt-file", prompts, "--seed", 5, *FAST, "--output", tmp_path / "p-{i}-{seed}.png", "--verbose")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("loaded in") == 1
    names = sorted(p.name for p in tmp_path.glob("p-*.png"))
    assert names == ["p-0-5.png", "p-1-40.png", "p-2-5.png"]
    assert Image.open(tmp_path / "p-1-40.png").text["prompt"] == "a blue square"
    assert Image.open(tmp_path / "p-2-5.png").size == (32, 32)
    for text, message in (("{\"seed\": 1}\n", "line 1: needs a non-empty 'prompt'"), ("{oops\n", "line 1:"),
                          ("\n", "holds no prompt"), ("{\"prompt\": \"x\", \"sed\": 1}\n", "unknown keys ['sed']"),
                          ("{\"prompt\": \"x\", \"width\": 40}\n", "line 1: --width 40")):
        prompts.write_text(text)
        r = cli("--prompt-file", prompts, "--output", tmp_path / "x.png")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_repeated_seeds_give_one_image_each(tmp_path):
    r = cli("--prompt", "a red circle", "--seed", 3, "--seed", 9, *FAST, "--output", tmp_path / "s{seed}.png")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3.png", "s9.png"]
    alone = tmp_path / "alone.png"
    assert cli("--prompt", "a red circle", "--seed", 9, *FAST, "--output", alone).returncode == 0
    diff = np.abs(np.asarray(Image.open(alone), np.int16) - np.asarray(Image.open(tmp_path / "s9.png"), np.int16))
    assert diff.max() <= 1  # batched matmuls may round differently, never by more than one level
    r = cli("--prompt", "a red circle", "--seed", 3, "--seed", 9, "--n-images", 3, "--output", tmp_path / "y.png")
    assert r.returncode == 2 and "give one or the other" in r.stderr


def test_stepwise_output_writes_every_step(tmp_path):
    steps = tmp_path / "steps"
    r = cli("--prompt", "a red circle", "--seed", 1, "--steps", 3, "--output", tmp_path / "final.png",
            "--stepwise-output", steps)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in steps.iterdir()) == ["step-001.png", "step-002.png", "step-003.png"]
    last, final = (np.asarray(Image.open(p)) for p in (steps / "step-003.png", tmp_path / "final.png"))
    assert np.array_equal(last, final)  # the last preview is the image


def test_verbose_prints_each_phase(tmp_path):
    r = cli("--prompt", "a red circle", *FAST, "--output", tmp_path / "v.png", "--verbose")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("prompt 1/1:"))
    assert all(f"{phase} " in line for phase in ("text", "denoise", "decode")) and line.count("GiB") == 3


def test_warnings_for_habits_that_cost(tmp_path):
    long = "a red circle " + "and a very long description " * 8
    r = cli("--prompt", long, *FAST, "--output", tmp_path / "w.png")
    assert r.returncode == 0 and "token(s) longer than tiny-shapes's text length (16)" in r.stderr
    schnell_like = hub_folder(tmp_path, "schnell_like")
    r = cli("--model", schnell_like, "--prompt", "a cat", "--guidance", 3.5, "--width", 32, "--height", 32,
            "--steps", 1, "--output", tmp_path / "g.png")
    assert r.returncode == 0, r.stderr
    assert "--guidance 3.5" in r.stderr and "twice the time" in r.stderr
    r = cli("--model", schnell_like, "--prompt", "a cat", "--width", 32, "--height", 32, "--steps", 1,
            "--output", tmp_path / "h.png")
    assert r.returncode == 0 and "warning" not in r.stderr


def test_quantize_on_an_already_quantized_folder_is_an_error(tmp_path):
    from tiny_imagegen.registry.convert import convert

    import mlx.core as mx

    q = convert(hub_folder(tmp_path, "dev_like"), tmp_path / "q8", bits=8, dtype=mx.float32)
    r = cli("--model", q, "--prompt", "a cat", "--quantize", 4, "--output", tmp_path / "q.png")
    assert r.returncode == 2 and "already quantized (8-bit" in r.stderr and not (tmp_path / "q.png").exists()


def test_modulation_bits_on_load_and_in_convert(tmp_path):
    """--quantize 4 --modulation-bits 8: the adaLN modulation Linears at 8 bits, the rest at 4, on
    load (generate) and in a converted folder (convert); recorded in the PNG and the manifest."""
    import mlx.nn as nn

    from tiny_imagegen.checkpoints.convert import read_manifest
    from tiny_imagegen.checkpoints.quantize import Quantization
    from tiny_imagegen.commands.metadata import read_parameters
    from tiny_imagegen.pipelines.pipeline import Pipeline

    folder = hub_folder(tmp_path, "dev_like")
    pipe = Pipeline.from_pretrained(str(folder), quantize=Quantization(4, group_size=32, modulation_bits=8))  # width 32
    bits = {p: m.bits for p, m in pipe.transformer.named_modules() if isinstance(m, nn.QuantizedLinear)}
    mod = {p for p in bits if p.endswith(("_mod.lin", "modulation.lin"))}
    print(f"{len(mod)} modulation layers at 8 bits, {len(bits) - len(mod)} others at 4")
    assert mod and all(bits[p] == 8 for p in mod) and {bits[p] for p in set(bits) - mod} == {4}

    r = cli("--model", folder, "--prompt", "a cat", "--width", 32, "--height", 32, *FAST,
            "--quantize", 4, "--modulation-bits", 8, "--output", tmp_path / "m.png")
    assert r.returncode == 0, r.stderr
    meta = read_parameters(tmp_path / "m.png")
    assert meta["quantization"] == "4-bit" and meta["modulation_bits"] == "8"
    r = cli("--prompt", "a red circle", "--modulation-bits", 8, "--output", tmp_path / "x.png")
    assert r.returncode == 2 and "--modulation-bits needs --quantize" in r.stderr and not (tmp_path / "x.png").exists()

    r = cli("--model", folder, "--output", tmp_path / "q4m8", "--quantize", 4,
            "--modulation-bits", 8, "--dtype", "float32", script="convert.py")
    assert r.returncode == 0, r.stderr
    q = read_manifest(tmp_path / "q4m8")["quantization"]
    assert q["bits"] == 4 and q["modulation_bits"] == 8


def test_finding_a_model_does_not_import_the_pipeline():
    """Where a model is (registry/) sits below the pipelines: finding one loads no pipeline code
    (tests/test_layering.py checks every import; this checks what actually runs)."""
    code = ("import sys, tiny_imagegen.registry.where, tiny_imagegen.registry.hub, tiny_imagegen.registry.convert; "
            "assert not any(m.startswith('tiny_imagegen.pipelines') for m in sys.modules), 'registry imports pipelines'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_every_name_resolves_through_the_registry():
    from tiny_imagegen import registry
    from tiny_imagegen.checkpoints.components import COMPONENTS

    for spec in registry.MODELS:
        for name in (spec.name, *spec.aliases):
            assert registry.find(name) is spec
        family = registry.FAMILIES[spec.family]
        assert set(spec.configs) <= set(family.components + family.optional_components) <= set(COMPONENTS)
        assert spec.repo_id is None or registry.by_repo(spec.repo_id) is spec
    assert registry.find("flux3-turbo") is None
    assert registry.family_for_pipeline_class("FluxPipeline").name == "flux1"


def test_class_conditional_flags(tmp_path):
    """DiT through the command: --class-label by id or name, --sampler; bad names and options refused."""
    from conftest import fixture_path

    repo = fixture_path("dit_pipeline", "repo")
    size = ["--width", 64, "--height", 64, "--steps", 2, "--guidance", 2.0]  # the tiny repo's 8x8 latents
    r = cli("--model", repo, "--class-label", 207, "--class-label", "goldfish", "--sampler", "euler", *size,
            "--seed", 0, "--output", tmp_path / "c{i}.png")
    assert r.returncode == 0, r.stderr
    assert [Image.open(tmp_path / f"c{i}.png").text["prompt"] for i in (0, 1)] == ["207", "goldfish"]
    for extra, message in ((["--class-label", "golden retreiver"], "golden retreiver"),
                           (["--class-label", 1, "--karras"], "--karras is not an option of"),
                           (["--class-label", 1, "--image", ROOT / "README.md"], "not a readable image"),
                           (["--class-label", 1, "--prompt", "x"], "not both")):
        r = cli("--model", repo, *extra, *size, "--output", tmp_path / "bad.png")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    r = cli("--model", repo, "--class-label", 1, "--image", init, *size, "--output", tmp_path / "bad.png")
    assert r.returncode == 2 and "no image-to-image" in r.stderr
    assert not (tmp_path / "bad.png").exists()


def test_lora_flag_and_its_metadata(tmp_path):
    """--lora PATH:WEIGHT (repeatable) changes the image, is listed in the PNG with its sha256
    prefix, and --config-from-metadata re-applies it; with --quantize it is merged first."""
    from conftest import fixture_path

    model = hub_folder(tmp_path, "dev_like")
    lora = fixture_path("flux_lora", "kohya.safetensors")
    base = ["--model", model, "--prompt", "a cat", "--width", 32, "--height", 32, "--steps", 2, "--seed", 1]
    assert cli(*base, "--output", tmp_path / "plain.png").returncode == 0
    r = cli(*base, "--lora", f"{lora}:0.8", "--output", tmp_path / "lora.png")
    assert r.returncode == 0, r.stderr
    text = Image.open(tmp_path / "lora.png").text
    assert json.loads(text["loras"]) == [f"{lora}:0.8"] and len(json.loads(text["lora_sha256"])[0]) == 12
    plain, with_lora = (np.asarray(Image.open(tmp_path / f), np.int16) for f in ("plain.png", "lora.png"))
    assert np.abs(plain - with_lora).max() > 2
    r = cli("--config-from-metadata", tmp_path / "lora.png", "--output", tmp_path / "again.png")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "lora.png")))
    assert cli(*base, "--lora", lora, "--quantize", 8, "--output", tmp_path / "q.png").returncode == 0
    for spec, message in ((f"{lora}:heavy", "heavy"), (str(tmp_path / "none.safetensors"), "none.safetensors")):
        r = cli(*base, "--lora", spec, "--output", tmp_path / "bad.png")
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
