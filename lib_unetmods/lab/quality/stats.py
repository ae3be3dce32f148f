"""The numbers of a row: shares with their 95 % Wilson interval, a mean with its 95 % normal
interval, and the speed-up as the median ratio of process CPU time per chunk, with its range."""
from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from .score import Score

Z95 = 1.96


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % interval of a share k / n (Wilson's score interval)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def share(flags: list[bool]) -> tuple[float, tuple[float, float]]:
    k, n = sum(flags), len(flags)
    return (k / n if n else 0.0), wilson(k, n)


def mean_interval(values: list[float]) -> tuple[float, tuple[float, float]]:
    mean = statistics.fmean(values)
    half = Z95 * statistics.pstdev(values) / math.sqrt(len(values))
    return mean, (max(0.0, mean - half), mean + half)


def distances(images: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per image: the mean squared pixel difference (pixels in 0..1)."""
    return ((images - reference) ** 2).flatten(1).mean(1).tolist()


def speedup(plain_cpu: list[float], row_cpu: list[float]) -> tuple[float, tuple[float, float]]:
    """Median of the per-chunk ratios plain / row (chunks run interleaved), and their range."""
    ratios = [p / r for p, r in zip(plain_cpu, row_cpu)]
    return statistics.median(ratios), (min(ratios), max(ratios))


def scored(scores: list[Score], classes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Shares of the images with exactly one object and with the asked position, colour and shape."""
    shape, colour, position = (c.tolist() for c in classes)
    out: dict[str, Any] = {"seeds": len(scores), "mean_count": statistics.fmean(s.count for s in scores),
                           "counts": [s.count for s in scores]}  # per seed: what the CI test samples again
    for key, flags in (("one_object", [s.count == 1 for s in scores]),
                       ("position_ok", [s.position == p for s, p in zip(scores, position)]),
                       ("colour_ok", [s.colour == c for s, c in zip(scores, colour)]),
                       ("shape_ok", [s.shape == c for s, c in zip(scores, shape)])):
        out[key], out[f"{key}_ci"] = share(flags)
    return out
