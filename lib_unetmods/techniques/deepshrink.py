"""Deep Shrink ("Kohya hires fix"): in the noisiest steps, shrink the hidden state after one input
block so the deeper blocks run near the training resolution, and resize h back to each skip's
exact size before the decoder concats. Semantics of ComfyUI's `PatchModelAddDownscale` / Forge's
"Kohya HRFix Integrated" (block, factor, window, methods, downscale after skip), plus kohya's and
wcde's second window and wcde's smooth scaling.

Each host keeps its own Upsample: on A1111 ldm's plain x2, after which h is resized to the skip
(the A1111 anchor: wcde / ComfyUI's algorithm block by block on ldm's blocks); on Forge its
Upsample goes straight to the next skip's shape, as Forge's built-in Kohya HRFix and ComfyUI do,
so Forge gives its built-in's image in every setting. The two agree where the full-size skip is
met at a concat (the defaults) and differ slightly where an Upsample leaves a shrunk size
(downscale after skip off, factors other than 2).

Each host keeps its anchor's window too: on A1111 the step window int(start * N) <= step <
int(end * N) (wcde's and kohya's A1111 extensions count steps); on Forge the built-in's sigma
window, percent_to_sigma(end) <= the call's sigma <= percent_to_sigma(start), which at 4 steps or
with Karras sigmas takes steps the step window leaves out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..clock import covers_no_step
from ..forge_call import call_sigma
from ..forward import Refused
from ..params import Param, TechniqueSpec, auto_values_param, first_pass_or_hires_box
from ..schedules import percent_to_sigma

METHODS = ("bicubic", "bilinear", "nearest-exact", "nearest", "area", "bislerp")

PRESETS = {
    # ComfyUI / Forge node defaults (= kohya's ratio 0.5 until t >= 650, at SD1 depth 1).
    "comfy": {"block": 3, "factor": 2.0, "start": 0.0, "end": 0.35, "after_skip": True, "downscale_method": "bicubic",
              "upscale_method": "bicubic", "smooth": False, "end2": 0.0},
    # Our pick for SDXL at about 2x its native side: same geometry (block 3 is SDXL's first
    # downsample; the attention levels run at native size), a longer window that ramps back to
    # full size instead of switching abruptly. Not tuned on real weights.
    "sdxl": {"block": 3, "factor": 2.0, "start": 0.0, "end": 0.5, "after_skip": True, "downscale_method": "bicubic",
             "upscale_method": "bicubic", "smooth": True, "end2": 0.0},
    # wcde/sd-webui-kohya-hiresfix defaults (Depth 3 until 15 %, Depth 4 until 30 %, smooth):
    # wcde Depth D shrinks the input of input block D-1, i.e. block D-2 after its skip.
    "wcde": {"block": 1, "factor": 2.0, "start": 0.0, "end": 0.15, "after_skip": True, "downscale_method": "bicubic",
             "upscale_method": "bicubic", "smooth": True, "block2": 2, "end2": 0.3},
}

SPEC = TechniqueSpec(
    id="deepshrink",
    title="Deep Shrink",
    description="Kohya's hires fix: runs the deep UNet blocks at a lower resolution in the first steps, "
                "against duplicated subjects above the native resolution; also faster.",
    params=(
        Param("enabled", "bool", False, "Deep Shrink", "Enable Deep Shrink (Kohya hires fix)."),
        auto_values_param("Deep Shrink"),
        Param("block", "int", 3, "Block number",
              "ldm input block after which h is shrunk (SD1/SD2: 1-11, SDXL: 1-8); 3 = the first downsample.",
              1, 11, 1),
        Param("factor", "float", 2.0, "Downscale factor",
              "h is resized to round(size / factor); about target side / native side (2 for SD1.5 at 1024).",
              0.1, 9.0, 0.05),
        Param("start", "float", 0.0, "Start at", "Ratio of the steps where the shrink starts.", 0.0, 1.0, 0.01),
        Param("end", "float", 0.35, "End at",
              "Ratio of the steps where the shrink ends; raise it for larger targets.", 0.0, 1.0, 0.01),
        Param("downscale_method", "choice", "bicubic", "Downscale method", "Interpolation that shrinks h.",
              choices=METHODS),
        Param("upscale_method", "choice", "bicubic", "Upscale method",
              "Interpolation that resizes h to the skip's exact size before a decoder concat.", choices=METHODS),
        Param("after_skip", "bool", True, "Downscale after skip",
              "Shrink after the block's skip is saved (its skip stays full size); off: the skip is shrunk too."),
        Param("smooth", "bool", False, "Smooth scaling",
              "Ramp the factor linearly from its value at Start back to 1 at the end of the window (wcde).",
              advanced=True),
        Param("block2", "int", 6, "Second window block",
              "Block number used in the second window (kohya's depth 2 / wcde's second Depth).", 1, 11, 1,
              advanced=True),
        Param("end2", "float", 0.0, "Second window end at",
              "The second window runs from End at to this ratio with the second block; off while not above End at.",
              0.0, 1.0, 0.01, advanced=True),
        Param("hires", "bool", False, "Apply in hires pass",
              "Also shrink in the hires-fix second pass, on that pass's steps (off: first pass only)."),
    ),
    presets=PRESETS,
    recommended={"default": PRESETS["comfy"], "sdxl": PRESETS["sdxl"]},
)


# --- the math, on plain tensors ----------------------------------------------------------

def shrunk_size(size: tuple[int, ...], factor: float) -> tuple[int, int]:
    """ComfyUI's rule: round(side * (1 / factor)), Python rounding (half to even), at least 1."""
    return tuple(max(1, round(side * (1.0 / factor))) for side in size[-2:])  # type: ignore[return-value]


