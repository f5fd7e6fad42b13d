"""The ablation runner (train/ablations/runner.py, commands/ablate.py): a smoke run of every variant.

- every backbone is within 10% of the shipped MM-DiT's parameters, and a variant that is not fails;
- the samplers: with an oracle model (the true velocity / noise of a known x0) flow-matching Euler
  and DDIM both land on x0, so each objective's time convention is wired right; and the flow
  sampler gives the Pipeline's images on the shipped weights (the rows are scored as the README's
  shipped numbers are);
- the smoke run (2 steps per variant, a caption or two): the results file, the table and the grid
  are written and parse; a rerun trains nothing; `--only` runs one row; a run locked by another
  process is skipped, and `--jobs 2` shares runs between two processes, each run once;
- the table's statistics: mean ± half the range, the budget check, "better beyond the spread".
"""

import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image

from tiny_imagegen.diffusion import ddpm
from tiny_imagegen.commands.ablate import main as ablate, without_jobs
from tiny_imagegen.train.ablations import runner as ab
from tiny_imagegen.train.ablations.scoring import (
    DDPM_SCHEDULE, caption_sets, generate, is_binding_case, sample_ddpm, sample_flow,
)
from tiny_imagegen.train.ablations.backbones import AbsolutePositionIn, rope_ids
from tiny_imagegen.train.ablations.report import beats_reference, cell, format_table, parse_table
from tiny_imagegen.train.shapes_dataset import parse_caption

WEIGHTS = Path(__file__).parents[1] / "weights" / "tiny-shapes"


def test_parameter_counts_within_ten_percent():
    counts = ab.check_parameters(verbose=True)
    assert set(counts) == set(ab.VARIANTS)
    for name, n in counts.items():
        assert abs(n / ab.SHIPPED_PARAMETERS - 1) <= 0.10, name
    assert counts[ab.REFERENCE] == ab.SHIPPED_PARAMETERS  # the shipped recipe's variant is the shipped MM-DiT
    too_big = replace(ab.VARIANTS["dit-adaln"], name="dit-10", backbone=ab._dit("adaln-zero", 10))
    with pytest.raises(ValueError, match="dit-10"):
        ab.check_parameters([too_big])


def test_groups_name_known_variants():
    assert all(n in ab.VARIANTS for names in ab.GROUPS.values() for n in names)
    assert all(ab.REFERENCE in names for names in ab.GROUPS.values())
    assert [s.name for s in ab.plan_runs()][:2] == ["mmdit-seed0", "dit-adaln-seed0"]  # the budget check first
    with pytest.raises(ValueError, match="unknown variant"):
        ab.plan_runs(["mmdit-rope"])


def test_oracle_samplers_reach_x0():
    x0 = mx.random.normal((2, 4, 4, 4), key=mx.random.key(0))
    noise = mx.random.normal(x0.shape, key=mx.random.key(1))
    abar = ddpm.alphas_cumprod(DDPM_SCHEDULE)

    def velocity(x, t):  # x_t = (1 - t) x0 + t ε  =>  v = ε - x0 = (x_t - x0) / t
        return (x - x0) / t

    def eps(x, t):  # t = k / 1000: the DDPM step enters on [0, 1]
        a = float(abar[int(round(t * DDPM_SCHEDULE.num_train_timesteps))])
        return (x - a**0.5 * x0) / (1 - a) ** 0.5

    for name, out in (("flow", sample_flow(velocity, noise, 7)), ("ddpm", sample_ddpm(eps, noise, 7))):
        err = float(mx.max(mx.abs(out - x0)))
        print(f"{name} oracle sampler: max |x - x0| {err:.2e}")
        assert err < 1e-4, name


