"""The quality lab: every technique scored on the trained proxy model (lab/proxy_model.py).

    python -m lib_unetmods.quality                # the default table (prints its expected time first)
    python -m lib_unetmods.quality --all          # more rows: presets, second settings, 3x speed rows
    python -m lib_unetmods.quality --json         # one JSON object per row on stdout

Each row samples the same seeds (seed i asks for shape i mod 3 and colour (i div 3) mod 6) with
the project's sampler and `apply_mods`, exactly as in the WebUI, at 1x, 2x or 3x the training
size or through a hires-fix path (1x, image upscaled x2, half the steps again at denoise 0.5),
and scores each image (lab/score.py): exactly one object, mean object count, colour and shape
right; `distance` is the per-seed mean squared pixel difference to the unpatched output at the
same size and steps ("plain, half the steps" is its yardstick); `speedup` the median of the
unpatched model's time over the row's, chunk by chunk, run interleaved on the same run.
Shares come with a 95 % Wilson interval, distances with a 95 % normal interval.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..apply import apply_mods
from ..clock import StepClock
from ..families import PROXY
from ..settings import Settings
from . import proxy_model
from .progress import fmt_time
from .random_unets import sdpa_attention
from .sampler import euler_sample
from .score import score_batch
from .shapes import COLOURS, SHAPES

STEPS = 10  # Euler steps: what the README table was taken at (shape scores rise a little at 20)
CFG = 3.0
SEEDS = 64
CHUNK = 16  # seeds per UNet batch; speed-ups are per chunk
HIRES_DENOISE = 0.5
SCALES: tuple[Any, ...] = (1, 2, 3, "hires")


@dataclass(frozen=True)
class Row:
    label: str
    mods: str  # settings text (Settings.from_text) or "none"
    scale: Any  # 1, 2, 3 or "hires"
    half_steps: bool = False  # the yardstick: the same settings at half the steps
    extra: bool = False  # only with --all
    reference: str = "plain"  # label of the row (same scale) whose output `distance` is measured against
    cfg: float | None = None  # guidance scale, if not the lab's


def _rows() -> list[Row]:
    rows = []
    for scale in SCALES:
        rows += [Row("plain", "none", scale), Row("plain, half the steps", "none", scale, half_steps=True, extra=scale == 3)]
    rows += [
        # the quality techniques and the cheap speed rows at the training size
        Row("FreeU", "freeu", 1), Row("CD Tuner", "cdtuner auto_values=on", 1),
        Row("ToMe", "tome", 1), Row("DeepCache", "deepcache", 1),
        # high resolution: each technique's defaults, and Deep Shrink's factor = the scale
        Row("Deep Shrink", "deepshrink", 2, extra=True), Row("ScaleCrafter", "scalecrafter", 2),
        Row("HiDiffusion", "hidiffusion", 2), Row("Deep Shrink at block 1", "deepshrink block=1", 2),
        Row("Deep Shrink at block 1, factor 3", "deepshrink block=1 factor=3", 3), Row("ScaleCrafter", "scalecrafter", 3),
        Row("HiDiffusion", "hidiffusion", 3), Row("Deep Shrink factor 3", "deepshrink factor=3", 3, extra=True),
        Row("Deep Shrink, smooth", "deepshrink preset=sdxl", 2, extra=True),
        Row("Deep Shrink to half the steps", "deepshrink end=0.5", 2, extra=True),
        Row("Deep Shrink to 70 % of the steps", "deepshrink end=0.7", 2, extra=True),
        Row("Deep Shrink after block 6", "deepshrink block=6 end=0.5", 2, extra=True),
        Row("HiDiffusion RAU-Net only", "hidiffusion msw_msa=off", 2, extra=True),
        # speed at 2x, where users reach for it; the stack's DeepCache is judged against
        # HiDiffusion alone, beside HiDiffusion at half the steps
        Row("ToMe", "tome", 2, extra=True), Row("ToMe 0.3", "tome ratio=0.3", 2, extra=True),
        Row("HyperTile", "hypertile tile_size=128", 2, extra=True), Row("DeepCache", "deepcache", 2, extra=True),
        Row("DeepCache 1 in 4, non-uniform", "deepcache interval=4 schedule=nonuniform", 2, extra=True),
        Row("speed stack", "stack=fast", 2, reference="HiDiffusion"),
        Row("HiDiffusion, half the steps", "hidiffusion", 2, half_steps=True, reference="HiDiffusion"),
        Row("FreeU", "freeu", 2, extra=True),
        # DeepCache at 20 steps is cheapest to judge at 1x (RAU-Net is off there; MSW-MSA runs)
        Row("DeepCache 1 in 4, non-uniform", "deepcache interval=4 schedule=nonuniform", 1, extra=True),
        Row("HiDiffusion", "hidiffusion", 1, extra=True),
        Row("HiDiffusion, half the steps", "hidiffusion", 1, half_steps=True, reference="HiDiffusion", extra=True),
        Row("speed stack", "stack=fast", 1, reference="HiDiffusion", extra=True),
        Row("speed stack, DeepCache 1 in 3", "stack=fast; deepcache interval=3 schedule=uniform", 1, reference="HiDiffusion", extra=True),
        # ToDo beside ToMe at 2x; PAG at CFG 1, 3 and 5 beside the unpatched model at the same CFG, on
        # the last output block: the proxy's deep attention carries almost nothing (PAG on the middle
        # block, the references' choice for SD, moves its picture by 5e-8)
        Row("ToDo", "todo", 2, extra=True),
        Row("plain, CFG 1", "none", 1, cfg=1.0, extra=True),
        Row("PAG, CFG 1", "pag layers=output.11", 1, cfg=1.0, reference="plain, CFG 1", extra=True),
        Row("PAG", "pag layers=output.11", 1, extra=True),
        Row("plain, CFG 5", "none", 1, cfg=5.0, extra=True),
        Row("PAG, CFG 5", "pag layers=output.11", 1, cfg=5.0, reference="plain, CFG 5", extra=True),
        # the hires-fix path
        Row("Deep Shrink", "deepshrink", "hires", extra=True), Row("HiDiffusion", "hidiffusion", "hires", extra=True),
        Row("speed stack", "stack=fast", 3, extra=True, reference="HiDiffusion"),
    ]
    return rows


ROWS = _rows()


def latent_side(scale: Any, train_side: int) -> int:
    return train_side * (2 if scale == "hires" else scale)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % interval of a share k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def seed_classes(seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.tensor(list(seeds))
    return idx % len(SHAPES), (idx // len(SHAPES)) % len(COLOURS)


def seed_noise(seeds: range, channels: int, side: int, salt: int = 0) -> torch.Tensor:
    return torch.stack([torch.randn(channels, side, side, generator=torch.Generator().manual_seed(1000 * salt + s))
                        for s in seeds])


class Lab:
    """The proxy model and the sampling of one chunk of seeds with one row's settings."""

    def __init__(self, model: proxy_model.Proxy, steps: int = STEPS, cfg: float = CFG) -> None:
        self.model, self.steps, self.cfg = model, steps, cfg
        self.config = model.config
        self.channels = self.config.unet["in_channels"]
        self.train_side = self.config.train_size // self.config.fold

    def _pass(self, settings: Settings, seeds: range, noise: torch.Tensor, steps: int, cfg: float, messages: set[str],
              init: torch.Tensor | None = None, base_shape: tuple[int, ...] | None = None,
              hires_planned: bool = False) -> torch.Tensor:
        shape, colour = seed_classes(seeds)
        cond = self.model.cond(shape, colour)
        uncond = self.model.cond.null(len(seeds))
        clock = StepClock()
        clock.start(steps if init is None else max(1, round(steps * HIRES_DENOISE)), hires=init is not None)
        applied = apply_mods(self.model.unet, settings, clock, seed=seeds[0], latent_shape=tuple(noise.shape),
                             prediction=self.config.prediction, hires_planned=hires_planned, base_shape=base_shape,
                             cfg_scale=cfg)
        messages.update(applied.messages)
        try:
            return euler_sample(self.model.unet, noise, cond, uncond, steps, clock, cfg_scale=cfg,
                                prediction=self.config.prediction, init=init, denoise=HIRES_DENOISE)
        finally:
            applied.restore()

    def sample(self, row: Row, seeds: range, messages: set[str]) -> torch.Tensor:
        """Images (n, 3, H, W) in [0, 1] of `seeds` under `row`."""
        settings = Settings() if row.mods == "none" else Settings.from_text(row.mods, strict=True, family=PROXY)
        steps = max(1, self.steps // 2) if row.half_steps else self.steps
        side = latent_side(1 if row.scale == "hires" else row.scale, self.train_side)
        noise = seed_noise(seeds, self.channels, side)
        cfg = self.cfg if row.cfg is None else row.cfg
        latent = self._pass(settings, seeds, noise, steps, cfg, messages, hires_planned=row.scale == "hires")
        if row.scale == "hires":
            image = F.interpolate(proxy_model.to_image(latent, self.config), scale_factor=2, mode="bicubic").clamp(0, 1)
            noise = seed_noise(seeds, self.channels, 2 * side, salt=1)
            latent = self._pass(settings, seeds, noise, steps, cfg, messages, init=proxy_model.to_latent(image, self.config),
                                base_shape=tuple(latent.shape))
        return proxy_model.to_image(latent, self.config)


@dataclass
class Result:
    row: Row
    images: list[torch.Tensor] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per chunk
    messages: set[str] = field(default_factory=set)

    def record(self, classes: tuple[torch.Tensor, torch.Tensor], plain: "Result", reference: "Result") -> dict[str, Any]:
        images = torch.cat(self.images)
        scores = score_batch(images)
        n = len(scores)
        shape, colour = classes
        one = sum(s.count == 1 for s in scores)
        colour_ok = sum(s.colour == c for s, c in zip(scores, colour.tolist()))
        shape_ok = sum(s.shape == c for s, c in zip(scores, shape.tolist()))
        out: dict[str, Any] = {
            "label": self.row.label, "mods": self.row.mods, "scale": self.row.scale,
            "steps": "half" if self.row.half_steps else "full", "seeds": n,
            "one_object": one / n, "one_object_ci": wilson(one, n),
            "mean_count": sum(s.count for s in scores) / n,
            "colour_ok": colour_ok / n, "colour_ok_ci": wilson(colour_ok, n),
            "shape_ok": shape_ok / n, "shape_ok_ci": wilson(shape_ok, n),
            "distance": None, "distance_ci": None, "reference": self.row.reference, "speedup": None, "speedup_range": None,
            "seconds": sum(self.seconds), "messages": sorted(self.messages),
        }
        if reference is not self:
            d = ((images - torch.cat(reference.images)) ** 2).flatten(1).mean(1).tolist()
            mean, sd = statistics.fmean(d), statistics.pstdev(d)
            half = 1.96 * sd / math.sqrt(n)
            out["distance"], out["distance_ci"] = mean, (max(0.0, mean - half), mean + half)
        if plain is not self:
            ratios = [p / s for p, s in zip(plain.seconds, self.seconds)]
            out["speedup"], out["speedup_range"] = statistics.median(ratios), (min(ratios), max(ratios))
        return out


def chunks(seeds: int, size: int = CHUNK) -> Iterator[range]:
    for start in range(0, seeds, size):
        yield range(start, min(seeds, start + size))


def unet_call_cost(lab: Lab, side: int, rows: int = 2 * CHUNK) -> float:
    """Seconds of one unpatched UNet call on `rows` rows at a latent side (for the estimate)."""
    x = torch.randn(rows, lab.channels, side, side)
    context = lab.model.cond.null(rows)
    t = torch.full((rows,), 500.0)
    lab.model.unet(x, t, context=context)  # warm-up
    start = time.perf_counter()
    lab.model.unet(x, t, context=context)
    return time.perf_counter() - start


def expected_seconds(lab: Lab, rows: list[Row], seeds: int) -> float:
    """Unpatched UNet calls the run makes, at what each costs here (patched rows are mostly cheaper)."""
    cost = {side: unet_call_cost(lab, side) for side in {latent_side(s, lab.train_side) for s in {r.scale for r in rows}} | {lab.train_side}}
    per_chunk = 0.0
    for r in set(rows) | {Row("plain", "none", r.scale) for r in rows}:
        steps = lab.steps // 2 if r.half_steps else lab.steps
        if r.scale == "hires":
            per_chunk += steps * cost[lab.train_side] + round(steps * HIRES_DENOISE) * cost[2 * lab.train_side]
        else:
            per_chunk += steps * cost[latent_side(r.scale, lab.train_side)]
    return per_chunk * math.ceil(seeds / CHUNK)


def needed(group: list[Row]) -> list[Row]:
    """The rows of one scale with the unpatched row first and every row a distance refers to."""
    scale = group[0].scale
    refs = [r for r in ROWS if r.scale == scale and not r.half_steps and r.label in {g.reference for g in group}]
    return list(dict.fromkeys([Row("plain", "none", scale), *refs, *group]))


def run(lab: Lab, rows: list[Row], seeds: int, emit: Any = None, progress: Any = None) -> list[dict[str, Any]]:
    """Every row at its scale, the scale's rows interleaved chunk by chunk with the unpatched one."""
    records: list[dict[str, Any]] = []
    groups = {scale: [r for r in rows if r.scale == scale] for scale in dict.fromkeys(r.scale for r in rows)}
    runs = {scale: needed(group) for scale, group in groups.items()}
    done, started = 0, time.perf_counter()
    total = sum(map(len, runs.values())) * math.ceil(seeds / CHUNK)
    for scale, group in groups.items():
        plain_row = Row("plain", "none", scale)
        results = {r: Result(r) for r in runs[scale]}
        for chunk in chunks(seeds):
            for r, res in results.items():
                start = time.perf_counter()
                res.images.append(lab.sample(r, chunk, res.messages))
                res.seconds.append(time.perf_counter() - start)
                done += 1
                if progress:
                    elapsed = time.perf_counter() - started
                    progress(f"[{done}/{total}] {scale}x {r.label}: seeds {chunk.start}-{chunk.stop - 1} "
                             f"in {res.seconds[-1]:.1f}s, {fmt_time(elapsed)} elapsed, ~{fmt_time(elapsed / done * (total - done))} left")
        classes = seed_classes(range(seeds))
        by_label = {r.label: res for r, res in results.items() if not r.half_steps}
        for r, res in results.items():
            if r in group:
                record = res.record(classes, results[plain_row], by_label[r.reference])
                record["samples"] = torch.cat(res.images)[:8]
                records.append(record)
                if emit:
                    emit(record)
    return records


# --- output ------------------------------------------------------------------------------

def _pct(share: float, ci: tuple[float, float] | None = None) -> str:
    return f"{share * 100:.0f} %" + (f" ({ci[0] * 100:.0f}-{ci[1] * 100:.0f})" if ci else "")


def table(records: list[dict[str, Any]]) -> str:
    head = ("| scale | row | settings | one object (95 % CI) | mean count | colour | shape | distance | speed-up |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in records:
        dist = "" if r["distance"] is None else f"{r['distance']:.4f}"
        speed = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        scale = r["scale"] if r["scale"] == "hires" else f"{r['scale']}x"
        lines.append(f"| {scale} | {r['label']} | `{r['mods']}` | {_pct(r['one_object'], r['one_object_ci'])} | "
                     f"{r['mean_count']:.2f} | {_pct(r['colour_ok'])} | {_pct(r['shape_ok'])} | {dist} | {speed} |")
    return "\n".join(lines)


def draw_chart(records: list[dict[str, Any]], path: str) -> None:
    """One-object rate per row (with its interval) and distance to the unpatched output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['scale']}{'x' if r['scale'] != 'hires' else ''} {r['label']}"
              + (f" (distance to {r['reference']})" if r.get("reference", "plain") != "plain" else "") for r in records]
    y = range(len(records))[::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.32 * len(records) + 1.5), sharey=True)
    share = [r["one_object"] * 100 for r in records]
    err = [[(r["one_object"] - r["one_object_ci"][0]) * 100 for r in records], [(r["one_object_ci"][1] - r["one_object"]) * 100 for r in records]]
    a.barh(list(y), share, xerr=err, color="#4c72b0")
    a.set_yticks(list(y), labels, fontsize=8)
    a.set_xlim(0, 100)
    a.set_xlabel("exactly one object (%)")
    dist = [r["distance"] or 0.0 for r in records]
    b.barh(list(y), dist, color="#dd8452")
    b.set_xlabel("distance to the unpatched output (mean squared, pixels 0..1)")
    fig.suptitle("Quality lab: each technique on the trained proxy model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_samples(records: list[dict[str, Any]], path: str, scale: Any, pixels: int = 64) -> bool:
    """The same seeds side by side, one line per row of `scale` (what a user would look at)."""
    from PIL import Image, ImageDraw

    rows = [r for r in records if r["scale"] == scale]
    if not rows:
        return False
    label_w, n = 230, max(len(r["samples"]) for r in rows)
    sheet = Image.new("RGB", (label_w + n * (pixels + 2), len(rows) * (pixels + 2)), "white")
    pen = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        top = i * (pixels + 2)
        pen.text((4, top + pixels // 2 - 12), f"{r['label']}\none object {r['one_object'] * 100:.0f} %", fill="black")
        for j, image in enumerate(r["samples"]):
            img = F.interpolate(image[None], size=(pixels, pixels), mode="nearest")[0]
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            sheet.paste(Image.fromarray(arr), (label_w + j * (pixels + 2), top))
    sheet.save(path)
    return True


def combine(dirs: list[str], out: str) -> int:
    """One table and chart from the quality.jsonl of several runs (e.g. one per scale)."""
    records = [json.loads(line) for d in dirs for line in open(os.path.join(d, "quality.jsonl"))]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write(table(records) + "\n")
    draw_chart(records, os.path.join(out, "quality.png"))
    print(table(records))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib_unetmods.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="also the extra rows (presets, second settings, hires path)")
    ap.add_argument("--only", default="", help="only rows whose label or settings contain one of these comma-separated texts")
    ap.add_argument("--exclude", default="", help="leave out rows whose label contains this text")
    ap.add_argument("--scales", default="", help="comma-separated scales to run (1,2,3,hires)")
    ap.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per row (default {SEEDS})")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--weights", default=proxy_model.WEIGHTS)
    ap.add_argument("--out", default="quality-results", help="folder for the table, JSON lines, chart and pictures")
    ap.add_argument("--json", action="store_true", help="one JSON object per row on stdout")
    ap.add_argument("--combine", nargs="+", metavar="DIR", help="no sampling: the table and chart of earlier runs' results")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = {s if s == "hires" else int(s) for s in args.scales.split(",") if s}
    rows = [r for r in ROWS if (args.all or not r.extra) and (not scales or r.scale in scales)
            and (not args.only or any(o in r.label or o in r.mods for o in args.only.split(",")))
            and (not args.exclude or args.exclude not in r.label)]
    os.makedirs(args.out, exist_ok=True)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    lab = Lab(proxy_model.load(args.weights), steps=args.steps)
    jsonl = open(os.path.join(args.out, "quality.jsonl"), "w")

    def emit(record: dict[str, Any]) -> None:
        data = {k: v for k, v in record.items() if k != "samples"}
        line = json.dumps(data)
        jsonl.write(line + "\n")
        jsonl.flush()
        if args.json:
            print(line, flush=True)
        else:
            say(f"  -> {record['scale']} {record['label']}: one object {_pct(record['one_object'], record['one_object_ci'])}, "
                f"colour {_pct(record['colour_ok'])}, shape {_pct(record['shape_ok'])}"
                + ("" if record["distance"] is None else f", distance {record['distance']:.4f}, speed-up {record['speedup']:.2f}x"))

    with torch.no_grad(), sdpa_attention():
        say(f"{len(rows)} rows x {args.seeds} seeds, {args.steps} steps, CFG {CFG}; expected about "
            f"{fmt_time(expected_seconds(lab, rows, args.seeds))} here (torch threads: {torch.get_num_threads()})")
        records = run(lab, rows, args.seeds, emit=emit, progress=say)
    jsonl.close()
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(table(records) + "\n")
    draw_chart(records, os.path.join(args.out, "quality.png"))
    pictures = [s for s in SCALES if draw_samples(records, os.path.join(args.out, f"samples-{s}{'x' if s != 'hires' else ''}.png"), s)]
    if not args.json:
        print(table(records))
    say(f"written to {args.out}/: quality.md, quality.jsonl, quality.png, samples per scale ({', '.join(map(str, pictures))})")
    return 0