def smooth_factor(factor: float, progress: float, start: float, end: float) -> float:
    """wcde's smooth scaling: the scale 1/factor rises linearly to 1 across [start, end)."""
    ramp = min(max((progress - start) / (end - start), 0.0), 1.0) if end > start else 1.0
    return 1.0 / (1.0 / factor + (1.0 - 1.0 / factor) * ramp)


def _source_positions(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index along one axis: the two input neighbours and the weight of the second,
    in bilinear geometry (align_corners=False, positions clamped to the border)."""
    pos = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(0, n_in - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo, hi, (pos - lo).float()


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Spherical interpolation of the vectors along `dim` (directions slerped, norms lerped). Where
    slerp is undefined, as ComfyUI: nearly equal directions keep `a`, nearly opposite ones lerp."""
    na, nb = a.norm(dim=dim, keepdim=True), b.norm(dim=dim, keepdim=True)
    ua = torch.where(na > 0, a / na, 0.0)
    ub = torch.where(nb > 0, b / nb, 0.0)
    dot = (ua * ub).sum(dim=dim, keepdim=True).clamp(-1.0, 1.0)
    omega = dot.acos()
    sin_omega = omega.sin()
    spherical = (((1 - t) * omega).sin() * ua + (t * omega).sin() * ub) / sin_omega * ((1 - t) * na + t * nb)
    linear = (1 - t) * a + t * b
    return torch.where(dot > 1 - 1e-5, a, torch.where(dot < 1e-5 - 1, linear, spherical))


def bislerp(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, C, H, W) to `size` by slerping channel vectors between the two bilinear
    neighbours, along the width first, then the height (ComfyUI's `bislerp` geometry)."""
    out = x.float()
    for dim, n_out in ((3, size[1]), (2, size[0])):
        lo, hi, t = _source_positions(out.shape[dim], n_out, x.device)
        shape = [1, 1, 1, 1]
        shape[dim] = n_out
        out = slerp(out.index_select(dim, lo), out.index_select(dim, hi), t.view(shape))
    return out.to(x.dtype)


def resize(x: torch.Tensor, size: tuple[int, int], method: str) -> torch.Tensor:
    """x resized to `size` (H, W); the same size returns x itself, so factor 1 is exact."""
    size = tuple(size[-2:])  # type: ignore[assignment]
    if tuple(x.shape[-2:]) == size:
        return x
    if method == "bislerp":
        return bislerp(x, size)
    if x.dtype == torch.bfloat16:  # bicubic has no bf16 kernel on some backends (kohya casts too)
        return F.interpolate(x.float(), size=size, mode=method).to(x.dtype)
    return F.interpolate(x, size=size, mode=method)


@dataclass(frozen=True)
class Window:
    block: int
    start: float
    end: float  # the ramp of smooth scaling ends here


def windows_of(values: dict[str, Any]) -> list[Window]:
    """The first window [start, end) at `block`; the second continues it until end2 at `block2`
    (kohya: depth 2 for ds_timesteps_2 <= t < ds_timesteps_1; wcde: the second Stop at)."""
    windows = [Window(values["block"], values["start"], values["end"])]
    if values["end2"] > values["end"]:
        windows.append(Window(values["block2"], values["start"], values["end2"]))
    return windows


def window_steps(window: Window, clock: Any) -> range:
    """The step indices of the pass inside the window (as clock.in_window counts them)."""
    end = clock.total_steps if window.end >= 1.0 else clock.step_of(window.end)
    return range(clock.step_of(window.start), min(end, clock.total_steps))


def in_sigma_window(window: Window, sigma: float) -> bool:
    """Forge's built-in's rule (ComfyUI's PatchModelAddDownscale) for a call at this sigma."""
    return percent_to_sigma(window.end) <= sigma <= percent_to_sigma(window.start)


def active_window(windows: list[Window], clock: Any, sigma: float | None = None) -> Window | None:
    """The first window (the first wins where they overlap) whose steps contain the current step,
    or, given the call's sigma (Forge), whose sigmas contain it."""
    if sigma is not None:
        return next((w for w in windows if in_sigma_window(w, sigma)), None)
    return next((w for w in windows if clock.in_window(w.start, w.end)), None)


def step_factor(values: dict[str, Any], window: Window, clock: Any) -> float:
    """The downscale factor at the clock's step inside `window` (ramped with smooth scaling)."""
    return smooth_factor(values["factor"], clock.progress, window.start, window.end) if values["smooth"] else values["factor"]


runs_in_pass = first_pass_or_hires_box


# --- wiring ------------------------------------------------------------------------------

STATE_KEY = "deepshrink"  # set in UNetCall.state when this call was shrunk


def check_blocks(windows: list[Window], umap: Any) -> None:
    last = len(umap.inputs) - 1
    for w in windows:
        if not 1 <= w.block <= last:
            raise Refused(f"block {w.block} does not exist on this {umap.family.upper()} UNet "
                          f"(valid input blocks: 1-{last})")


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    """Nothing to do at factor 1 or when no window covers a step (on Forge: an empty sigma window;
    which steps it covers shows only while sampling); Refused for a missing block."""
    windows = windows_of(values)
    if umap is not None:
        check_blocks(windows, umap)
    if values["factor"] == 1:
        return "a downscale factor of 1 keeps every size"
    if umap is not None and umap.host == "forge":
        return "the window ends where it starts" if all(w.end <= w.start for w in windows) else None
    return covers_no_step(where.clock, lambda clock: any(window_steps(w, clock) for w in windows), "the window")


def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    windows = windows_of(values)
    check_blocks(windows, ctx.map)
    clock = ctx.clock
    down, up = values["downscale_method"], values["upscale_method"]
    forge = ctx.map.host == "forge"
    blocks = sorted({w.block for w in windows})
    shrunk = [0, 0]  # calls that reached the first block, calls shrunk

    def shrink(i: int, h: torch.Tensor, call: Any) -> torch.Tensor:
        if i not in blocks:
            return h
        shrunk[0] += i == blocks[0]
        window = active_window(windows, clock, call_sigma(call.kwargs) if forge else None)
        if window is None or i != window.block:
            return h
        size = shrunk_size(h.shape, step_factor(values, window, clock))
        if size == tuple(h.shape[-2:]):
            return h
        shrunk[1] += STATE_KEY not in call.state
        call.state[STATE_KEY] = size
        return resize(h, size, down)

    def match_skip(i: int, h: torch.Tensor, size: tuple[int, ...], call: Any) -> torch.Tensor:
        if STATE_KEY in call.state and tuple(h.shape[-2:]) != tuple(size):
            h = resize(h, size, up)
        return h

    ctx.hook("after_skip" if values["after_skip"] else "after_input", shrink)
    ctx.hook("to_skip", match_skip)
    ctx.idle_after(lambda: "it shrank no UNet call of this pass (no call in its window, or the factor keeps this "
                           "latent's sizes)" if shrunk[0] and not shrunk[1] else None)
