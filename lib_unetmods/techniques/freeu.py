"""FreeU (Si et al., CVPR 2024): scale backbone channels and damp the skip's low frequencies at
every decoder concat. v1 is the first release (plain scale, diffusers); v2 the structure-aware
scale of the FreeU README since 2023-10 (Forge). Stage 3, offset/width, cutoff and high-end scale
and the smooth schedule follow ljleb/sd-webui-freeu."""
from __future__ import annotations

from typing import Any

import torch

from ..clock import covers_no_step
from ..params import Param, TechniqueSpec, auto_values_param, first_pass_or_hires_box

STAGES = (1, 2, 3)  # stage n acts where h has model_channels * 2**(3-n) channels

# (b, s) of stages 1 and 2 per preset, FreeU README; each preset carries its formula version.
_PRESET_VALUES = {
    "sd14": ("v2", 1.3, 0.9, 1.4, 0.2),
    "sd15": ("v2", 1.5, 0.9, 1.6, 0.2),
    "sd21": ("v2", 1.4, 0.9, 1.6, 0.2),
    "sdxl": ("v2", 1.3, 0.9, 1.4, 0.2),
    "sd14-v1": ("v1", 1.2, 0.9, 1.4, 0.2),
    "sd21-v1": ("v1", 1.1, 0.9, 1.2, 0.2),
    "sdxl-v1": ("v1", 1.1, 0.6, 1.2, 0.4),
}
PRESETS = {
    name: {"version": v, "b1": b1, "s1": s1, "b2": b2, "s2": s2, "b3": 1.0, "s3": 1.0}
    for name, (v, b1, s1, b2, s2) in _PRESET_VALUES.items()
}
FAMILY_PRESET = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl", "sdxl_refiner": "sdxl"}


def _stage_params(n: int, b: float, s: float) -> tuple[Param, ...]:
    adv = n == 3
    return (
        Param(f"b{n}", "float", b, f"Stage {n} backbone scale (b{n})",
              f"Multiplies the backbone channels of stage {n} (h with {2 ** (3 - n)}x model channels); above 1 strengthens structure.",
              -1.0, 3.0, 0.01, advanced=adv),
        Param(f"s{n}", "float", s, f"Stage {n} skip scale (s{n})",
              f"Multiplies the low frequencies of stage {n}'s skip features; below 1 damps high-frequency noise from the encoder.",
              -1.0, 3.0, 0.01, advanced=adv),
        Param(f"offset{n}", "float", 0.0, f"Stage {n} backbone offset",
              "Where the scaled channel range starts, as a fraction of the channels (wraps around).", 0.0, 1.0, 0.01, advanced=True),
        Param(f"width{n}", "float", 0.5, f"Stage {n} backbone width",
              "How many channels are scaled, as a fraction of the channels; the paper scales the first half.", 0.0, 1.0, 0.01, advanced=True),
        Param(f"cutoff{n}", "float", 0.0, f"Stage {n} skip cutoff",
              "Size of the low-frequency box scaled by s, as a fraction of the half spectrum; 0 = the paper's 2x2 box.", 0.0, 1.0, 0.01, advanced=True),
        Param(f"high{n}", "float", 1.0, f"Stage {n} skip high-end scale",
              "Multiplies the frequencies outside the box.", -1.0, 3.0, 0.01, advanced=True),
    )


