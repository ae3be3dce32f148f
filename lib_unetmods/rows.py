"""Which row of a UNet call is which: the one description every technique that reads rows uses
(PAG, CD Tuner's colour map, ScaleCrafter's noise-damped CFG, DeepCache's cache entries).

The host glue announces each model evaluation (one denoiser call of the sampler: A1111's
`CFGDenoiser.forward`, Forge's `calc_cond_uncond_batch`, the lab's samplers) as an `Evaluation`:
every row the host stacks, in the order its UNet calls take them, each with its kind, image, AND
part and weight, and its coefficient in the image's guided result. Every UNet call the host makes
then takes its rows from it (`forward.CallTracker`): A1111's calls take consecutive slices of its
stacked batch (one call, or chunks with "Batch cond/uncond" off), Forge's take whole chunks in the
order `calc_cond_uncond_batch` pops them. A call that does not fit what was announced has unknown
rows (None): the techniques leave it alone and say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

COND, UNCOND, IMAGE = "cond", "uncond", "image"  # IMAGE: an edit model's row with the image but not the text
ZERO_COEF = 1e-6  # a row group whose coefficients sum to less carries nothing into the guided result


@dataclass(frozen=True)
class Row:
    kind: str
    image: int  # which image of the batch
    part: int = 0  # which AND part of the image's prompt (cond rows)
    weight: float = 1.0  # that part's AND weight
    coef: float | None = None  # d(guided result of the image) / d(this row's output); None = unknown
    dropped: bool = False  # stacked by the host but never run (A1111 skipping the uncond rows)


@dataclass
class Evaluation:
    """The rows of one model evaluation, as the host stacks them (dropped rows included), and how
    many its UNet calls took so far. `calls`: the row count of each call where the host's split is
    known in advance (A1111), checked as the calls come; None: any count (Forge checks kinds)."""

    rows: list[Row]
    latents: torch.Tensor | None = None  # each image's sampler latent: the input of its rows before c_in
    calls: list[int] | None = None
    taken: int = 0
    made: int = 0  # calls made so far
    broken: bool = False  # a call did not fit: the rest of this evaluation is unknown

    @property
    def run(self) -> list[int]:
        """Positions of the rows the calls take, in order."""
        return [i for i, r in enumerate(self.rows) if not r.dropped]

    def take(self, batch: int, kinds: Sequence[str] | None = None) -> CallRows | None:
        """The next `batch` rows, for a host call (kinds: what the call says its rows are)."""
        run = self.run
        expected = self.calls[self.made] if self.calls is not None and self.made < len(self.calls) else None
        positions = run[self.taken:self.taken + batch]
        fits = len(positions) == batch and (self.calls is None or expected == batch)
        if self.broken or not fits or (kinds is not None and [self.rows[p].kind for p in positions] != list(kinds)):
            self.broken = True
            return None
        self.taken += batch
        self.made += 1
        return CallRows(tuple(self.rows[p] for p in positions), self, tuple(positions))

    def cond_weight(self, image: int) -> float:
        """The sum of the AND weights of the image's cond rows (W: its guidance is s * W (cond - uncond))."""
        return sum(r.weight for r in self.rows if r.kind == COND and r.image == image)


@dataclass(frozen=True)
class CallRows:
    """The rows of one UNet call, in the call's order; `positions` index `evaluation.rows`."""

    rows: tuple[Row, ...]
    evaluation: Evaluation | None = None
    positions: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def of(self, *kinds: str) -> list[int]:
        """The call's row indices of these kinds."""
        return [i for i, r in enumerate(self.rows) if r.kind in kinds]

    @property
    def images(self) -> list[int]:
        return [r.image for r in self.rows]

    @property
    def key(self) -> tuple[tuple[str, int, int], ...]:
        """Which rows these are, comparable between calls (DeepCache keeps one cache entry each)."""
        return tuple((r.kind, r.image, r.part) for r in self.rows)

    @property
    def coefficients_known(self) -> bool:
        return self.evaluation is not None and all(r.coef is not None for r in self.rows)

    def select(self, index: Sequence[int]) -> CallRows:
        """These rows of the call (an extra pass over some of them)."""
        positions = None if self.positions is None else tuple(self.positions[i] for i in index)
        return CallRows(tuple(self.rows[i] for i in index), self.evaluation, positions)


@dataclass
class ResultShift:
    """Changes of each image's guided result (PAG's guidance, NDCFG's milder uncond), put into the
    rows of the calls that carry them into the host's guidance: the host combines an image's rows
    linearly (its coefficients), so adding d / S to each of the image's rows in a call, S their
    coefficient sum, changes the image's result by d. A change is placed in the call it comes from,
    or, where that call's rows carry none of it (S = 0: an uncond row at CFG 1, A1111's fake uncond),
    in the next call of the same evaluation that holds rows of the image."""

    evaluation: Evaluation | None = None
    due: dict[int, torch.Tensor] = field(default_factory=dict)  # image -> change still to place

    def begin(self, rows: CallRows) -> bool:
        """Before a call's changes: False where the last evaluation left a change it could not place."""
        placed = True
        if rows.evaluation is not self.evaluation:
            placed = not self.due
            self.evaluation, self.due = rows.evaluation, {}
        return placed

    def add(self, image: int, change: torch.Tensor) -> None:
        self.due[image] = self.due[image] + change if image in self.due else change

    def place(self, rows: CallRows, like: torch.Tensor) -> torch.Tensor | None:
        """What to add to this call's output for the changes due (None: nothing)."""
        shift = None
        for image in [i for i in self.due if i in rows.images]:
            members = [j for j, r in enumerate(rows.rows) if r.image == image]
            total = sum(rows.rows[j].coef for j in members)
            if abs(total) < ZERO_COEF:
                continue
            shift = torch.zeros_like(like) if shift is None else shift
            shift[members] += (self.due.pop(image) / total).to(like.dtype)
        return shift