def test_flow_sampler_is_the_pipelines_on_the_shipped_weights():
    from tiny_imagegen.checkpoints.convert import load_component
    from tiny_imagegen.text.t5_sentencepiece import T5Tokenizer
    from tiny_imagegen.train.tiny_shapes import generate_images, load_pipeline

    model = ab.build_denoiser(ab.VARIANTS[ab.REFERENCE], 100, 0)
    model.backbone.transformer = load_component(WEIGHTS, "transformer", dtype=mx.float32)
    model.text_encoder = load_component(WEIGHTS, "t5", dtype=mx.float32)
    vae = load_component(WEIGHTS, "vae", dtype=mx.float32)
    tokenizer = T5Tokenizer.from_folder(WEIGHTS / "tokenizer_2", max_length=16)
    captions, seeds = ["a red circle", "a blue square above a yellow circle"], [3, 4]
    ours = generate(model, "flow", vae, tokenizer, captions, seeds, 64, steps=4, guidance=4.0)
    theirs = generate_images(load_pipeline(WEIGHTS), captions, seeds, steps=4, guidance=4.0)
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    print(f"ablation sampler vs Pipeline: max pixel difference {diff.max()}, mean {diff.mean():.4f}")
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_positions():
    txt, img = rope_ids("rope-centred", 8, 8, 16)
    assert img.min() == -4 and img.max() == 3 and txt[0, 0] == 4  # text on the diagonal beyond the grid
    txt, img = rope_ids("rope-corner", 16, 16, 16)
    assert img.min() == 0 and img.max() == 15 and txt[0, 0] == 16
    mx.random.seed(0)
    for kind in ("ape-learned", "ape-sincos"):
        ape = AbsolutePositionIn(nn.Linear(16, 32), kind, 8)
        assert ape.table(8).shape == (64, 32) and ape.table(16).shape == (256, 32)
        assert ape(mx.zeros((2, 256, 16))).shape == (2, 256, 32)
        with pytest.raises(ValueError, match="square token grid"):
            ape(mx.zeros((1, 32, 16)))
    learned = AbsolutePositionIn(nn.Linear(16, 32), "ape-learned", 8)
    assert mx.array_equal(learned.table(8), learned.pos_embed.weight)  # the trained size is the table itself


def test_binding_captions():
    sets = caption_sets(20, 10)
    assert len(sets["train"]) == 20 and len(sets["binding"]) == 10
    for caption in sets["binding"]:
        spec = parse_caption(caption)
        assert spec.relation and spec.objects[0].colour != spec.objects[1].colour
    assert not is_binding_case("a red circle on the left")
    assert not is_binding_case("a red circle above a red square")


def test_smoke_run(tmp_path, capsys):
    results, work = tmp_path / "bench" / "results.json", tmp_path / "work"
    common = ["--smoke", "--results", str(results), "--work", str(work)]
    assert ablate(common + ["--seeds", "0"]) == 0
    records = json.loads(results.read_text())["runs"]
    assert [r["variant"] for r in records] == [s.variant.name for s in ab.plan_runs(seeds=(0,))]
    for r in records:
        assert {"config", "seed", "budget", "metrics", "final_loss", "wall_time_s", "machine"} <= set(r)
        assert r["budget"] == ab.SMOKE.key() and r["seed"] == 0
        assert set(r["metrics"]) == {"train", "binding"} | ({"train_128"} if ab.VARIANTS[r["variant"]].extrapolate else set())
        assert 0 <= r["metrics"]["train"]["all"] <= 1 and np.isfinite(r["final_loss"])
        assert (results.parent / "samples" / r["samples"]).is_file()
    assert sum(r["config"]["objective"] == "ddpm" for r in records) == 1

    table = parse_table((results.parent / "table.md").read_text())
    assert set(table) == set(ab.VARIANTS)
    assert all(row["train object"] is not None for row in table.values())
    assert table["mmdit"]["128² all"] is not None and table["unet"]["128² all"] is None
    grid = Image.open(results.parent / "grid.png")
    assert grid.size == (130 + 2 * 64, 14 + len(ab.VARIANTS) * 64)  # a row per variant, 1 train + 1 binding caption

    capsys.readouterr()
    assert ablate(common + ["--seeds", "0"]) == 0  # everything is done: nothing trains
    err = capsys.readouterr().err
    assert err.count("done, skipped") == len(ab.VARIANTS) and "steps in" not in err
    assert len(json.loads(results.read_text())["runs"]) == len(ab.VARIANTS)

    assert ablate(common + ["--only", "mmdit-ape-sincos", "--seeds", "1"]) == 0  # one row, another seed
    records = json.loads(results.read_text())["runs"]
    assert len(records) == len(ab.VARIANTS) + 1 and records[-1]["variant"] == "mmdit-ape-sincos"
    assert parse_table((results.parent / "table.md").read_text())["mmdit-ape-sincos"]["train all"] is not None

    capsys.readouterr()
    with ab.file_lock(work / "unet-seed1.lock"):  # another process is training this run
        assert ablate(common + ["--only", "unet", "--seeds", "1"]) == 0
    assert "unet-seed1: running in another process, skipped" in capsys.readouterr().err
    assert len(json.loads(results.read_text())["runs"]) == len(ab.VARIANTS) + 1

    # two processes share the remaining runs through the locks: each run once, none lost
    assert ablate(common + ["--jobs", "2", "--only", "unet", "--only", "dit-adaln", "--seeds", "1"]) == 0
    records = json.loads(results.read_text())["runs"]
    assert sorted(r["variant"] for r in records[len(ab.VARIANTS) + 1:]) == ["dit-adaln", "unet"]


