"""CD-Tuner (hako-mikan/sd-webui-cd-tuner): detail, contrast, brightness, colour and saturation.

The reference edits weights and sampler tensors; here everything is a torch hook, so nothing has
to be restored but the hook handles, and the Lora extension's weight backups never see an edit:

* Detail 1 / Detail 2 / Contrast 1 scale conv_in's and the final GroupNorm's weight and bias and
  add to the final conv's bias. For an affine layer, output(a*W, c*b) = a*(output(W, b) - b) + c*b,
  so forward hooks on the three modules give the weight edit's result (A2.3).
* Contrast 2 / Brightness / colours shift the x0 estimate once, at the last step of the pass
  (the reference's cfg_denoised at sampling_step == total - 2, which lags one step behind).
  A denoiser computes x0 = c_skip*x + c_out*F from the UNet output F, so shifting x0 by s means
  adding s / c_out to F: s/(-sigma) for eps-prediction, s*sqrt(sigma^2+1)/(-sigma) for v.
* The colour map pushes the noisy input of the first steps, cond rows one way and uncond rows
  the other (cfg_denoiser params.x in the reference: every row A1111 stacks for the evaluation,
  its last batch-size rows, the uncond ones, up, the others down, by the mean over all of them).
  The row description (rows.py) gives each call's rows and every stacked row's image, so a call
  with some of the rows (batch cond/uncond off, an extra pass) gets exactly their part of the push.
  The reference's denoiser then sees the pushed x' both inside the UNet and in x0 = c_skip*x' +
  c_out*F; the host here keeps its own x, so the UNet input gets c_in*(x'-x) and F gets
  c_skip*(x'-x)/c_out.
* Saturation 1 / 2 scale VAE decoder conv weights (A2.5): forward hooks on those convs,
  conv(x, f*W, b) = f*(conv(x, W, b) - b) + b, removed when the host restores after decoding.

Clock conversions (the reference reads A1111's sampling_step, which is 0 in steps 0 and 1 and
step - 1 after that): its shift at sampling_step == total - 2 is our last step, total - 1; its
Stop Step s >= 1 leaves the edits on in steps 0..s, our stop = s + 1 (stop 0 = never on, in
both); its colour map fires at our steps 0, 2, 3, .., fst with decay index 0, 1, .., fst - 1, ours
at steps 0..fst - 1 with the same decay sequence, i.e. "the first fst steps" the UI promises.

sigma for each UNet row comes from its timestep, inverting k-diffusion's sigma_to_t on SD's
training schedule (SD1, SD2 and SDXL share it), so second-order and split cond/uncond calls
get their own sigma. `ctx.prediction` ("eps" or "v") selects c_skip/c_out; the host reads it
from the model (A1111: `sd_model.parameterization == "v"` for SD2-768 and v-pred SDXL).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..families import is_sdxl
from ..rows import UNCOND, CallRows
from ..params import Param, TechniqueSpec, auto_values_param
from ..schedules import TRAIN_SIGMAS

K_SHIFT = 0.02 * 20 / 3  # latent units per slider unit of the one-time shift (A2.4)
SHIFT_NAMES = ("con2", "bri", "col1", "col2", "col3")
# Each slider's direction over latent channels 0..3, in the reference's sign (it is subtracted).
SHIFT_ROWS = {
    "sd": ((1, 0, 0, 0), (0, -1, 1 / 3, 2 / 3), (0, 1, 1, 0), (0, 0, -1, -1), (0, 1, 0, 1)),
    "sdxl": ((1, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (0, -1, -1, 0), (0, -1, 1, 0)),
}
SAT_KEYS = ("up.1.upsample.conv", "up.0.block.0.nin_shortcut")  # x (1 + 0.075 sat)
SAT2_KEYS = ("up.3.upsample.conv", "up.2.upsample.conv", "up.1.block.0.nin_shortcut", "conv_in", "conv_out")  # x (1 + 0.02 sat2)
MODES = ("horizontal", "vertical")

_NUM = r"\d+(\.\d*)?"
_SNUM = r"[-+]?\d+(\.\d*)?"
RATIOS_PATTERN = rf"{_NUM}(,{_NUM})*(\|{_NUM}(,{_NUM})*)*"
COLOURS_PATTERN = rf"({_SNUM}(,{_SNUM}){{2,3}}(\|{_SNUM}(,{_SNUM}){{2,3}})*)?"


def _slider(name: str, label: str, tooltip: str, limit: float, advanced: bool = False) -> Param:
    return Param(name, "float", 0.0, label, tooltip, -limit, limit, 0.1, advanced=advanced)


def _step_param(name: str, default: float, label: str, tooltip: str, minimum: float, advanced: bool = False) -> Param:
    return Param(name, "float", default, label, tooltip + " Below 1: a fraction of the pass's steps; 1 and above: a step number.",
                 minimum, 150.0, 0.01, advanced=advanced)


SPEC = TechniqueSpec(
    id="cdtuner",
    title="CD Tuner",
    description="Adjusts the amount of detail, contrast, brightness, colour tone and saturation during generation.",
    params=(
        Param("enabled", "bool", False, "CD Tuner", "Enable CD Tuner (every value 0 changes nothing)."),
        auto_values_param("CD Tuner"),
        _slider("d1", "Detail (d1)", "Scales the UNet's input conv: positive adds detail and noise, negative flattens (SD2 may react the other way).", 10),
        _slider("d2", "Detail 2 (d2)", "Scales the UNet's final GroupNorm: positive adds detail, negative flattens; gentler on composition than d1.", 10),
        _slider("con1", "Contrast (con1)", "Adds to the final conv's bias of latent channel 0 during sampling: contrast and detail.", 20),
        _slider("con2", "Contrast 2 (con2)", "Shifts latent channel 0 once at the end of sampling: contrast without changing the composition.", 20),
        _slider("bri", "Brightness (bri)", "Shifts the latent once at the end of sampling: brighter when positive.", 20),
        _slider("col1", "Cyan-Red (col1)", "Colour tone: cyan when negative, red when positive (latent shift at the end of sampling).", 20),
        _slider("col2", "Magenta-Green (col2)", "Colour tone: magenta when negative, green when positive.", 20),
        _slider("col3", "Yellow-Blue (col3)", "Colour tone: yellow when negative, blue when positive.", 20),
        _slider("sat", "Saturation (sat)", "Scales two VAE decoder convs by 1 + 0.075*sat while decoding.", 20),
        _slider("sat2", "Saturation 2 (sat2)", "Scales five VAE decoder convs by 1 + 0.02*sat2 while decoding.", 20),
        _step_param("start", 0.0, "Start at", "Where Detail, Detail 2 and Contrast start in the first pass.", 0.0),
        _step_param("stop", -1.0, "Stop at", "Where Detail, Detail 2 and Contrast stop in the first pass (the first step without them); -1 = never, 1 = after step 0.", -1.0),
        _slider("hd1", "hr-Detail (hd1)", "Replaces Detail in the hires-fix pass when not 0.", 10, advanced=True),
        _slider("hd2", "hr-Detail 2 (hd2)", "Replaces Detail 2 in the hires-fix pass when not 0.", 10, advanced=True),
        Param("hrs", "bool", False, "hr-scaling (hrs)", "In the hires pass, multiply the detail values by the latent area ratio (the hires scale squared).", advanced=True),
        _step_param("hr_start", 0.0, "Hires start at", "Where the detail and contrast edits start in the hires pass.", 0.0, advanced=True),
        _step_param("hr_stop", -1.0, "Hires stop at", "Where the detail and contrast edits stop in the hires pass; -1 = never.", -1.0, advanced=True),
        Param("cm_colors", "text", "", "Colour map colours",
              "One colour per region, regions separated by '|': Cyan-Red,Magenta-Green,Yellow-Blue (e.g. 5,-5,-5 = red), optionally "
              "brightness first (4 values). Empty = no colour map.", advanced=True, pattern=COLOURS_PATTERN),
        Param("cm_mode", "choice", "horizontal", "Colour map split", "horizontal: the outer ratios split the width and the inner ones the height; vertical: the other way round.",
              choices=MODES, advanced=True),
        Param("cm_ratios", "text", "1,1", "Colour map ratios",
              "Region sizes: one row '1,1' = two inner regions; several rows 'outer,inner,inner|outer,inner' split first by the outer ratios.",
              advanced=True, pattern=RATIOS_PATTERN),
        Param("cm_stop", "int", 2, "Colour map steps", "The colour map pushes the noisy latent in the first this many steps of each pass.", 0, 150, 1, advanced=True),
        Param("cm_strength", "float", 1.0, "Colour map strength", "Strength of the colour map (a quarter of it in the hires pass).", 0.0, 2.0, 0.1, advanced=True),
    ),
    recommended={"sd1": {"d1": 2.0, "d2": 2.0}, "sd2": {"d2": 2.0}, "sdxl": {"d1": 1.0, "d2": 1.0}},
)


# --- the math, on plain tensors ----------------------------------------------------------

def detail_scales(d: float) -> tuple[float, float]:
    """(weight factor, bias factor) of Detail 1 / Detail 2: (1 - 0.01 d, 1 + 0.02 d)."""
    return 1 - 0.01 * d, 1 + 0.02 * d


def pass_detail(d: float, hd: float, hires: bool, hrs: bool, area_ratio: float) -> float:
    """The detail value of this pass: hd replaces d in the hires pass when not 0, and hrs
    multiplies it by the hires/base latent area ratio."""
    if not hires:
        return d
    value = hd if hd != 0 else d
    return value * area_ratio if hrs else value


def rescale_affine(out: torch.Tensor, bias: torch.Tensor | None, a: float, c: float) -> torch.Tensor:
    """The output of an affine layer (conv, GroupNorm) with weight*a and bias*c, from its output
    with the original parameters: a*(out - bias) + c*bias, bias along dim 1."""
    if bias is None:
        return out * a
    # Forge's casting layers keep their parameters where they were (on the CPU in low-VRAM modes)
    # and cast them per call: move the bias to the output's device as well as its dtype
    b = bias.to(device=out.device, dtype=out.dtype).view(1, -1, *([1] * (out.ndim - 2)))
    return a * (out - b) + c * b


def latent_shift(values: dict[str, float], family: str) -> list[float]:
    """The per-channel amount the reference subtracts from the x0 estimate: K_SHIFT * table."""
    rows = SHIFT_ROWS["sdxl" if is_sdxl(family) else "sd"]
    return [K_SHIFT * sum(values[n] * row[ch] for n, row in zip(SHIFT_NAMES, rows)) for ch in range(4)]


def colour_vector(colour: Sequence[float], family: str) -> list[float]:
    """A colour map colour [bri,] col1, col2, col3 as a push on latent channels 1..3 (0.02 per
    unit, the slider tables' rows); without bri, bri is the mean of the three."""
    colour = list(colour)
    if len(colour) == 3:
        colour.insert(0, sum(colour) / 3)
    rows = SHIFT_ROWS["sdxl" if is_sdxl(family) else "sd"][1:]
    return [0.02 * sum(v * row[ch] for v, row in zip(colour, rows)) for ch in (1, 2, 3)]


def step_of(value: float, total: int) -> int:
    """A start/stop value as a step index: below 1 a fraction of the steps (truncated), else a step."""
    return int(value * total) if value < 1 else int(value)


def in_window(step: int, total: int, start: float, stop: float) -> bool:
    """start <= step < stop; a negative stop never stops."""
    return step_of(start, total) <= step and (stop < 0 or step < step_of(stop, total))


def sigma_of_timesteps(t: torch.Tensor) -> torch.Tensor:
    """k-diffusion's t_to_sigma on SD's training schedule: log-sigma interpolated between steps."""
    log_sigmas = TRAIN_SIGMAS.log().to(t.device)
    t = t.double().clamp(0, len(log_sigmas) - 1)
    low = t.floor().long()
    w = t - low
    high = (low + 1).clamp(max=len(log_sigmas) - 1)
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def denoiser_scalings(sigma: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of the VP denoiser, x0 = c_skip*x + c_out*F(c_in*x)."""
    root = (sigma ** 2 + 1).sqrt()
    if prediction == "v":
        return 1 / root ** 2, -sigma / root, 1 / root
    if prediction == "eps":
        return torch.ones_like(sigma), -sigma, 1 / root
    raise ValueError(f"unknown prediction type {prediction!r} (eps or v)")


Span = tuple[float, float]
Cells = list[tuple[Span, list[Span]]]  # [(outer span, [inner spans])], spans as fractions


def parse_cells(ratios: str) -> Cells:
    """The reference's makecells: rows 'outer,inner,...' separated by '|'; a single row is all
    inner ratios (outer 1); a row of one number is one full-size inner cell."""
    rows = [[float(v) for v in row.split(",")] for row in ratios.split("|")]
    if len(rows) == 1:
        rows[0].insert(0, 1.0)
    rows = [row * 2 if len(row) == 1 else row for row in rows]
    outer = _spans([row[0] for row in rows])
    return [(span, _spans(row[1:])) for span, row in zip(outer, rows)]


def _spans(sizes: list[float]) -> list[Span]:
    total = sum(sizes)
    if total <= 0:
        raise ValueError("colour map ratios must add up to more than 0")
    spans, start = [], 0.0
    for size in sizes:
        spans.append((start, start + size / total))
        start += size / total
    return spans


def region_boxes(height: int, width: int, cells: Cells, mode: str) -> list[tuple[slice, slice]]:
    """(rows, columns) of each region, in colour order; vertical: outer spans split the height."""
    boxes = []
    for (o0, o1), inner in cells:
        for i0, i1 in inner:
            (h0, h1), (w0, w1) = ((o0, o1), (i0, i1)) if mode == "vertical" else ((i0, i1), (o0, o1))
            boxes.append((slice(int(height * h0), int(height * h1)), slice(int(width * w0), int(width * w1))))
    return boxes


def parse_colours(text: str) -> list[list[float]]:
    return [[float(v) for v in colour.split(",")] for colour in text.split("|")] if text else []


def colour_map_ratio(vector: Sequence[float], push_index: int, strength: float, stop: int, hires: bool) -> float:
    """The reference's blend ratio for the push_index-th push: |vector|_1 * 5, decaying with the
    push index, times strength/2, 1/4 in the hires pass and a factor falling with the step count.
    Capped at 1: with strong colours the reference's ratio passes 1, and (1 - ratio) then inverts
    and amplifies the latent on every push until it overflows (a black or NaN image)."""
    steps_factor = 1.15 - 0.15 * stop if stop < 5 else 0.4
    decay = 1 / (1 + (1 + push_index) ** 1.5 / 10)
    ratio = sum(abs(v * 50) for v in vector) / 10 * decay * (0.5 * strength) * (0.25 if hires else 1.0) * steps_factor
    return min(ratio, 1.0)


GROWTH_LIMIT = 100.0


def push_is_sane(first_scale: float, pushed: torch.Tensor) -> bool:
    """False for a pushed latent no sampler step recovers from: not finite, or grown past
    GROWTH_LIMIT times the latent at the pass's first push. Strong colours over many steps grow the
    latent by up to 6 * |vector| per push, and the reference then ends in a black or NaN image."""
    scale = pushed.abs().amax().item()
    return math.isfinite(scale) and scale <= GROWTH_LIMIT * first_scale


def colour_map_push(x: torch.Tensor, up: Sequence[bool], boxes: Sequence[tuple[slice, slice]], vectors: Sequence[Sequence[float]],
                    ratios: Sequence[float]) -> torch.Tensor:
    """Push the stacked rows x region by region on channels 1..3: every row is blended by
    (1 - ratio) and moved by 6 * mean|x[:, ch]| * ratio * vector, the uncond rows (`up`) up, the
    others down (CFG then moves the result along -vector, i.e. towards the colour)."""
    x = x.clone()
    sign = torch.tensor([1.0 if u else -1.0 for u in up], dtype=x.dtype, device=x.device).view(-1, 1, 1)
    for (rows, cols), vector, ratio in zip(boxes, vectors, ratios):
        for ch in (1, 2, 3):
            push = vector[ch - 1] * 6 * x[:, ch].abs().mean() * ratio
            x[:, ch, rows, cols] = (1 - ratio) * x[:, ch, rows, cols] + sign * push
    return x


# --- wiring ------------------------------------------------------------------------------

def pass_window(values: dict[str, Any], hires: bool) -> tuple[float, float]:
    """(start, stop) of the detail/contrast window in this pass."""
    return (values["hr_start"], values["hr_stop"]) if hires else (values["start"], values["stop"])


def shift_step(shift: Sequence[float], hires: bool, hires_planned: bool, total: int) -> int | None:
    """The step whose x0 estimate gets the latent shift, or None. With hires fix the reference
    shifts only in the hires pass, at its last step."""
    return total - 1 if any(shift) and (hires or not hires_planned) else None


def apply(ctx: Any, values: dict[str, Any]) -> None:
    _apply_detail(ctx, values)
    shift = latent_shift(values, ctx.map.family)
    shift_on = shift_step(shift, ctx.hires, ctx.hires_planned, ctx.clock.total_steps) is not None
    colour_map = _colour_map(ctx, values)
    if (shift_on or colour_map) and ctx.map.out_conv.out_channels != 4:
        ctx.warn("the UNet does not output a 4-channel latent; latent shift and colour map skipped")
    elif shift_on or colour_map:
        _hook_unet_call(ctx, values, shift if shift_on else None, colour_map)
    _apply_saturation(ctx, values)


SLIDERS = ("d1", "d2", "hd1", "hd2", "con1", *SHIFT_NAMES, "sat", "sat2")


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    """Every slider at 0 and no colour map: nothing would be hooked."""
    colour_map = parse_colours(values["cm_colors"]) and values["cm_strength"] != 0 and values["cm_stop"] != 0
    if any(values[name] for name in SLIDERS) or colour_map:
        return None
    return "every value is 0 and there is no colour map"


def _apply_detail(ctx: Any, values: dict[str, Any]) -> None:
    start, stop = pass_window(values, ctx.hires)
    clock = ctx.clock
    hrs = ctx.hires and values["hrs"]
    if hrs and ctx.base_shape is None and (values["d1"] or values["d2"] or values["hd1"] or values["hd2"]):
        ctx.warn("hr-scaling needs the first pass's latent size, which the host did not give; not scaled")
        hrs = False
    base_area = ctx.base_shape[-2] * ctx.base_shape[-1] if hrs else 1

    def affine_hook(d: float, hd: float) -> Callable[..., torch.Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            if not in_window(clock.step, clock.total_steps, start, stop):
                return None
            area_ratio = args[0].shape[-2] * args[0].shape[-1] / base_area  # read from the call: latent_shape may be unknown
            return rescale_affine(out, module.bias, *detail_scales(pass_detail(d, hd, ctx.hires, hrs, area_ratio)))
        return hook

    def contrast_hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not in_window(clock.step, clock.total_steps, start, stop):
            return None
        out = out.clone()
        out[:, 0] += 0.02 * values["con1"]
        return out

    for name, module in (("d1", ctx.map.conv_in), ("d2", ctx.map.final_norm)):
        d, hd = values[name], values["h" + name]
        if pass_detail(d, hd, ctx.hires, False, 1.0):
            ctx.patcher.add_handle(module.register_forward_hook(affine_hook(d, hd)), ctx.technique)
    if values["con1"]:
        ctx.patcher.add_handle(ctx.map.out_conv.register_forward_hook(contrast_hook), ctx.technique)


def _colour_map(ctx: Any, values: dict[str, Any]) -> tuple[list[list[float]], Cells] | None:
    """(latent vectors, cells) of the colour map, or None when it is off."""
    colours = parse_colours(values["cm_colors"])
    if not colours or values["cm_strength"] == 0 or values["cm_stop"] == 0:
        return None
    try:
        cells = parse_cells(values["cm_ratios"])
    except ValueError as e:
        ctx.warn(f"colour map skipped: {e}")
        return None
    regions = sum(len(inner) for _, inner in cells)
    if len(colours) > regions:
        ctx.warn(f"{len(colours)} colours for {regions} regions; the extra colours are ignored")
    return [colour_vector(c, ctx.map.family) for c in colours[:regions]], cells


def _call_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = args[0] if args else kwargs["x"]
    t = args[1] if len(args) > 1 else kwargs.get("timesteps")
    return x, t


def _hook_unet_call(ctx: Any, values: dict[str, Any], shift: list[float] | None,
                    colour_map: tuple[list[list[float]], Cells] | None) -> None:
    """Torch hooks on the UNet module itself (they run whoever owns its forward, ControlNet
    included): a pre-hook pushes the colour map into x, a forward hook corrects the output."""
    hooks = _UNetCallHooks(ctx, values, shift, colour_map)
    if colour_map is not None:
        ctx.patcher.add_handle(ctx.unet.register_forward_pre_hook(hooks.before, with_kwargs=True), ctx.technique)
    ctx.patcher.add_handle(ctx.unet.register_forward_hook(hooks.after, with_kwargs=True, always_call=True), ctx.technique)


class _UNetCallHooks:
    """The colour map (pushed into the call's x, corrected in its output) and the latent shift
    (subtracted from the output at its step), for one sampling pass."""

    def __init__(self, ctx: Any, values: dict[str, Any], shift: list[float] | None,
                 colour_map: tuple[list[list[float]], Cells] | None) -> None:
        self.ctx, self.values, self.shift, self.colour_map = ctx, values, shift, colour_map
        self.clock, self.prediction = ctx.clock, ctx.prediction
        self.corrections: list[torch.Tensor | None] = []  # each call under way (an extra pass runs inside one)
        self.pushed: tuple[Any, torch.Tensor] | None = None  # (evaluation, change of each stacked row)
        self.first_scale: float | None = None  # the latent's scale at the first push of this pass
        self.stopped = False
        self.warn_once = ctx.warner()

    def sigmas(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not torch.is_tensor(t) or t.numel() not in (1, x.shape[0]):
            self.warn_once("the UNet call has no timesteps to read sigma from; latent shift and colour map skipped")
            return None
        return sigma_of_timesteps(t.reshape(-1)).expand(x.shape[0]).view(-1, 1, 1, 1)

    def before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Pre-hook: the colour map's push of this step, into the call's x."""
        self.corrections.append(None)
        if self.colour_map is None or self.clock.step >= self.values["cm_stop"] or self.stopped:
            return None
        x, t = _call_inputs(args, kwargs)
        host = self.ctx.calls.current
        rows = host.rows if host is not None else None
        if rows is None:
            self.warn_once("which rows of a UNet call are cond and which uncond is unknown; colour map skipped on it")
            return None
        sigma = self.sigmas(x, t)
        if sigma is None:
            return None
        delta = self._push(x, sigma, rows)
        if delta is None:
            return None
        c_skip, c_out, c_in = denoiser_scalings(sigma, self.prediction)
        self.corrections[-1] = c_skip * delta / c_out
        x = x.clone()
        x[:, :4] += (delta * c_in).to(x.dtype)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "x": x})

    def _push(self, x: torch.Tensor, sigma: torch.Tensor, rows: CallRows) -> torch.Tensor | None:
        """The change the colour map makes to the call's rows of the sampler's latent (None once it
        stopped): its part of the push of every row the host stacked for the evaluation."""
        noisy = x[:, :4].double() / denoiser_scalings(sigma, self.prediction)[2]  # an inpainting UNet's extra channels follow
        evaluation = rows.evaluation
        if evaluation is None or evaluation.latents is None:  # Forge's chunks alone: every stacked row is in this call
            return self._change(noisy, [r.kind == UNCOND for r in rows.rows])
        if evaluation.latents.shape[-2:] != noisy.shape[-2:]:  # a cropped input (Forge's area prompts)
            self.warn_once("a UNet call on part of the latent (an area prompt); colour map skipped on it")
            return None
        if self.pushed is None or self.pushed[0] is not evaluation:
            latents = evaluation.latents[:, :4].to(noisy)
            change = self._change(latents[[r.image for r in evaluation.rows]], [r.kind == UNCOND for r in evaluation.rows])
            self.pushed = (evaluation, change)
        change = self.pushed[1]
        return None if change is None else change[list(rows.positions)]

    def _change(self, stacked: torch.Tensor, up: list[bool]) -> torch.Tensor | None:
        clock, values = self.clock, self.values
        vectors, cells = self.colour_map
        boxes = region_boxes(stacked.shape[-2], stacked.shape[-1], cells, values["cm_mode"])
        ratios = [colour_map_ratio(v, clock.step, values["cm_strength"], values["cm_stop"], clock.hires) for v in vectors]
        pushed = colour_map_push(stacked, up, boxes, vectors, ratios)
        if self.first_scale is None:
            self.first_scale = stacked.abs().amax().item()
        if not push_is_sane(self.first_scale, pushed):
            self.stopped = True
            self.warn_once(f"colour map stopped at step {clock.step + 1}: with these colours, strength and "
                           f"{values['cm_stop']} steps the latent grew past {GROWTH_LIMIT:g}x (the reference would end "
                           "in a black or NaN image); lower the colours, the colour map strength or its steps")
            return None
        return pushed - stacked

    def after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor | None) -> torch.Tensor | None:
        """Forward hook: the push's correction and, at its step, the latent shift."""
        correction = self.corrections.pop() if self.corrections else None
        if out is None:  # the forward raised
            return None
        shift = self._shift(out, args, kwargs)
        if shift is not None:
            correction = shift if correction is None else correction + shift
        return None if correction is None else out + correction.to(out.dtype)

    def _shift(self, out: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        ctx, clock = self.ctx, self.clock
        if self.shift is None or clock.step != shift_step(self.shift, ctx.hires, ctx.hires_planned, clock.total_steps):
            return None
        sigma = self.sigmas(out, _call_inputs(args, kwargs)[1])
        if sigma is None:
            return None
        c_out = denoiser_scalings(sigma, self.prediction)[1]
        return -torch.tensor(self.shift, dtype=torch.float64, device=out.device).view(1, -1, 1, 1) / c_out


def _apply_saturation(ctx: Any, values: dict[str, Any]) -> None:
    if not (values["sat"] or values["sat2"]):
        return
    decoder = getattr(ctx.vae, "decoder", None)
    if decoder is None:
        ctx.warn("saturation needs the VAE decoder, which the host did not give; skipped")
        return
    modules = dict(decoder.named_modules())
    for keys, factor in ((SAT_KEYS, 1 + 0.075 * values["sat"]), (SAT2_KEYS, 1 + 0.02 * values["sat2"])):
        if factor == 1:
            continue
        missing = [k for k in keys if not isinstance(modules.get(k), nn.Conv2d)]
        if missing:
            ctx.warn(f"the VAE decoder has no {', '.join(missing)}; those are not scaled")
        for key in keys:
            if key not in missing:
                hook = _scale_weight_hook(factor)
                ctx.patcher.add_handle(modules[key].register_forward_hook(hook), ctx.technique)


def _scale_weight_hook(factor: float) -> Callable[..., torch.Tensor]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return rescale_affine(out, module.bias, factor, 1.0)
    return hook
