"""DeepCache (Ma et al., CVPR 2024): on cheap steps run only the shallow path of the UNet
(input_blocks[0..k], output_blocks[L-k..L], `out`) and feed output_blocks[L-k] the tensor that
entered it, before its concat, on the last full step.

Level k follows the reference helper's `cache_branch_id` (k = 0: conv_in, output_blocks[L] and
`out` only); the experimental SD pipeline's `(layer 0, block 0)` is k = 1. Schedules are counted
in sampler steps of the step clock, not UNet calls: the helper's step index i (position of t in
`scheduler.timesteps`, from the first step seen) is `clock.step`, so uniform = full iff
step % interval == 0. The non-uniform curve is the experimental pipeline's
`sample_from_quad_center`; its `center` step is given here as a ratio of the steps (15 of 50 =
0.3). The A1111 port counts UNet calls and keeps one cache for everything; here the decision is
per step and the cache is per call of the step, and a cheap step without a valid cache runs in
full (see `DeepCacheState`).

Control residuals (sd-webui-controlnet's forward on A1111, `control` on Forge) are added to the
skips and the middle output, including the deep ones a cheap step does not run: while they are
present every step runs in full, so ControlNet keeps its whole effect. Forge's `control` is seen
before the call; A1111's residuals are seen at the shallow skip's concat, so a cheap step in
which ControlNet starts (guidance start > 0) lacks the deep residuals for that step only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

import numpy as np
import torch

from ..forward import Shortcut, UNetCall
from ..params import Param, TechniqueSpec, first_pass_or_hires_box

FEW_STEPS = 15  # below this DeepCache saves little and costs visible quality

SPEC = TechniqueSpec(
    id="deepcache",
    title="DeepCache",
    description="Reuses the deep UNet features of the last full step on cheap steps, running only the shallow blocks.",
    params=(
        Param("enabled", "bool", False, "DeepCache", "Enable DeepCache (first pass)."),
        Param("hires", "bool", False, "Apply in hires pass",
              "Also cache in the hires-fix second pass, on that pass's own steps."),
        Param("interval", "int", 3, "Cache interval (N)",
              "One full step in every N; the steps between reuse the cached deep features. 1 = every step full (off).",
              1, 50, 1),
        Param("level", "int", 0, "Cache level (k)",
              "How many shallow blocks run on cheap steps: input blocks 0..k and the last k+1 output blocks. "
              "0 is fastest; deeper levels cost more and change less. Clamped to the model's block count.",
              0, 11, 1),
        Param("schedule", "choice", "uniform", "Schedule",
              "uniform: full every N steps. nonuniform: the reference's power curve, full steps denser around the center step.",
              choices=("uniform", "nonuniform")),
        Param("start", "float", 0.0, "Start at",
              "Ratio of the steps before which every step is full (e.g. 0.4 keeps the layout-forming early steps exact).",
              0.0, 1.0, 0.01),
        Param("end", "float", 1.0, "End at", "Ratio of the steps from which every step is full again.", 0.0, 1.0, 0.01),
        Param("center", "float", 0.3, "Non-uniform center",
              "Ratio of the steps where the non-uniform schedule places its full steps densest (reference: step 15 of 50).",
              0.0, 1.0, 0.01, advanced=True),
        Param("pow", "float", 1.4, "Non-uniform power",
              "Exponent of the non-uniform curve; larger concentrates full steps more around the center.",
              1.02, 3.0, 0.01, advanced=True),
    ),
    recommended={
        "sd1": {"interval": 3, "level": 0},
        "sd2": {"interval": 3, "level": 0},
        "sdxl": {"interval": 3, "level": 0},
    },
)


# --- schedules -----------------------------------------------------------------------------

def quad_center_steps(total: int, n_full: int, center: int, pow_: float) -> list[int]:
    """The experimental pipeline's `sample_from_quad_center`, same arithmetic: `(-center)**(1/p)`
    is complex in Python and the truncation keeps the real part. Lowers p by 0.02 until the curve
    gives n_full distinct steps; ValueError once p <= 1."""
    while pow_ > 1:
        x = np.linspace((-center) ** (1 / pow_), (total - center) ** (1 / pow_), n_full + 1)
        inner = np.unique(np.real(x ** pow_).astype(np.int32))[1:-1]
        steps = [0] + [int(v) + center for v in inner]
        if len(steps) == n_full:
            return steps
        pow_ -= 0.02
    raise ValueError(f"no power curve gives {n_full} full steps of {total} around step {center}")


def full_steps(total: int, interval: int, schedule: str, center: float = 0.3, pow_: float = 1.4) -> frozenset[int]:
    """The steps that run in full (before the window and the cache checks). Uniform: 0, N, 2N...
    Non-uniform: ceil(total / N) steps on the power curve around step int(center * total)."""
    if interval <= 1:
        return frozenset(range(total))
    if schedule == "uniform":
        return frozenset(range(0, total, interval))
    return frozenset(quad_center_steps(total, -(-total // interval), int(center * total), pow_))


def pass_plan(values: dict[str, Any], total: int) -> tuple[frozenset[int], str | None]:
    """The full steps of a pass of `total` steps, and why the uniform schedule replaced the
    non-uniform one (None when it did not)."""
    try:
        return full_steps(total, values["interval"], values["schedule"], values["center"], values["pow"]), None
    except ValueError as e:
        return full_steps(total, values["interval"], "uniform"), f"{e}; using the uniform schedule"


def is_cheap(values: dict[str, Any], clock: Any, full: frozenset[int]) -> bool:
    """The schedule's decision for the clock's step (before the cache checks): cheap inside the
    start/end window unless the plan runs the step in full."""
    return clock.in_window(values["start"], values["end"]) and clock.step not in full


runs_in_pass = first_pass_or_hires_box


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    clock = where.clock
    if clock is not None and not cheap_steps(values, clock):
        return (f"no step of this {clock.total_steps}-step pass is cheap (interval {values['interval']}, "
                "start/end window)")
    return None


def shallow_range(level: int, num_inputs: int, num_outputs: int) -> tuple[int, int]:
    """(last input block, first output block) that a cheap step runs, for level k clamped to the model."""
    k = min(level, num_inputs - 1, num_outputs - 1)
    return k, num_outputs - 1 - k


def noise_level(call: UNetCall) -> float | None:
    """The call's noise level (its largest timestep, else the clock's sigma), to spot upward jumps."""
    if call.timesteps is not None:
        return float(torch.as_tensor(call.timesteps).max())
    return call.clock.sigma


def cheap_steps(values: dict[str, Any], clock: Any) -> list[int]:
    """The steps of the clock's pass that the schedule and the window make cheap (before the
    cache checks, which may still run a cheap step in full)."""
    full = pass_plan(values, clock.total_steps)[0]
    return [s for s in clock.window_steps(values["start"], values["end"]) if s not in full]


# --- the cache -----------------------------------------------------------------------------

@dataclass
class DeepCacheState:
    """Per-step decision and per-call cache.

    A step is cheap when the schedule says so and every call of it finds its own entry, keyed by
    (call index in the step, x's shape, batch layout): Heun's second call or the uncond half of a
    split batch never reads another call's features. All entries come from the last full step:
    whenever a step turns full (scheduled, or because a call found no entry) the cache is
    cleared first, so a batch-shape change (NGMS, split cond/uncond) drops it. It is also cleared
    when a call's noise level rises above the previous one at the same call index (restart-type
    samplers) and when the clock starts a new pass.
    """

    last_input: int
    first_output: int
    cheap_scheduled: Any  # (clock) -> bool
    control: bool = False  # the last call saw control residuals
    calls: int = 0  # UNet calls seen, calls that took the shortcut, full calls because of residuals
    cheap_calls: int = 0
    control_calls: int = 0
    entries: dict[Hashable, tuple[torch.Tensor, dict[Any, torch.Size]]] = field(default_factory=dict)
    levels: dict[int, float] = field(default_factory=dict)  # call index -> last noise level
    passes: int | None = None
    step_id: tuple[int, int] | None = None
    step_full: bool = True
    last_full: tuple[int, int] | None = None

    def begin(self, call: UNetCall) -> None:
        clock = call.clock
        if clock.passes != self.passes:
            self.passes, self.last_full, self.step_id, self.control = clock.passes, None, None, False
            self.entries.clear()
            self.levels.clear()
        index = clock.calls_in_step - 1
        level = noise_level(call)
        if level is not None:
            if level > self.levels.get(index, level):
                self.entries.clear()
            self.levels[index] = level
        sid = (clock.passes, clock.step)
        if sid != self.step_id:
            self.step_id, self.step_full = sid, not self.cheap_scheduled(clock)
        self.calls += 1
        if self.control or call.control:
            self.control_calls += not self.step_full
            self.step_full = True
        key = (index, call.extra, tuple(call.x.shape), None if call.rows is None else call.rows.key)
        cached = self.entries.get(key)
        if cached is None:
            self.step_full = True  # the rest of this step runs in full as well
        if self.step_full:
            if self.last_full != sid:
                self.entries.clear()
                self.last_full = sid
            call.state["deepcache_key"] = key
            return
        call.shortcut = Shortcut(self.last_input, self.first_output, *cached)
        self.cheap_calls += 1

    def idle(self) -> str | None:
        """After the pass: why no call took a cheap step (None when one did, or no call ran)."""
        if not self.calls or self.cheap_calls:
            return None
        if self.control_calls:
            return "every step ran in full because ControlNet / T2I-Adapter residuals applied on the cheap steps"
        return "every step ran in full (no valid cache on the cheap steps)"

    def capture(self, i: int, h: torch.Tensor, skip: torch.Tensor, call: UNetCall) -> tuple[torch.Tensor, torch.Tensor]:
        """On a full call, keep the h entering output_blocks[first_output] (before other techniques'
        before_concat hooks, which run again on cheap steps) and the shapes of the blocks before it."""
        if i == self.first_output:
            key = call.state.get("deepcache_key")
            if key is not None:
                # a copy: later hooks may write into the host's concat, which a view would also keep whole
                self.entries[key] = (h.clone(), dict(call.shapes))
        return h, skip

    def end(self, out: torch.Tensor, call: UNetCall) -> torch.Tensor:
        self.control = call.control or call.residuals
        return out


# --- wiring ------------------------------------------------------------------------------

def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    clock = ctx.clock
    num_inputs, num_outputs = len(ctx.map.inputs), len(ctx.map.outputs)
    last_input, first_output = shallow_range(values["level"], num_inputs, num_outputs)
    if last_input != values["level"]:
        ctx.warn(f"level {values['level']} is deeper than this model allows; using {last_input}")
    if clock.total_steps < FEW_STEPS:
        ctx.warn(f"only {clock.total_steps} steps in this pass: DeepCache saves little and costs quality "
                 f"with fewer than {FEW_STEPS} steps (or with few-step models and samplers)")
    plans: dict[int, frozenset[int]] = {}

    def plan(total: int) -> frozenset[int]:
        if total not in plans:
            plans[total], problem = pass_plan(values, total)
            if problem:
                ctx.warn(problem)
        return plans[total]

    plan(clock.total_steps)

    def cheap_scheduled(clock: Any) -> bool:
        return is_cheap(values, clock, plan(clock.total_steps))

    state = DeepCacheState(last_input, first_output, cheap_scheduled)
    ctx.hook("begin", state.begin)
    ctx.hook("before_concat", state.capture)
    ctx.hook("end", state.end)
    ctx.forward_hooks().watch_residuals.add(first_output)
    ctx.patcher.on_restore(state.entries.clear, ctx.technique)
    ctx.idle_after(state.idle)
