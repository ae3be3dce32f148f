"""Stand-in for modules.prompt_parser (A1111 1.10): the conditionings of a batch of prompts, each
image's prompt split into AND parts with their weights (the parts' counts may differ per image),
one schedule each (no prompt editing), and their reconstruction into the stacked rows the
CFGDenoiser runs."""
from __future__ import annotations

from typing import Any

import torch


class ComposableScheduledPromptConditioning:
    def __init__(self, cond: Any, weight: float = 1.0) -> None:
        self.cond, self.weight = cond, weight  # cond: (tokens, dim), or SDXL's {"crossattn", "vector"}


class MulticondLearnedConditioning:
    def __init__(self, shape: tuple[int, ...], batch: list[list[ComposableScheduledPromptConditioning]]) -> None:
        self.shape, self.batch = shape, batch


def stack(conds: list[Any]) -> Any:
    if isinstance(conds[0], dict):
        return {key: torch.stack([c[key] for c in conds]) for key in conds[0]}
    return torch.stack(conds)


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step: int) -> tuple[list[list[tuple[int, float]]], Any]:
    """(per image, the (row, weight) of each AND part; the parts' conds stacked image by image)."""
    conds_list, rows = [], []
    for parts in c.batch:
        conds_list.append([(len(rows) + k, part.weight) for k, part in enumerate(parts)])
        rows += [part.cond for part in parts]
    return conds_list, stack(rows)


def reconstruct_cond_batch(c: Any, current_step: int) -> Any:
    return c  # the negative prompts, already stacked (one schedule)
