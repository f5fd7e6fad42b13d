"""The ablation table (markdown, mean ± spread over seeds per row) and the grid of samples per variant.

Only records of one budget are put in one table: a results file may also hold a smoke run or a
GPU run at a larger budget, each its own table. The spread is half the range over the seeds
(with two seeds: how far each lies from the mean).
"""

from pathlib import Path

import numpy as np

from .scoring import caption_sets

COLUMNS = (  # (caption set, parser metric, header)
    ("train", "object", "train object"),
    ("train", "all", "train all"),
    ("binding", "object", "binding object"),
    ("binding", "position", "binding position"),
    ("binding", "all", "binding all"),
    ("train_128", "object", "128² object"),
    ("train_128", "all", "128² all"),
)
COMPARED = (("train", "object"), ("train", "all"), ("binding", "all"))  # "beats the shipped recipe" is judged on these


def _values(records: list[dict], variant: str, caption_set: str, metric: str) -> list[float]:
    out = []
    for r in records:
        v = r["metrics"].get(caption_set, {}).get(metric) if r["variant"] == variant else None
        if v is not None:
            out.append(100 * v)
    return out


def mean_spread(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), (max(values) - min(values)) / 2


def cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    m, s = mean_spread(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" + ("" if len(values) > 1 else " (1 seed)")


def records_for(records: list[dict], budget: dict) -> list[dict]:
    return [r for r in records if r["budget"] == budget]


def beats_reference(records: list[dict], variant: str, reference: str, min_seeds: int = 2) -> list[str]:
    """Metrics where every seed of `variant` beats every seed of `reference` (mean - spread >
    reference mean + spread), with at least `min_seeds` seeds each."""
    out = []
    for caption_set, metric in COMPARED:
        a, b = _values(records, variant, caption_set, metric), _values(records, reference, caption_set, metric)
        if len(a) >= min_seeds and len(b) >= min_seeds and min(a) > max(b):
            out.append(f"{caption_set} {metric}")
    return out


def _verdict(records: list[dict], descriptions: dict, reference: str) -> list[str]:
    """The table's last lines: variants beyond the seed spread of the reference, then those ahead of
    every reference seed on a single seed of their own (a lead the second seed may still undo)."""
    others = [n for n in descriptions if n != reference]
    clear = [(n, beats_reference(records, n, reference)) for n in others]
    clear = [(n, w) for n, w in clear if w]
    lines = ["Beyond the seed spread, better than the shipped recipe: "
             + ("; ".join(f"`{n}` on {', '.join(w)}" for n, w in clear) if clear else "no variant") + "."]
    ahead = [(n, beats_reference(records, n, reference, min_seeds=1)) for n in others if not dict(clear).get(n)]
    ahead = [(n, w) for n, w in ahead if w]
    if ahead:
        lines.append("Ahead of every seed of the shipped recipe with fewer than two seeds of its own, not yet "
                     "judged: " + "; ".join(f"`{n}` on {', '.join(w)}" for n, w in ahead) + ".")
    return lines


def format_table(records: list[dict], budget: dict, groups: dict, descriptions: dict, reference: str,
                 threshold: float, command: str) -> str:
    """The markdown table of every group, with the budget, machines and wall time."""
    records = records_for(records, budget)
    lines = [f"Command: `{command}`", "",
             f"Budget: {budget['steps']} steps x batch {budget['batch']} on {budget['pool']:,d} training images "
             f"(AdamW {budget['learning_rate']:g}, {budget['warmup_steps']} warmup steps, cosine); scored on "
             f"{budget['eval_captions']} train captions and {budget['binding_captions']} binding captions, "
             f"{budget['sample_steps']} sampling steps, guidance {budget['guidance']:g}.", ""]
    if not records:
        return "\n".join(lines + ["No run of this budget has finished yet.", ""])
    train = sum(r["wall_time_s"]["train"] for r in records)
    evaluate = sum(r["wall_time_s"]["evaluate"] for r in records)
    machines = sorted({f"{r['machine']['processor']}, {r['machine']['cpus']} CPUs, {r['machine']['device']}, "
                       f"mlx {r['machine']['mlx']}" for r in records})
    lines += [f"Runs finished: {len(records)}; wall time {train / 3600:.2f} h training + {evaluate / 3600:.2f} h "
              f"scoring. Machine: {'; '.join(machines)}.", ""]
    ref = _values(records, reference, "train", "object")
    if ref:
        verdict = "reaches" if np.mean(ref) >= 100 * threshold else "does NOT reach"
        lines += [f"Budget check: the shipped recipe's variant `{reference}` scores {np.mean(ref):.1f}% train object "
                  f"accuracy, which {verdict} the required {100 * threshold:.1f}% (half the shipped model's).", ""]
    lines += ["Cells: scene-parser accuracy in %, mean ± half the range over seeds; `loss`: the mean training loss of "
              "the last 50 steps (velocity MSE; ε MSE for DDPM, not comparable); `min/run`: training minutes.", ""]
    for group, names in groups.items():
        lines += [f"#### {group}", "",
                  "| variant | | parameters | " + " | ".join(h for _, _, h in COLUMNS) + " | loss | min/run |",
                  "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|"]
        for name in names:
            mine = [r for r in records if r["variant"] == name]
            if not mine:
                lines.append(f"| `{name}` | {descriptions[name]} | | " + " | ".join("not run" for _ in COLUMNS) + " | | |")
                continue
            params = f"{mine[0]['config']['backbone_parameters'] / 1e6:.2f} M"
            cells = [cell(_values(records, name, s, m)) for s, m, _ in COLUMNS]
            loss = cell([r["final_loss"] for r in mine if r["final_loss"] is not None], 4).replace(" (1 seed)", "")
            minutes = np.mean([r["wall_time_s"]["train"] for r in mine]) / 60
            lines.append(f"| `{name}` | {descriptions[name]} | {params} | " + " | ".join(cells)
                         + f" | {loss} | {minutes:.1f} |")
        lines.append("")
    return "\n".join(lines + _verdict(records, descriptions, reference)) + "\n"


def parse_table(markdown: str) -> dict[str, dict[str, tuple[float, float] | None]]:
    """The table back from markdown: {variant: {header: (mean, spread) or None; "min/run": minutes}} (rows of the
    first group a variant appears in)."""
    out, headers = {}, None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "variant":
            headers = cells
            continue
        if set(cells[0]) <= set("-") or headers is None:
            continue
        name = cells[0].strip("`")
        row = {}
        for h, c in zip(headers[3:], cells[3:]):
            if c in ("-", "not run", ""):
                row[h] = None
                continue
            if h == "min/run":
                row[h] = float(c)
                continue
            mean, spread = c.replace(" (1 seed)", "").split(" ± ")
            row[h] = (float(mean), float(spread))
        out.setdefault(name, row)
    return out


def write_grid(samples_dir: Path, variants: list[str], out: Path, n_train: int, n_binding: int, seed: int = 0,
               label_width: int = 130) -> list[str]:
    """One row per variant (its run of `seed`), the same captions and noise seeds in every row;
    -> the captions of the columns. Variants not yet run are left out."""
    from PIL import Image, ImageDraw

    strips = [(v, samples_dir / f"{v}-seed{seed}.png") for v in variants]
    strips = [(v, np.asarray(Image.open(p).convert("RGB"))) for v, p in strips if p.is_file()]
    sets = caption_sets(n_train, n_binding)
    captions = list(sets["train"][:4]) + list(sets["binding"][:4])
    if not strips:
        return captions
    h, w = strips[0][1].shape[:2]
    header = 14
    grid = Image.new("RGB", (label_width + w, header + h * len(strips)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(w // h):
        draw.text((label_width + i * h + h // 2 - 3, 1), str(i + 1), fill=(0, 0, 0))
    for row, (name, strip) in enumerate(strips):
        grid.paste(Image.fromarray(strip), (label_width, header + row * h))
        draw.text((4, header + row * h + h // 2 - 6), name, fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return captions[: w // h]


def legend(captions: list[str]) -> str:
    return "Grid columns (4 train captions, then 4 binding captions, noise seeds 0-3 in each): " + "; ".join(
        f"{i + 1}. {c}" for i, c in enumerate(captions)) + "."

