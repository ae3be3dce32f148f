"""The quality lab's command line: `python -m lib_unetmods.quality`.

    python -m lib_unetmods.quality                    # the default rows on both lab models
    python -m lib_unetmods.quality --all              # also the rows that settle settings (--list shows them)
    python -m lib_unetmods.quality --combine DIR ... --readme README.md   # one table of earlier runs, into the README

Each row samples the same seeds on each lab model (seed i asks for shape i mod 3, colour (i div 3)
mod 6, position i mod 5) with the project's sampler and `apply_mods`, exactly as in the WebUI,
and scores each image: exactly one object, the asked position, colour and shape; `distance` is
the per-seed mean squared pixel difference to the row's reference (plain at the same size and
steps unless the table says otherwise; "half the steps" is the yardstick); `speed-up` the median,
over chunks of seeds run interleaved with the unpatched model, of the ratio of process CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from ...families import PROXY, PROXY_XL
from ..progress import fmt_time
from ..random_unets import sdpa_attention
from . import models, output
from .rows import ALL, DEFAULT, ROWS, SCALES, select
from .run import SEEDS, expected_seconds, run, scale_label
from .sampling import CFG, STEPS, Lab

LAB_MODELS = (PROXY, PROXY_XL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lib_unetmods.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="also the rows that settle settings, and second settings")
    ap.add_argument("--extra", action="store_true", help="only the rows --all adds")
    ap.add_argument("--only", default="", help="only rows whose label or settings contain one of these comma-separated texts")
    ap.add_argument("--exclude", default="", help="leave out rows whose label contains one of these comma-separated texts")
    ap.add_argument("--scales", default="", help="comma-separated scales to run (1,2,3,hires)")
    ap.add_argument("--models", default=",".join(LAB_MODELS), help=f"lab models to run (default: {','.join(LAB_MODELS)})")
    ap.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per row (default {SEEDS})")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"Euler steps (default {STEPS})")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="quality-results", help="folder for the table, JSON lines, chart and pictures")
    ap.add_argument("--json", action="store_true", help="one JSON object per row and model on stdout")
    ap.add_argument("--list", action="store_true", help="list the selected rows and what each decides, run nothing")
    ap.add_argument("--combine", nargs="+", metavar="DIR", help="no sampling: one table and chart of earlier runs")
    ap.add_argument("--readme", metavar="FILE", help="with --combine: write the table between FILE's quality-table markers")
    args = ap.parse_args(argv)
    args.model_list = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.model_list if m not in models.WEIGHTS]
    if unknown:
        ap.error(f"--models: unknown lab model(s) {', '.join(unknown)} (known: {', '.join(models.WEIGHTS)})")
    try:
        args.scale_set = {s if s == "hires" else int(s) for s in args.scales.split(",") if s}
    except ValueError:
        ap.error(f"--scales {args.scales!r}: use {','.join(map(str, SCALES))}")
    if not args.scale_set <= set(SCALES):
        ap.error(f"--scales {args.scales!r}: use {','.join(map(str, SCALES))}")
    if args.readme and not args.combine:
        ap.error("--readme goes with --combine")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.combine:
        records = output.load_records(args.combine)
        text = output.write_table_and_chart(records, args.out)
        output.write_records(records, args.out)
        if args.readme:
            output.replace_readme_table(args.readme, text)
        print(text)
        return 0
    groups = (ALL,) if args.extra else (DEFAULT, ALL) if args.all else (DEFAULT,)
    rows = select(ROWS, groups, args.scale_set, args.only, args.exclude)
    if args.list:
        for r in rows:
            print(f"{scale_label(r.scale):>5}  {r.label:<48} {'(--all) ' if r.group == ALL else ''}{r.decides}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    labs = [Lab(models.load(models.WEIGHTS[m]), steps=args.steps) for m in args.model_list]
    jsonl = open(os.path.join(args.out, "quality.jsonl"), "w")

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(output.jsonable(record))
        jsonl.write(line + "\n")
        jsonl.flush()
        if args.json:
            print(line, flush=True)
        else:
            say(f"  -> {record['model']} {scale_label(record['scale'])} {record['label']}: one object "
                f"{output.pct(record['one_object'], record['one_object_ci'])}, position {output.pct(record['position_ok'])}, "
                f"colour {output.pct(record['colour_ok'])}, shape {output.pct(record['shape_ok'])}"
                + ("" if record["distance"] is None else f", distance {record['distance']:.4f}")
                + ("" if record["speedup"] is None else f", speed-up {output.speed_text(record)}"))

    with torch.no_grad(), sdpa_attention():
        say(f"{len(rows)} rows x {len(labs)} models x {args.seeds} seeds, {args.steps} steps, CFG {CFG:g}; expected "
            f"about {fmt_time(expected_seconds(labs, rows, args.seeds))} here (torch threads: {torch.get_num_threads()})")
        records = run(labs, rows, args.seeds, emit=emit, progress=say)
    jsonl.close()
    text = output.write_table_and_chart(records, args.out)
    pictures = [f"{m}-{scale_label(s)}" for m in args.model_list for s in SCALES
                if output.draw_samples(records, os.path.join(args.out, f"samples-{m}-{scale_label(s)}.png"), m, s)]
    if not args.json:
        print(text)
    say(f"written to {args.out}/: quality.md, quality.jsonl, quality.png, samples ({', '.join(pictures)})")
    return 0
