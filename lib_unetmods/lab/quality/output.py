"""What a quality run leaves: quality.jsonl (one record per row and model, written as rows finish),
quality.md (the table: every row once, the lab models side by side), quality.png (the chart),
samples-<model>-<scale>.png (the same seeds side by side), and the README's table block, which is
this table and nothing else (`--readme`)."""
from __future__ import annotations

import json
import os
from typing import Any

import torch.nn.functional as F

from ...families import FAMILIES, layout, title
from .rows import ROWS, SCALES
from .run import scale_label
from .sampling import STEPS

README_START = "<!-- quality-table: written by `python -m lib_unetmods.quality --combine ... --readme README.md` -->"
README_END = "<!-- quality-table end -->"


def pct(share: float | None, ci: list[float] | tuple[float, float] | None = None) -> str:
    if share is None:
        return ""
    return f"{share * 100:.0f} %" + (f" ({ci[0] * 100:.0f}-{ci[1] * 100:.0f})" if ci else "")


def distance_text(r: dict[str, Any]) -> str:
    return "" if r["distance"] is None else f"{r['distance']:.4f}"


def speed_text(r: dict[str, Any]) -> str:
    if r["speedup"] is None:
        return ""
    lo, hi = r["speedup_range"]
    return f"{r['speedup']:.2f}x ({lo:.2f}-{hi:.2f})"


def row_key(r: dict[str, Any]) -> tuple[str, str, int]:
    """A row of the table: its scale, label and the run's step count (a run at --steps 20 is its own row)."""
    return str(r["scale"]), r["label"], r["run_steps"]


def where(r: dict[str, Any]) -> str:
    """"2x", or "1x, 20 steps" for a run at other than the lab's default steps."""
    return scale_label(_scale(r["scale"])) + ("" if r["run_steps"] == STEPS else f", {r['run_steps']} steps")


def model_name(model: str) -> str:
    """"SD1-layout model" for the lab's `proxy`: what a reader compares."""
    return f"{title(layout(model))}-layout model"


def models_of(records: list[dict[str, Any]]) -> list[str]:
    """The lab models in the records, in the order families.py declares them."""
    order = list(FAMILIES)
    return sorted({r["model"] for r in records}, key=lambda m: order.index(m) if m in order else len(order))


