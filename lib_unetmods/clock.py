"""The step clock: which sampler step the current UNet call belongs to.

It counts sampler steps, not UNet calls: second-order samplers and split cond/uncond batches
call the UNet several times per step, and every window of every technique is written in steps.
The host advances it (the WebUI script from the sampler's per-step callback, the benchmark from
its own loop); the patched forward only counts the calls inside the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .rows import Evaluation


@dataclass
class StepClock:
    total_steps: int = 1
    step: int = 0
    hires: bool = False  # True in the hires-fix second pass
    sigma: float | None = None
    calls_in_step: int = 0  # the host's UNet calls seen so far in this step (extra passes not counted)
    evaluation: Evaluation | None = None  # the rows of the model evaluation under way, as the host announced them
    passes: int = 0  # sampling passes started on this clock (first pass, hires pass, ...)

    def start(self, total_steps: int, hires: bool = False) -> None:
        """A new sampling pass: every technique's window starts again from step 0."""
        self.total_steps = max(int(total_steps), 1)
        self.step = 0
        self.hires = hires
        self.sigma = None
        self.calls_in_step = 0
        self.evaluation = None
        self.passes += 1

    def begin_step(self, step: int, sigma: float | None = None) -> None:
        if step != self.step:
            self.calls_in_step = 0
        self.step = step
        if sigma is not None:
            self.sigma = float(sigma)

    def end_step(self) -> None:
        self.begin_step(self.step + 1)

    def evaluate(self, evaluation: Evaluation | None) -> None:
        """The host starts a model evaluation: its UNet calls take these rows (None: unknown)."""
        self.evaluation = evaluation

    @property
    def progress(self) -> float:
        """Fraction of the pass done before this step: 0 at the first step, (N-1)/N at the last."""
        return min(self.step / self.total_steps, 1.0)

    def step_of(self, ratio: float) -> int:
        """A ratio of the steps as a step index, truncated (ljleb FreeU, HiDiffusion's int(T*N))."""
        return int(ratio * self.total_steps)

    def window_steps(self, start: float, end: float) -> range:
        """The steps of the pass for which in_window(start, end) holds."""
        return range(self.step_of(start), self.total_steps if end >= 1.0 else min(self.step_of(end), self.total_steps))

    def in_window(self, start: float, end: float) -> bool:
        """start <= step < end, both given as ratios of the pass's steps and truncated to steps."""
        return self.step_of(start) <= self.step and (end >= 1.0 or self.step < self.step_of(end))


def covers_no_step(clock: StepClock | None, covered: Callable[[StepClock], Any], what: str = "the start/end window") -> str | None:
    """A technique's reason to have nothing to do when its window (`covered(clock)`: its steps, or
    whether it has any) covers no step of the pass; None where it covers one or the pass is unknown."""
    if clock is None or covered(clock):
        return None
    return f"{what} {'cover' if what.endswith('windows') else 'covers'} no step of this {clock.total_steps}-step pass"
