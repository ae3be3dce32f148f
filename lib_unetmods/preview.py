"""The schedule preview: per pass and technique, what happens at each sampler step.

Every decision comes from the technique modules' own schedule functions (the ones their hooks
call), evaluated on a StepClock set to each step, so the preview cannot drift from what runs.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .acts import PassInfo, idle_reason
from .clock import StepClock
from .composition import resolve_conflicts
from .forward import Refused
from .params import NOT_THIS_PASS
from .schedules import pass_steps
from .settings import Settings
from .families import SD1, title
from .techniques import SPECS, cdtuner, deepcache, deepshrink, freeu, hidiffusion, hypertile, pag, scalecrafter, todo, tome
from .unet_map import UNetMap



@dataclass(frozen=True)
class Image:
    """The WebUI's generation controls the schedules depend on."""

    steps: int = 20
    width: int = 512
    height: int = 512
    hires: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_steps: int = 0  # 0 = as many as the first pass
    img2img: bool = False
    denoising: float = 0.75  # img2img: the first pass runs int(denoising * steps) + 1 steps

    def hires_size(self) -> tuple[int, int]:
        """(width, height) of the hires pass, as the WebUI computes its target size."""
        x, y = self.hr_resize_x, self.hr_resize_y
        if not x and not y:
            return int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        if not y:
            return x, x * self.height // self.width
        if not x:
            return y * self.width // self.height, y
        return x, y


@dataclass(frozen=True)
class Cell:
    kind: str  # css class: "off" (not acting), "on", "full", "cheap", "dilate", "shrink"
    text: str = ""
    tip: str = ""  # the tooltip's words for the cell (default: its text)


@dataclass
class Row:
    technique: str  # technique id
    label: str
    cells: list[Cell]
    note: str = ""

    @property
    def acting(self) -> int:
        return sum(c.kind not in ("off", "full") for c in self.cells)


@dataclass
class Pass:
    name: str  # "first pass" | "hires pass"
    steps: int
    width: int
    height: int
    rows: list[Row] = field(default_factory=list)


@dataclass
class Preview:
    family: str
    passes: list[Pass]
    notes: list[str]


def _clocks(total: int, hires: bool) -> list[StepClock]:
    clocks = []
    for step in range(total):
        clock = StepClock()
        clock.start(total, hires)
        clock.begin_step(step)
        clocks.append(clock)
    return clocks


def _flag(on: bool, kind: str = "on", text: str = "") -> Cell:
    return Cell(kind, text) if on else Cell("off")


def _tome(v: dict[str, Any], clocks: list[StepClock], hires: bool, **_: Any) -> list[Row]:
    ratio = tome.pass_ratio(v, hires)
    if ratio <= 0:
        return []
    if not any(v[flag] for flag, _ in tome.SITES):
        return [Row("tome", "ToMe", [Cell("off") for _ in clocks], "no merging site left on: nothing to do")]
    return [Row("tome", "ToMe", [_flag(c.in_window(v["start"], v["end"])) for c in clocks], f"ratio {ratio:g}")]


def _hypertile(v: dict[str, Any], clocks: list[StepClock], hires: bool, **_: Any) -> list[Row]:
    if not hypertile.runs_in_pass(v, hires):
        return []
    return [Row("hypertile", "HyperTile", [Cell("on") for _ in clocks], f"depth <= {v['max_depth']}")]


def _deepcache(v: dict[str, Any], clocks: list[StepClock], hires: bool, **_: Any) -> list[Row]:
    if not deepcache.runs_in_pass(v, hires):
        return []
    full, problem = deepcache.pass_plan(v, len(clocks))
    cells = [Cell("cheap", "·", "cached") if deepcache.is_cheap(v, c, full) else Cell("full", "F", "full") for c in clocks]
    cheap = sum(c.kind == "cheap" for c in cells)
    note = f"{len(cells) - cheap} full, {cheap} cheap" + (f" ({problem})" if problem else "")
    return [Row("deepcache", "DeepCache", cells, note)]