def test_without_jobs():
    assert without_jobs(["--smoke", "--jobs", "2", "--only", "unet", "--jobs=3"]) == ["--smoke", "--only", "unet"]


def _record(variant, seed, train_object, train_all=0.1, binding_all=0.1):
    return {"variant": variant, "seed": seed, "budget": {"steps": 10, "batch": 4, "pool": 8, "learning_rate": 1e-3,
                                                         "warmup_steps": 1, "eval_captions": 2, "binding_captions": 2,
                                                         "sample_steps": 2, "guidance": 4.0},
            "metrics": {"train": {"object": train_object, "all": train_all}, "binding": {"all": binding_all}},
            "config": {"backbone_parameters": 1_800_000}, "final_loss": 0.1,
            "wall_time_s": {"train": 60.0, "evaluate": 6.0}, "machine": {"processor": "x", "cpus": 2, "device": "cpu",
                                                                          "mlx": "0"}}


def test_table_statistics():
    assert cell([20.0, 30.0]) == "25.0 ± 5.0" and cell([20.0]) == "20.0 ± 0.0 (1 seed)" and cell([]) == "-"
    records = [_record("ref", 0, 0.20), _record("ref", 1, 0.24), _record("a", 0, 0.30), _record("a", 1, 0.26),
               _record("b", 0, 0.23), _record("b", 1, 0.30)]
    assert beats_reference(records, "a", "ref") == ["train object"]  # 26-30 against 20-24
    assert beats_reference(records, "b", "ref") == []  # 23 is inside the reference's range
    text = format_table(records, records[0]["budget"], {"G": ("ref", "a", "b", "c")},
                        {"ref": "reference", "a": "A", "b": "B", "c": "C"}, "ref", 0.135, "python examples/ablate.py")
    assert "22.0% train object accuracy, which reaches the required 13.5%" in text
    assert "`a` on train object" in text and "`b`" not in text.split("Beyond the seed spread")[1]
    assert "not yet judged" not in text  # every variant has two seeds
    single = format_table(records[:3], records[0]["budget"], {"G": ("ref", "a")}, {"ref": "reference", "a": "A"},
                          "ref", 0.135, "x")  # `a` at 30 on one seed, the reference 20-24 on two
    assert "better than the shipped recipe: no variant." in single
    assert "not yet judged: `a` on train object." in single
    rows = parse_table(text)
    assert rows["a"]["train object"] == (28.0, 2.0) and rows["c"]["train object"] is None
    low = format_table(records[:2], records[0]["budget"], {"G": ("ref",)}, {"ref": "r"}, "ref", 0.25, "x")
    assert "does NOT reach the required 25.0%" in low
    other = dict(records[0]["budget"], steps=99)
    assert "No run of this budget" in format_table(records, other, {}, {}, "ref", 0.1, "x")