SPEC = TechniqueSpec(
    id="freeu",
    title="FreeU",
    description="Re-weights the decoder's backbone and skip features for more detail and coherence, at almost no cost.",
    params=(
        Param("enabled", "bool", False, "FreeU", "Enable FreeU."),
        auto_values_param("FreeU"),
        Param("version", "choice", "v2", "Version",
              "v2 scales each position by how active it is (README since Oct 2023, Forge); v1 scales uniformly (paper release, diffusers).",
              choices=("v1", "v2")),
        *_stage_params(1, 1.5, 0.9),
        *_stage_params(2, 1.6, 0.2),
        *_stage_params(3, 1.0, 1.0),
        Param("start", "float", 0.0, "Start at", "Ratio of the steps where FreeU starts.", 0.0, 1.0, 0.01),
        Param("stop", "float", 1.0, "Stop at", "Ratio of the steps where FreeU stops.", 0.0, 1.0, 0.01),
        Param("smoothness", "float", 0.0, "Transition smoothness",
              "0 switches on and off at start/stop; 1 ramps the factors linearly in from step 0 and out towards stop.", 0.0, 1.0, 0.01),
        Param("hires", "bool", True, "Apply in hires pass", "Also apply FreeU in the hires-fix second pass, on its own schedule."),
        Param("hr_start", "float", 0.0, "Hires start at", "Ratio of the hires-pass steps where FreeU starts.", 0.0, 1.0, 0.01, advanced=True),
        Param("hr_stop", "float", 1.0, "Hires stop at", "Ratio of the hires-pass steps where FreeU stops.", 0.0, 1.0, 0.01, advanced=True),
    ),
    presets=PRESETS,
    recommended={fam: PRESETS[name] for fam, name in FAMILY_PRESET.items()},
)


# --- the math, on plain tensors ----------------------------------------------------------

def channel_region(channels: int, offset: float, width: float) -> torch.Tensor:
    """Boolean mask of the scaled channels: [offset, offset + width) of the channels, wrapping."""
    start = round(offset * channels)
    count = round(min(width, 1.0) * channels)
    index = (torch.arange(channels) - start) % channels
    return index < count


def backbone_scale(h: torch.Tensor, b: float, version: str) -> torch.Tensor | float:
    """v1: b. v2: per sample, 1 at the least and b at the most active position of the channel
    mean (min-max normalised); a spatially constant mean gets scale 1 instead of 0/0."""
    if version == "v1":
        return b
    mean = h.mean(dim=1, keepdim=True)
    lo = mean.amin(dim=(2, 3), keepdim=True)
    hi = mean.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    norm = torch.where(span > 0, (mean - lo) / torch.where(span > 0, span, 1), 0)
    return 1 + (b - 1) * norm


def scale_backbone(h: torch.Tensor, b: float, version: str, offset: float = 0.0, width: float = 0.5) -> torch.Tensor:
    mask = channel_region(h.shape[1], offset, width).to(h.device)
    out = h.clone()
    out[:, mask] = h[:, mask] * backbone_scale(h, b, version)
    return out


_FFT_FAILED: set[str] = set()  # devices whose complex FFT raised (MPS, DirectML): use the CPU