def table(records: list[dict[str, Any]]) -> str:
    """One line per row, each lab model's figures side by side (a blank where a model did not run it)."""
    models = models_of(records)
    by = {(row_key(r), r["model"]): r for r in records}
    keys = list(dict.fromkeys(row_key(r) for r in records))
    names = " / ".join(model_name(m) for m in models)
    head = [f"| scale | row | settings | one object, {names} (95 % CI) | right position | colour | shape | distance "
            f"(to) | speed-up, CPU time (range) |", "|---|---|---|---|---|---|---|---|---|"]
    lines = []
    for key in keys:
        recs = [by.get((key, m)) for m in models]
        first = next(r for r in recs if r is not None)
        settings = list(dict.fromkeys(r["mods"] for r in recs if r is not None))
        cells = []
        for fmt in (lambda r: pct(r["one_object"], r["one_object_ci"]), lambda r: pct(r["position_ok"]),
                    lambda r: pct(r["colour_ok"]), lambda r: pct(r["shape_ok"]), distance_text, speed_text):
            cells.append(" / ".join("-" if r is None else fmt(r) or "" for r in recs).strip(" /"))
        reference = first["reference"] if first["distance"] is not None and first["reference"] != "plain" else ""
        if reference:
            cells[4] += f" (to {reference})"
        lines.append(f"| {where(first)} | {first['label']} | {' / '.join(f'`{s}`' for s in settings)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(head + lines)


def _scale(value: Any) -> Any:
    return value if value == "hires" else int(value)


def draw_chart(records: list[dict[str, Any]], path: str) -> None:
    """Per row: the one-object rate (with its interval) and the right-position rate, each lab
    model as its own bar, and the distance to the row's reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = models_of(records)
    by = {(row_key(r), r["model"]): r for r in records}
    keys = list(dict.fromkeys(row_key(r) for r in records))
    height = 0.8 / len(models)
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.36 * len(keys) * max(1, len(models) / 1.5) + 1.8), sharey=True)
    colours = ("#4c72b0", "#dd8452", "#55a868")
    for m_index, model in enumerate(models):
        ys, one, err, place, dist = [], [], [[], []], [], []
        for k_index, key in enumerate(keys):
            r = by.get((key, model))
            if r is None:
                continue
            ys.append(len(keys) - 1 - k_index + (len(models) / 2 - m_index - 0.5) * height)
            one.append(r["one_object"] * 100)
            err[0].append((r["one_object"] - r["one_object_ci"][0]) * 100)
            err[1].append((r["one_object_ci"][1] - r["one_object"]) * 100)
            place.append(r["position_ok"] * 100)
            dist.append(r["distance"] or 0.0)
        name = model_name(model)
        axes[0].barh(ys, one, height, xerr=err, color=colours[m_index % 3], label=name)
        axes[1].barh(ys, place, height, color=colours[m_index % 3], label=name)
        axes[2].barh(ys, dist, height, color=colours[m_index % 3], label=name)
    labels = [f"{where(by[(key, next(m for m in models if (key, m) in by))])} {key[1]}" for key in keys]
    axes[0].set_yticks(range(len(keys))[::-1], labels, fontsize=8)
    axes[0].set_xlim(0, 100)
    axes[0].set_xlabel("exactly one object (%)")
    axes[1].set_xlim(0, 100)
    axes[1].set_xlabel("object at the asked position (%)")
    axes[2].set_xlabel("distance to the row's reference (mean squared, pixels 0..1)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Quality lab: each technique on both trained lab models")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_samples(records: list[dict[str, Any]], path: str, model: str, scale: Any, pixels: int = 64) -> bool:
    """The same seeds side by side, one line per row of `scale` on `model` (what a user would look at)."""
    from PIL import Image, ImageDraw

    rows = [r for r in records if r["model"] == model and r["scale"] == scale and "samples" in r]
    if not rows:
        return False
    label_w, n = 250, max(len(r["samples"]) for r in rows)
    sheet = Image.new("RGB", (label_w + n * (pixels + 2), len(rows) * (pixels + 2)), "white")
    pen = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        top = i * (pixels + 2)
        pen.text((4, top + pixels // 2 - 18), f"{r['label']}\none object {r['one_object'] * 100:.0f} %\n"
                                             f"right position {r['position_ok'] * 100:.0f} %", fill="black")
        for j, image in enumerate(r["samples"]):
            img = F.interpolate(image[None], size=(pixels, pixels), mode="nearest")[0]
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            sheet.paste(Image.fromarray(arr), (label_w + j * (pixels + 2), top))
    sheet.save(path)
    return True


def jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "samples"}


def load_records(dirs: list[str]) -> list[dict[str, Any]]:
    """The records of earlier runs (their quality.jsonl), a later run's record of the same row and
    model replacing an earlier one, in the order the rows are declared (rows.ROWS)."""
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for d in dirs:
        with open(os.path.join(d, "quality.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                latest[(*row_key(r), r["model"])] = r
    declared = {(str(r.scale), r.label): i for i, r in enumerate(ROWS)}
    return sorted(latest.values(), key=lambda r: (r["run_steps"] != STEPS, SCALES.index(_scale(r["scale"])),
                                                  declared.get(row_key(r)[:2], len(declared))))


def write_records(records: list[dict[str, Any]], out: str) -> None:
    with open(os.path.join(out, "quality.jsonl"), "w") as f:
        f.writelines(json.dumps(jsonable(r)) + "\n" for r in records)


def write_table_and_chart(records: list[dict[str, Any]], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    text = table(records)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(text + "\n")
    draw_chart(records, os.path.join(out, "quality.png"))
    return text


def readme_block(text: str) -> str:
    return f"{README_START}\n{text}\n{README_END}"


def replace_readme_table(readme: str, text: str) -> None:
    """Put the table between the README's markers (which must be there once)."""
    with open(readme) as f:
        content = f.read()
    start, end = content.find(README_START), content.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no quality table markers ({README_START} ... {README_END})")
    with open(readme, "w") as f:
        f.write(content[:start] + readme_block(text) + content[end + len(README_END):])
