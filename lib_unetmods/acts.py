"""Whether a technique has anything to do in a pass: the one answer the infotext, the composition
rules, the messages, the schedule preview and the benchmark all use.

A technique acts when it changes something, not when it is enabled. Each technique module may
define `idle(values, umap, where) -> str | None`: the reason it has nothing to do in this pass on
this model (None: it acts, or may act; it may raise Refused where it cannot run at all). What can
only be seen while sampling (DeepCache taking no cheap step because residuals applied at every
step, HyperTile never splitting a layer) is reported after the pass through `ApplyContext.idle_after`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .clock import StepClock
from .params import NOT_THIS_PASS
from .techniques import TECHNIQUES
from .unet_map import UNetMap

_MODULES = {module.SPEC.id: module for module in TECHNIQUES}


@dataclass(frozen=True)
class PassInfo:
    """What is known about the pass before it starts; None where unknown (then a technique is
    assumed to act)."""

    clock: StepClock | None = None
    latent_shape: tuple[int, ...] | None = None
    family: str | None = None  # where no UNet map is at hand (the preview without a model)

    @property
    def hw(self) -> tuple[int, int] | None:
        return None if self.latent_shape is None else (int(self.latent_shape[-2]), int(self.latent_shape[-1]))


def runs_in_pass(tid: str, values: dict[str, Any], clock: StepClock | None) -> bool:
    """The technique's own rule for which passes it runs in (its hires / first-pass boxes);
    without a clock, either pass counts."""
    runs = getattr(_MODULES[tid], "runs_in_pass", None)
    if runs is None:
        return True
    return runs(values, clock.hires) if clock is not None else runs(values, False) or runs(values, True)


def idle_reason(tid: str, values: dict[str, Any], umap: UNetMap | None, where: PassInfo) -> str | None:
    """Why `tid` has nothing to do in this pass (NOT_THIS_PASS where its pass box is off), or
    None when it acts. Raises Refused where the technique cannot run on this model at all."""
    if not values["enabled"]:
        return "off"
    if not runs_in_pass(tid, values, where.clock):
        return NOT_THIS_PASS
    idle = getattr(_MODULES[tid], "idle", None)
    return idle(values, umap, where) if idle is not None else None


def say_idle(title: str, reason: str) -> str | None:
    """The message for a technique with nothing to do (None for a pass it is off in by choice)."""
    return None if reason in (NOT_THIS_PASS, "off") else f"{title}: {reason}; nothing to do"