def fourier_filter(x: torch.Tensor, cutoff: float, scale: float, scale_high: float = 1.0) -> torch.Tensor:
    """Scale the centred low-frequency box of x's 2-D spectrum by `scale` and the rest by
    `scale_high`. The box spans rows H//2 - t .. H//2 + t - 1 with t = max(1, floor(H//2 * cutoff)),
    likewise for columns, so cutoff 0 is the paper's threshold-1 box. float32 FFT; identity
    factors return x itself (an FFT round trip is not bit-exact)."""
    if scale == 1 and scale_high == 1:
        return x
    device = x.device
    if str(device) in _FFT_FAILED:
        return fourier_filter(x.cpu(), cutoff, scale, scale_high).to(device)
    try:
        H, W = x.shape[-2:]
        mask = torch.full((H, W), float(scale_high), device=device)
        tr, tc = max(1, int((H // 2) * cutoff)), max(1, int((W // 2) * cutoff))
        mask[H // 2 - tr:H // 2 + tr, W // 2 - tc:W // 2 + tc] = scale
        # ifftshift(fftshift(X) * mask) == X * ifftshift(mask), bit for bit (a permutation commutes
        # with a per-element product); in place, at most two complex copies of x live at once, not three
        spectrum = torch.fft.fftn(x.float(), dim=(-2, -1)).mul_(torch.fft.ifftshift(mask))
        return torch.fft.ifftn(spectrum, dim=(-2, -1)).real.to(x.dtype)
    except RuntimeError:
        if device.type == "cpu":
            raise
        _FFT_FAILED.add(str(device))
        return fourier_filter(x, cutoff, scale, scale_high)


def schedule_ratio(step: int, start: int, stop: int, smoothness: float) -> float:
    """ljleb's schedule on step indices: flat 1 on [start, stop), blended with a ramp that rises
    to 1 at start and falls to 0 at stop, by `smoothness`."""
    flat = 1.0 if start <= step < stop else 0.0
    if start == stop:
        smooth = 0.0
    elif step < start:
        smooth = min(max(step / start, 0.0), 1.0)
    else:
        smooth = min(max(1 + (step - start) / (start - stop), 0.0), 1.0)
    return (1 - smoothness) * flat + smoothness * smooth


def pass_window(values: dict[str, Any], hires: bool) -> tuple[float, float]:
    """(start, stop) ratios of the pass's schedule."""
    return (values["hr_start"], values["hr_stop"]) if hires else (values["start"], values["stop"])


def step_ratio(values: dict[str, Any], window: tuple[float, float], clock: Any) -> float:
    """The schedule ratio at the clock's step (0 = FreeU off at this step, 1 = full strength)."""
    return schedule_ratio(clock.step, clock.step_of(window[0]), clock.step_of(window[1]), values["smoothness"])


runs_in_pass = first_pass_or_hires_box

NEUTRAL = {f"{k}{n}": 1.0 for n in STAGES for k in ("b", "s", "high")}  # every factor 1: FreeU changes nothing


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    if all(values[k] == v for k, v in NEUTRAL.items()):
        return "every backbone, skip and high-end scale is 1"
    window = covers_no_step(where.clock, lambda clock: any(_ratio_at(values, clock, step) > 0 for step in range(clock.total_steps)),
                            "its window")
    if window is not None:
        return window
    if umap is not None and not any(stage_of(c, umap.model_channels) for c in umap.h_channels):
        return "no decoder join has 4x, 2x or 1x the model channels"
    return None


def _ratio_at(values: dict[str, Any], clock: Any, step: int) -> float:
    """FreeU's ratio at a step of the pass (on a probe clock: the pass's own stays where it is)."""
    probe = type(clock)()
    probe.start(clock.total_steps, clock.hires)
    probe.begin_step(step)
    return step_ratio(values, pass_window(values, clock.hires), probe)


def freeu_join(h: torch.Tensor, skip: torch.Tensor, values: dict[str, Any], stage: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder join: the stage's factors, interpolated towards 1 by the schedule ratio."""
    b, s, hi = (1 + (values[f"{k}{stage}"] - 1) * ratio for k in ("b", "s", "high"))
    if b != 1:
        h = scale_backbone(h, b, values["version"], values[f"offset{stage}"], values[f"width{stage}"])
    return h, fourier_filter(skip, values[f"cutoff{stage}"], s, hi)


def stage_of(h_channels: int, model_channels: int) -> int | None:
    for n in STAGES:
        if h_channels == model_channels * 2 ** (3 - n):
            return n
    return None


# --- wiring ------------------------------------------------------------------------------

def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    window = pass_window(values, ctx.hires)
    stages = [stage_of(c, ctx.map.model_channels) for c in ctx.map.h_channels]
    if not any(stages):
        ctx.warn("no decoder join has 4x, 2x or 1x the model channels; nothing to do")
        return
    clock = ctx.clock

    def join(i: int, h: torch.Tensor, skip: torch.Tensor, call: Any) -> tuple[torch.Tensor, torch.Tensor]:
        stage = stages[i]
        if stage is None:
            return h, skip
        ratio = step_ratio(values, window, clock)
        if ratio == 0:
            return h, skip
        return freeu_join(h, skip, values, stage, ratio)

    ctx.hook("before_concat", join)
