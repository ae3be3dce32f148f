"""Apply the enabled techniques to a UNet for one sampling pass, and take them off again."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from .acts import PassInfo, idle_reason, say_idle
from .clock import StepClock
from .composition import resolve_conflicts
from .forward import CallTracker, ForwardHooks, Refused, install_forward
from .patcher import Patcher, restore_model
from .settings import Settings
from .techniques import SPECS, TECHNIQUES
from .unet_map import UNetMap, UnsupportedModel, map_unet


@dataclass
class ApplyContext:
    """What a technique's apply() gets: the map, the patcher, the clock and a place for messages."""

    map: UNetMap
    patcher: Patcher
    clock: StepClock
    seed: int = 0  # image seed: techniques with randomness seed private generators from it
    latent_shape: tuple[int, ...] | None = None
    vae: nn.Module | None = None  # the first-stage model, for techniques that touch the decoder
    prediction: str = "eps"  # what the UNet predicts, "eps" or "v" (SD2-768): for output corrections
    hires_planned: bool = False  # this first pass is followed by a hires-fix pass
    base_shape: tuple[int, ...] | None = None  # in the hires pass: the first pass's latent shape
    messages: list[str] = field(default_factory=list)
    technique: str = ""
    after_pass: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    calls: CallTracker = field(init=False)  # the UNet calls under way: their inputs and rows (forward.py)
    _hooks: ForwardHooks | None = None

    def __post_init__(self) -> None:
        self.calls = CallTracker(self.clock)

    @property
    def pass_info(self) -> PassInfo:
        return PassInfo(self.clock, self.latent_shape, self.map.family)

    def idle_after(self, check: Callable[[], str | None]) -> None:
        """What only sampling shows: after the pass, `check()` says why the current technique did
        nothing after all (None: it acted, or no UNet call ran). See `Applied.idle_after_pass`."""
        self.after_pass[self.technique] = check

    @property
    def unet(self) -> nn.Module:
        return self.map.unet

    @property
    def hires(self) -> bool:
        return self.clock.hires

    def warn(self, message: str) -> None:
        self.messages.append(f"{SPECS[self.technique].title}: {message}")

    def warner(self) -> Callable[[str], None]:
        """For the current technique's hooks, which warn while sampling (when `technique` names
        another): a function that adds a message under its title, each message once."""
        title = SPECS[self.technique].title

        def warn_once(message: str) -> None:
            line = f"{title}: {message}"
            if line not in self.messages:
                self.messages.append(line)

        return warn_once

    def forward_hooks(self) -> ForwardHooks:
        """The block-level hook points (forward.py), installed on first use; raises Refused where
        they cannot run (classic Forge)."""
        if self._hooks is None:
            self._hooks = install_forward(self.unet, self.patcher, self.clock, self.calls, self.map)
        return self._hooks

    def hook(self, point: str, fn: Callable[..., Any]) -> None:
        self.forward_hooks().add(point, fn, self.patcher, self.technique)


@dataclass
class Applied:
    """The result of apply_mods: the patcher holding every change, and messages for the user."""

    patcher: Patcher | None
    messages: list[str]
    applied: list[str] = field(default_factory=list)  # technique ids that installed something: they act
    settings: Settings | None = None  # the values used: auto values resolved, composition rules applied
    after_pass: dict[str, Callable[[], str | None]] = field(default_factory=dict)

    def restore(self) -> None:
        if self.patcher is not None:
            self.patcher.restore()

    def idle_after_pass(self) -> dict[str, str]:
        """Call once the pass sampled: the applied techniques that changed nothing after all
        (e.g. DeepCache with residuals at every step), with the message that says why."""
        out = {}
        for tid, check in self.after_pass.items():
            reason = check() if tid in self.applied else None
            if reason is not None:
                out[tid] = say_idle(SPECS[tid].title, reason) or reason
        return out


def apply_mods(unet: nn.Module, settings: Settings, clock: StepClock, *, seed: int = 0,
               latent_shape: tuple[int, ...] | None = None, vae: nn.Module | None = None,
               prediction: str = "eps", hires_planned: bool = False,
               base_shape: tuple[int, ...] | None = None) -> Applied:
    """Install the enabled techniques for one sampling pass. Call clock.start() for the pass
    first. With nothing enabled, nothing at all is installed on the model. (The CFG scale comes
    with each evaluation's rows, rows.py.)"""
    messages = ["removed a leftover patch from an earlier run"] if restore_model(unet) else []
    if not settings.enabled_ids():
        return Applied(None, messages)
    try:
        umap = map_unet(unet)
    except UnsupportedModel as e:
        return Applied(None, messages + [f"UNet Mods skipped: {e}"])
    where = PassInfo(clock, latent_shape, umap.family)
    settings, notes = resolve_conflicts(settings.with_family_values(umap.family), umap, where)
    messages += notes
    patcher = Patcher(unet)
    ctx = ApplyContext(umap, patcher, clock, seed=seed, latent_shape=latent_shape, vae=vae, prediction=prediction,
                       hires_planned=hires_planned, base_shape=base_shape, messages=messages)
    applied = []
    for technique in TECHNIQUES:
        tid = technique.SPEC.id
        if not settings[tid]["enabled"]:
            continue
        ctx.technique = tid
        changes, said = len(patcher), len(ctx.messages)
        try:
            reason = idle_reason(tid, settings[tid], umap, where)
            if reason is not None:  # nothing to do: nothing installed, said once
                ctx.messages += [m for m in [say_idle(technique.SPEC.title, reason)] if m and m not in ctx.messages]
                continue
            with patcher.transaction():
                technique.apply(ctx, settings[tid])
        except Refused as e:
            del ctx.messages[said:]  # its warnings are moot now: the reason it is skipped replaces them
            ctx.messages.append(f"{technique.SPEC.title} skipped: {e}")
            continue
        if len(patcher) > changes:  # a technique that returned with "nothing to do" installed nothing
            applied.append(tid)
    if applied:  # its pre-hook runs first, its hook after the techniques' hooks
        ctx.calls.install(unet, patcher)
    return Applied(patcher if patcher.active else None, ctx.messages, applied, settings, ctx.after_pass)