def _scalecrafter(v: dict[str, Any], clocks: list[StepClock], hires: bool, umap: UNetMap | None,
                  latent: tuple[int, int], family: str, **_: Any) -> list[Row]:
    if not scalecrafter.runs_in_pass(v, hires):
        return []
    if umap is None:
        return [Row("scalecrafter", "ScaleCrafter", [Cell("off") for _ in clocks], "load a model to see its dilations")]
    native = scalecrafter.native_size(family, v)
    convs = scalecrafter.conv_names(umap)
    plan = scalecrafter.plan_for(umap, v, latent, convs)
    if not plan.active:
        return [Row("scalecrafter", "ScaleCrafter", [Cell("off") for _ in clocks],
                    f"not above the native {native}x{native} pixel count: nothing to do")]
    level_of = {name: level for name, _, level in umap.convs3x3 if name in convs}
    rows = []
    for level in range(umap.num_levels):
        cells = []
        for c in clocks:
            factors = scalecrafter.step_factors(plan, c.step, c.total_steps)
            s = max((s for name, (s, _) in factors.items() if level_of[name] == level), default=1.0)
            cells.append(Cell("dilate", f"{s:g}", f"dilation {s:g}") if s > 1 else Cell("off"))
        if any(cell.kind != "off" for cell in cells):
            rows.append(Row("scalecrafter", f"ScaleCrafter L{level}", cells, f"dilation at level {level}"))
    if plan.ndcfg is not None:
        rows.append(Row("scalecrafter", "ScaleCrafter NDCFG",
                        [_flag(scalecrafter.ndcfg_active(plan, c.step, c.total_steps)) for c in clocks],
                        "noise-damped CFG (+1 UNet pass)"))
    return rows


def _deepshrink(v: dict[str, Any], clocks: list[StepClock], hires: bool, **_: Any) -> list[Row]:
    if not deepshrink.runs_in_pass(v, hires):
        return []
    windows = deepshrink.windows_of(v)
    cells = []
    for c in clocks:
        window = deepshrink.active_window(windows, c)
        if window is None:
            cells.append(Cell("off"))
        else:
            f = deepshrink.step_factor(v, window, c)
            cells.append(Cell("shrink", f"{f:.2g}", f"block {window.block} shrunk by {f:.3g}"))
    blocks = " then ".join(f"block {w.block}" for w in windows)
    return [Row("deepshrink", "Deep Shrink", cells, f"{blocks}, factor {v['factor']:g}")]


def _hidiffusion(v: dict[str, Any], clocks: list[StepClock], hires: bool, latent: tuple[int, int], family: str,
                 umap: UNetMap | None, **_: Any) -> list[Row]:
    if not hidiffusion.runs_in_pass(v, hires) or family not in hidiffusion.DEFAULT_BLOCKS:
        return []
    rows = []
    if v["rau_net"]:
        sched = hidiffusion.pass_schedule(family, v, latent, len(clocks), umap.unet if umap is not None else None)
        active = [sched.active(c.step) for c in clocks]
        rows.append(Row("hidiffusion", "RAU-Net RAD/RAU", [_flag(a[0]) for a in active], "stride-4 downsample pair"))
        rows.append(Row("hidiffusion", "RAU-Net pool", [_flag(a[1]) for a in active], "pooled pair"))
    if v["msw_msa"]:
        rows.append(Row("hidiffusion", "MSW-MSA", [_flag(hidiffusion.msw_active(v, c)) for c in clocks], "shifted windows"))
    return rows


def _freeu(v: dict[str, Any], clocks: list[StepClock], hires: bool, **_: Any) -> list[Row]:
    if not freeu.runs_in_pass(v, hires):
        return []
    window = freeu.pass_window(v, hires)
    cells = []
    for c in clocks:
        ratio = freeu.step_ratio(v, window, c)
        cells.append(_flag(ratio > 0, "on", "" if ratio >= 1 else f"{ratio:.1f}"))
    return [Row("freeu", "FreeU", cells, f"{v['version']}")]


def _cdtuner(v: dict[str, Any], clocks: list[StepClock], hires: bool, family: str, hires_planned: bool,
             **_: Any) -> list[Row]:
    rows = []
    detail = any(cdtuner.pass_detail(v[n], v["h" + n], hires, False, 1.0) for n in ("d1", "d2")) or v["con1"]
    if detail:
        start, stop = cdtuner.pass_window(v, hires)
        rows.append(Row("cdtuner", "CD Tuner detail",
                        [_flag(cdtuner.in_window(c.step, c.total_steps, start, stop)) for c in clocks], "detail / contrast"))
    shift_at = cdtuner.shift_step(cdtuner.latent_shift(v, family), hires, hires_planned, len(clocks))
    if shift_at is not None:
        rows.append(Row("cdtuner", "CD Tuner shift", [_flag(c.step == shift_at) for c in clocks], "latent shift"))
    return rows


def _todo(v: dict[str, Any], clocks: list[StepClock], hires: bool, family: str, **_: Any) -> list[Row]:
    if not todo.runs_in_pass(v, hires):
        return []
    factor = todo.pass_factor(v, hires)
    depth = todo.resolve_max_depth(v["max_depth"], family)
    cells = [_flag(factor > 1 and c.in_window(v["start"], v["end"])) for c in clocks]
    return [Row("todo", "ToDo", cells, f"factor {factor:g}, depth <= {depth}" if factor > 1 else "factor 1: nothing to do")]


