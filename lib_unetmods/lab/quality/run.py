"""Running rows on the lab models: per model and scale, the plain row, every row a distance refers
to, and the asked rows run interleaved chunk by chunk (same seeds, same load), then each asked
row becomes a record (stats.py) as soon as its scale is done. Also the run's expected time."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..progress import fmt_time
from . import stats
from .rows import PLAIN, Row, Scale, reference_of
from .sampling import HIRES_DENOISE, Lab, latent_side, seed_classes
from .score import score_batch

SEEDS = 64
CHUNK = 16  # seeds per UNet batch; speed-ups are per chunk
SAMPLES_KEPT = 8  # images per row kept for the side-by-side pictures


@dataclass
class Result:
    row: Row
    images: list[torch.Tensor] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time per chunk
    messages: set[str] = field(default_factory=set)

    def add(self, lab: Lab, seeds: range) -> float:
        """Sample one chunk; returns its wall time (for the progress line)."""
        wall, cpu = time.perf_counter(), time.process_time()
        self.images.append(lab.sample(self.row, seeds, self.messages))
        self.cpu_seconds.append(time.process_time() - cpu)
        return time.perf_counter() - wall


def chunks(seeds: int, size: int = CHUNK) -> Iterator[range]:
    for start in range(0, seeds, size):
        yield range(start, min(seeds, start + size))


def needed(rows: list[Row]) -> list[Row]:
    """One scale's run: its plain row first, then every reference, then the rows (each once)."""
    return list(dict.fromkeys([PLAIN[rows[0].scale], *(reference_of(r) for r in rows), *rows]))


def record(lab: Lab, result: Result, plain: Result, reference: Result, seeds: int) -> dict[str, Any]:
    row = result.row
    images = torch.cat(result.images)
    out: dict[str, Any] = {
        "model": lab.family, "label": row.label, "mods": row.describe(lab.family), "scale": row.scale,
        "steps": lab.steps_of(row), "run_steps": lab.steps, "cfg": lab.cfg if row.cfg is None else row.cfg,
        **stats.scored(score_batch(images), seed_classes(range(seeds))),
        "reference": reference.row.label, "distance": None, "distance_ci": None,
        "speedup": None, "speedup_range": None, "cpu_seconds": sum(result.cpu_seconds),
        "messages": sorted(result.messages), "decides": row.decides,
    }
    if reference is not result:
        out["distance"], out["distance_ci"] = stats.mean_interval(stats.distances(images, torch.cat(reference.images)))
    if plain is not result:
        out["speedup"], out["speedup_range"] = stats.speedup(plain.cpu_seconds, result.cpu_seconds)
    return out


def by_scale(rows: list[Row]) -> dict[Scale, list[Row]]:
    return {scale: [r for r in rows if r.scale == scale] for scale in dict.fromkeys(r.scale for r in rows)}


def run(labs: list[Lab], rows: list[Row], seeds: int = SEEDS, emit: Callable[[dict[str, Any]], None] | None = None,
        progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every row on every lab model; records in the order of `labs`, then scales, then `rows`."""
    records: list[dict[str, Any]] = []
    groups = by_scale(rows)
    total = len(labs) * sum(len(needed(g)) for g in groups.values()) * math.ceil(seeds / CHUNK)
    done, started = 0, time.perf_counter()
    for lab in labs:
        for scale, group in groups.items():
            results = {r: Result(r) for r in needed(group)}
            for chunk in chunks(seeds):
                for r, res in results.items():
                    wall = res.add(lab, chunk)
                    done += 1
                    if progress:
                        elapsed = time.perf_counter() - started
                        progress(f"[{done}/{total}] {lab.family} {scale_label(scale)} {r.label}: seeds {chunk.start}-"
                                 f"{chunk.stop - 1} in {wall:.1f}s, {fmt_time(elapsed)} elapsed, "
                                 f"~{fmt_time(elapsed / done * (total - done))} left")
            for r in group:
                rec = record(lab, results[r], results[PLAIN[scale]], results[reference_of(r)], seeds)
                rec["samples"] = torch.cat(results[r].images)[:SAMPLES_KEPT]
                records.append(rec)
                if emit:
                    emit(rec)
    return records


def scale_label(scale: Scale) -> str:
    return "hires" if scale == "hires" else f"{scale}x"


def unet_call_seconds(lab: Lab, side: int, rows: int = 2 * CHUNK) -> float:
    """Wall seconds of one unpatched UNet call on `rows` rows at a latent side."""
    x = torch.randn(rows, lab.channels, side, side)
    context = lab.model.cond.null(rows)
    t = torch.full((rows,), 500.0)
    y = lab.model.y(context)
    lab.model.unet(x, t, context=context, y=y)  # warm-up
    start = time.perf_counter()
    lab.model.unet(x, t, context=context, y=y)
    return time.perf_counter() - start


def expected_seconds(labs: list[Lab], rows: list[Row], seeds: int) -> float:
    """The run's unpatched UNet calls at what each costs here (patched rows cost about as much:
    some are cheaper, ScaleCrafter's NDCFG and PAG add calls)."""
    total = 0.0
    for lab in labs:
        cost: dict[int, float] = {}

        def call(side: int) -> float:
            if side not in cost:
                cost[side] = unet_call_seconds(lab, side)
            return cost[side]

        for group in by_scale(rows).values():
            for r in needed(group):
                steps = lab.steps_of(r)
                if r.scale == "hires":
                    total += steps * call(lab.train_side) + round(steps * HIRES_DENOISE) * call(2 * lab.train_side)
                else:
                    total += steps * call(latent_side(r.scale, lab.train_side))
    return total * math.ceil(seeds / CHUNK)