def _pag(v: dict[str, Any], clocks: list[StepClock], hires: bool, **_: Any) -> list[Row]:
    if not pag.runs_in_pass(v, hires):
        return []
    cells = [_flag(v["scale"] > 0 and c.in_window(v["start"], v["end"])) for c in clocks]
    adaptive = f", adaptive {v['adaptive']:g}" if v["adaptive"] else ""
    return [Row("pag", "PAG", cells, f"scale {v['scale']:g} on {v['layers']}{adaptive} (+1 cond pass)")]


ROWS = {"tome": _tome, "todo": _todo, "pag": _pag, "hypertile": _hypertile, "deepcache": _deepcache, "scalecrafter": _scalecrafter,
        "deepshrink": _deepshrink, "hidiffusion": _hidiffusion, "freeu": _freeu, "cdtuner": _cdtuner}


def compute(settings: Settings, image: Image, family: str | None, umap: UNetMap | None = None) -> Preview:
    """The preview of `settings` for `image` on a model of `family` (its UNet map where known:
    needed for ScaleCrafter's convs and the composition rules). Per pass, the composition rules
    and each technique's idle() decide as they do in the run (acts.py): a technique with nothing
    to do shows an empty row with the reason."""
    notes: list[str] = []
    if umap is not None:
        family = umap.family
    if not family:
        family = SD1
        notes.append("no model loaded: SD1 assumed")
    base = settings.with_family_values(family) if umap is not None else settings
    p = SimpleNamespace(steps=image.steps, hr_second_pass_steps=image.hr_steps, denoising_strength=image.denoising,
                        init_images=[None] if image.img2img else None)
    sizes = [(False, image.width, image.height)]
    if image.hires and not image.img2img:
        sizes.append((True, *image.hires_size()))
    passes = []
    for hires, width, height in sizes:
        total = pass_steps(p, hires)
        clocks = _clocks(total, hires)
        latent = (height // 8, width // 8)
        where = PassInfo(clocks[0], (1, 4, *latent), family)
        resolved = base
        if umap is not None:
            resolved, rule_notes = resolve_conflicts(base, umap, where)
            notes += [n for n in rule_notes if n not in notes]
        info = Pass("hires pass" if hires else "first pass", total, width, height)
        for tid in resolved.enabled_ids():  # a technique a rule switched off: the rule's note says so
            values = resolved[tid]
            try:
                reason = idle_reason(tid, values, umap, where)
            except Refused as e:
                reason = f"skipped: {e}"
            if reason == NOT_THIS_PASS:
                continue
            if reason is not None:
                info.rows.append(Row(tid, SPECS[tid].title, [Cell("off") for _ in clocks], f"{reason}: nothing to do"))
                continue
            info.rows += ROWS[tid](values, clocks, hires, umap=umap, latent=latent, family=family,
                                   hires_planned=len(sizes) > 1)
        passes.append(info)
    return Preview(family, passes, notes)


# --- HTML ------------------------------------------------------------------------------------

def _cell_html(cell: Cell, step: int) -> str:
    tip = cell.tip or cell.text or ("acting" if cell.kind != "off" else "")
    title = f"step {step + 1}" + (f": {tip}" if tip else "")
    return f'<i class="um-{cell.kind}" title="{html.escape(title)}">{html.escape(cell.text)}</i>'


def render(preview: Preview) -> str:
    enabled = any(p.rows for p in preview.passes)
    out = [f'<div class="unetmods-preview" data-family="{preview.family}">']
    if not enabled:
        out.append('<div class="um-empty">No technique acts: tick one above to see its schedule.</div>')
    for p in preview.passes:
        out.append(f'<div class="um-pass" data-pass="{p.name}" data-steps="{p.steps}">'
                   f'<div class="um-pass-title">{p.name.capitalize()}: {p.steps} steps, {p.width}x{p.height}, '
                   f'{title(preview.family)}</div>')
        for row in p.rows:
            cells = "".join(_cell_html(c, i) for i, c in enumerate(row.cells))
            out.append(f'<div class="um-row" data-technique="{row.technique}" data-label="{html.escape(row.label)}" '
                       f'data-acting="{row.acting}"><span class="um-label">{html.escape(row.label)}</span>'
                       f'<span class="um-steps">{cells}</span><span class="um-note">{html.escape(row.note)}</span></div>')
        out.append("</div>")
    out += [f'<div class="um-rule">{html.escape(n)}</div>' for n in preview.notes]
    out.append('<div class="um-legend"><i class="um-on"></i>acting <i class="um-full">F</i>full step '
               '<i class="um-cheap">·</i>cached step <i class="um-dilate"></i>dilation '
               '<i class="um-shrink"></i>shrink factor</div></div>')
    return "".join(out)


def summary(settings: Settings) -> str:
    """One line naming the techniques that are on."""
    on = [SPECS[tid].title for tid in settings.enabled_ids()]
    return f"On: {', '.join(on)}" if on else "All techniques off"
