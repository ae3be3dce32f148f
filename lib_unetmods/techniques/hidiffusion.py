"""HiDiffusion (Zhang et al., ECCV 2024; megvii-research/HiDiffusion): RAU-Net and MSW-MSA.

RAU-Net keeps the deep features near the training size during the early steps: a Downsample conv
run with stride 4 / padding 2 / dilation 2 (RAD) paired with an Upsample that goes straight to the
next skip's size (RAU), and an avg-pool after an encoder block paired with a bicubic enlarge after
its mirror decoder block. MSW-MSA runs the self-attention of the shallowest attention level in a
2x2 window grid with a random shift.

Clock: the reference counts calls per module and switches at T = int(N * ratio); here every window
is int(ratio * N) in sampler steps (`StepClock.step_of`), so second-order samplers and split
cond/uncond batches do not shift it. The shift k is drawn per sampler step and layer from a private
generator seeded by (image seed, pass, step, layer): every UNet call of a step, and cond and uncond
rows, see the same windows, and the global RNG is never touched (the reference draws torch.rand(1)
per block call).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..clock import covers_no_step
from ..families import SD1, SD2, SDXL, ByFamily, layout, native_side
from ..forward import Refused, UNetCall
from ..params import Param, TechniqueSpec, first_pass_or_hires_box
from ..patcher import current_forward
from ..unet_map import AttentionLayer, UNetMap

AGGRESSIVE_STEP = 8  # of 50: the reference's aggressive_step
# (RAD/RAU pair, pooled pair) as (input block, mirrored output block), reference §3.2
SMALL_SIDE = {SD1: 256, SD2: 256, SDXL: 512}  # latent side below which the table is gentler
DEFAULT_BLOCKS = ByFamily({SD1: ((3, 8), (4, 7)), SD2: ((3, 8), (4, 7)), SDXL: ((6, 2), (4, 4))})
RAU_PAIRS = ("auto", "3/8", "6/5", "9/2", "3/5", "6/2")
POOL_PAIRS = ("auto", "1/10", "2/9", "4/7", "5/6", "7/4", "8/3", "10/1", "11/0", "1/7", "2/6", "4/4", "5/3", "7/1", "8/0")
UPSCALE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
STATE_KEY = "hidiffusion"

SPEC = TechniqueSpec(
    id="hidiffusion",
    title="HiDiffusion",
    description="Generate above the training resolution without duplicated subjects, faster: RAU-Net shrinks the deep "
                "features in the early steps, MSW-MSA windows the full-resolution self-attention.",
    params=(
        Param("enabled", "bool", False, "HiDiffusion", "Enable HiDiffusion."),
        Param("rau_net", "bool", True, "RAU-Net",
              "Resolution-aware downsampler/upsampler: the deep blocks run at about the training size in the early steps "
              "(against duplicated subjects; faster)."),
        Param("msw_msa", "bool", True, "MSW-MSA",
              "Shifted-window self-attention at the highest-resolution attention level (2x2 windows, random shift): faster, "
              "at every step."),
        Param("auto", "bool", True, "Automatic schedule",
              "T1, T2 and aggressive from the reference table by model and size: SD1/SD2 T1 0.4 below 2048 px on a side, "
              "else T1 0.7 and T2 0.3; SDXL T1 0.4 aggressive below 4096 px, else 0.7 / 0.3. RAU-Net stays off at or "
              "below the model's native size."),
        Param("t1", "float", 0.4, "T1 ratio",
              "Main RAU-Net stage (SD1/SD2: RAD/RAU pair; SDXL: pooled pair) runs for this ratio of the steps. Higher "
              "fights duplication more. Used when the automatic schedule is off.", 0.0, 1.0, 0.01),
        Param("t2", "float", 0.0, "T2 ratio",
              "Extra stage for extreme sizes (SD1/SD2: pooled pair; SDXL: RAD/RAU pair) runs for this ratio of the steps. "
              "Used when the automatic schedule is off.", 0.0, 1.0, 0.01),
        Param("aggressive", "bool", False, "Aggressive",
              "The RAD/RAU pair for the first 8/50 of the steps, then the pooled pair until T1 (the reference's SDXL mode "
              "below 4096 px). Used when the automatic schedule is off."),
        Param("hires", "bool", False, "Apply in hires pass",
              "Also apply HiDiffusion in the hires-fix second pass, on that pass's size and steps."),
        Param("rau_blocks", "choice", "auto", "RAD/RAU blocks (input/output)",
              "Input block whose Downsample runs as RAD, and the mirrored output block whose Upsample is the RAU. auto: "
              "3/8 for SD1/SD2, 6/2 for SDXL. Valid: 3/8, 6/5, 9/2 (SD1/SD2); 3/5, 6/2 (SDXL).",
              choices=RAU_PAIRS, advanced=True),
        Param("custom_windows", "bool", False, "Custom windows",
              "Run the RAD/RAU pair on [start, end) and the pooled pair on [pool start, pool end) instead of T1/T2.",
              advanced=True),
        Param("start", "float", 0.0, "RAD/RAU start", "Ratio of the steps where the RAD/RAU pair starts (custom windows).",
              0.0, 1.0, 0.01, advanced=True),
        Param("end", "float", 0.4, "RAD/RAU end", "Ratio of the steps where the RAD/RAU pair ends (custom windows).",
              0.0, 1.0, 0.01, advanced=True),
        Param("upscale_mode", "choice", "nearest", "RAU upscale mode",
              "Interpolation of the RAU before its conv (the reference: nearest).", choices=UPSCALE_MODES, advanced=True),
        Param("pool_blocks", "choice", "auto", "Pooled pair blocks (input/output)",
              "Input block whose output is avg-pooled before it becomes a skip, and the mirrored output block after which "
              "it is enlarged back. auto: 4/7 for SD1/SD2, 4/4 for SDXL.", choices=POOL_PAIRS, advanced=True),
        Param("pool_start", "float", 0.0, "Pooled pair start", "Ratio of the steps where the pooled pair starts (custom windows).",
              0.0, 1.0, 0.01, advanced=True),
        Param("pool_end", "float", 0.0, "Pooled pair end", "Ratio of the steps where the pooled pair ends (custom windows).",
              0.0, 1.0, 0.01, advanced=True),
        Param("pool_upscale_mode", "choice", "bicubic", "Pooled pair upscale mode",
              "Interpolation that enlarges the pooled features back (the reference: bicubic).", choices=UPSCALE_MODES,
              advanced=True),
        Param("msw_start", "float", 0.0, "MSW-MSA start", "Ratio of the steps where MSW-MSA starts.", 0.0, 1.0, 0.01,
              advanced=True),
        Param("msw_end", "float", 1.0, "MSW-MSA end", "Ratio of the steps where MSW-MSA ends.", 0.0, 1.0, 0.01,
              advanced=True),
    ),
    recommended={fam: {"rau_net": True, "msw_msa": True, "auto": True} for fam in (SD1, SD2, SDXL)},
)


# --- schedule ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """Step windows [start, end) of the two RAU-Net stages for one pass."""

    rad: tuple[int, int]
    pool: tuple[int, int]

    def active(self, step: int) -> tuple[bool, bool]:
        return self.rad[0] <= step < self.rad[1], self.pool[0] <= step < self.pool[1]


def table_ratios(family: str, height: int, width: int, inpainting: bool = False) -> tuple[float, float, bool]:
    """(T1, T2, aggressive) of the reference's table for a latent of height x width (a derived
    family's threshold scales with its native side)."""
    lay = layout(family)
    small = SMALL_SIDE[lay] * native_side(family) // native_side(lay)
    if lay == SDXL:
        if height < small or width < small:
            return 0.4, 0.0, not inpainting
        return 0.7, 0.3, False
    if height < small or width < small:
        return 0.4, 0.0, False
    return 0.7, 0.3, False


def schedule(family: str, values: dict[str, Any], height: int, width: int, total_steps: int,
             inpainting: bool = False) -> Schedule:
    n = total_steps
    if values["custom_windows"]:
        return Schedule((int(values["start"] * n), int(values["end"] * n)),
                        (int(values["pool_start"] * n), int(values["pool_end"] * n)))
    if values["auto"]:
        if height * width <= native_side(family) ** 2:
            return Schedule((0, 0), (0, 0))
        t1, t2, aggressive = table_ratios(family, height, width, inpainting)
    else:
        t1, t2, aggressive = values["t1"], values["t2"], values["aggressive"]
    if aggressive:
        switch = int(AGGRESSIVE_STEP / 50 * n)
        return Schedule((0, switch), (switch, int(n * t1)))
    rad_ratio, pool_ratio = (t2, t1) if layout(family) == SDXL else (t1, t2)
    return Schedule((0, int(n * rad_ratio)), (0, int(n * pool_ratio)))


def is_inpainting(unet: Any) -> bool:
    """An inpainting UNet (9 input channels) takes the reference table's inpainting column."""
    return getattr(unet, "in_channels", 4) == 9


def pass_schedule(family: str, values: dict[str, Any], hw: tuple[int, int], total_steps: int,
                  unet: Any = None) -> Schedule:
    """RAU-Net's windows for a latent of hw (height, width) in a pass of total_steps: the one call
    the run (per UNet call), the composition rules and the schedule preview all make."""
    return schedule(family, values, int(hw[0]), int(hw[1]), total_steps, is_inpainting(unet))


def msw_active(values: dict[str, Any], clock: Any) -> bool:
    return clock.in_window(values["msw_start"], values["msw_end"])


runs_in_pass = first_pass_or_hires_box


def rau_idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    """Why RAU-Net has nothing to do in this pass (None: it acts or may act)."""
    if not values["rau_net"]:
        return "RAU-Net is off"
    if umap is not None:  # blocks that do not fit raise Refused, as the run does
        rau_pair(umap, values["rau_blocks"]), pool_pair(umap, values["pool_blocks"])
    if where.hw is None or where.clock is None:
        return None
    family = umap.family if umap is not None else where.family
    sched = pass_schedule(family, values, where.hw, where.clock.total_steps, umap.unet if umap is not None else None)
    covered = any(end > start for start, end in (sched.rad, sched.pool))
    h, w = where.hw
    if not covered and values["auto"] and not values["custom_windows"] and h * w <= native_side(family) ** 2:
        return f"RAU-Net is not needed at {w * 8}x{h * 8} (at or below the native size)"
    return covers_no_step(where.clock, lambda clock: covered, "RAU-Net's windows")


def msw_idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    if not values["msw_msa"]:
        return "MSW-MSA is off"
    return covers_no_step(where.clock, lambda clock: clock.window_steps(values["msw_start"], values["msw_end"]),
                          "MSW-MSA's window")


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    if umap is not None and umap.family not in DEFAULT_BLOCKS:
        raise Refused(f"no HiDiffusion layout for the {umap.family} UNet")
    msw = msw_idle(values, umap, where)
    try:
        rau = rau_idle(values, umap, where)
    except Refused:
        if msw is not None:  # nothing else would run: skipped with RAU-Net's reason
            raise
        return None  # MSW-MSA runs; RAU-Net is skipped with its message when applied
    if rau is not None and msw is not None:
        return "RAU-Net and MSW-MSA are both off" if not (values["rau_net"] or values["msw_msa"]) else f"{rau}; {msw}"
    return None


# --- RAU-Net operators -----------------------------------------------------------------------

def rad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The Downsample conv with stride 4, padding 2, dilation 2 (output ceil(H/4)); it runs the
    conv's own forward, so a class-level Conv2d.forward (the WebUI's LoRA) still applies."""
    saved = conv.stride, conv.padding, conv.dilation
    conv.stride, conv.padding, conv.dilation = (4, 4), (2, 2), (2, 2)
    try:
        return conv(x)
    finally:
        conv.stride, conv.padding, conv.dilation = saved


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=tuple(size), mode=mode, **extra)


def upsample_to(upsample: nn.Module, x: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """ldm's Upsample with a target size: interpolate to `size`, then its conv."""
    x = resize(x, size, mode)
    return upsample.conv(x) if upsample.use_conv else x


def pool(h: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(h, kernel_size=2, ceil_mode=True)


# --- MSW-MSA operators ------------------------------------------------------------------------

def window_size(height: int, width: int) -> tuple[int, int]:
    return math.ceil(height / 2), math.ceil(width / 2)


def shift_of(k: int, height: int, width: int) -> tuple[int, int]:
    """The reference's shift set: k * (window // 4) per axis, k in 0..3."""
    wh, ww = window_size(height, width)
    return k * (wh // 4), k * (ww // 4)


def shift_index(seed: int, hires: bool, step: int, layer: int) -> int:
    """k for one layer in one sampler step, from a private generator (never the global RNG)."""
    return random.Random(f"hidiffusion/{seed}/{int(hires)}/{step}/{layer}").randrange(4)


def partition(x: torch.Tensor, height: int, width: int, shift: tuple[int, int]) -> list[torch.Tensor]:
    """Tokens (B, H*W, C) -> the four windows of the 2x2 grid, row-major, each (B, h_i*w_j, C),
    after rolling the map by -shift. Odd sides give windows of ceil and floor size."""
    b, _, c = x.shape
    grid = x.view(b, height, width, c)
    if any(shift):
        grid = torch.roll(grid, (-shift[0], -shift[1]), (1, 2))
    wh, ww = window_size(height, width)
    return [q.reshape(b, -1, c) for rows in grid.split(wh, 1) for q in rows.split(ww, 2)]


def reverse(windows: list[torch.Tensor], height: int, width: int, shift: tuple[int, int]) -> torch.Tensor:
    """Inverse of `partition`."""
    b, _, c = windows[0].shape
    wh, ww = window_size(height, width)
    rows = [torch.cat([windows[2 * i].view(b, hi, ww, c), windows[2 * i + 1].view(b, hi, width - ww, c)], 2)
            for i, hi in enumerate((wh, height - wh))]
    grid = torch.cat(rows, 1)
    if any(shift):
        grid = torch.roll(grid, shift, (1, 2))
    return grid.reshape(b, height * width, c)


def window_attention(attn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, height: int, width: int,
                     shift: tuple[int, int]) -> torch.Tensor:
    """Self-attention of x (B, H*W, C) inside each window; equal windows share one batched call."""
    windows = partition(x, height, width, shift)
    if height % 2 == 0 and width % 2 == 0:
        out = list(attn(torch.cat(windows)).chunk(4))
    else:
        out = [attn(w) for w in windows]
    return reverse(out, height, width, shift)


# --- layer choices ---------------------------------------------------------------------------

def _pair(choice: str, default: tuple[int, int]) -> tuple[int, int]:
    if choice == "auto":
        return default
    a, b = choice.split("/")
    return int(a), int(b)


def rau_pair(umap: UNetMap, choice: str) -> tuple[int, int]:
    d, o = _pair(choice, DEFAULT_BLOCKS[umap.family][0])
    n = len(umap.inputs)
    valid = [f"{b.index}/{n - 1 - b.index}" for b in umap.inputs if b.level_out > b.level_in]
    if f"{d}/{o}" not in valid:
        raise Refused(f"RAD/RAU blocks {d}/{o} do not fit this {umap.family} UNet; valid: {', '.join(valid)}")
    return d, o


def pool_pair(umap: UNetMap, choice: str) -> tuple[int, int]:
    i, o = _pair(choice, DEFAULT_BLOCKS[umap.family][1])
    n = len(umap.inputs)
    valid = [f"{b.index}/{n - 1 - b.index}" for b in umap.inputs[1:] if b.level_out == b.level_in]
    if f"{i}/{o}" not in valid:
        raise Refused(f"pooled pair blocks {i}/{o} do not fit this {umap.family} UNet; valid: {', '.join(valid)}")
    return i, o


def msw_layers(umap: UNetMap) -> list[AttentionLayer]:
    """Self-attention of the highest-resolution level that has attention: SD1/SD2 input 1, 2 and
    output 9-11 (level 0); SDXL input 4, 5 and output 3-5, both transformer blocks (level 1)."""
    layers = umap.self_attention()
    if not layers:
        return []
    level = min(a.level for a in layers)
    return [a for a in layers if a.level == level]


def msw_level(umap: UNetMap) -> int | None:
    layers = msw_layers(umap)
    return layers[0].level if layers else None


def _child(module: nn.Module, type_name: str) -> nn.Module:
    return next(m for m in module.modules() if type(m).__name__ == type_name)


def _spatial_transformer(layer: AttentionLayer) -> nn.Module:
    return next(m for m in layer.block.module.modules()
                if any(t is layer.transformer for t in getattr(m, "transformer_blocks", ())))


# --- wiring ----------------------------------------------------------------------------------

def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    if ctx.map.family not in DEFAULT_BLOCKS:
        raise Refused(f"no HiDiffusion layout for the {ctx.map.family} UNet")
    if not (values["rau_net"] or values["msw_msa"]):
        ctx.warn("RAU-Net and MSW-MSA are both off; nothing to do")
        return
    if values["rau_net"]:
        try:
            with ctx.patcher.transaction():
                _apply_rau_net(ctx, values)
        except Refused as e:
            if not values["msw_msa"]:
                raise
            ctx.warn(f"RAU-Net skipped: {e}")
    if values["msw_msa"] and msw_idle(values, ctx.map, ctx.pass_info) is None:
        _apply_msw_msa(ctx, values)


def _apply_rau_net(ctx: Any, values: dict[str, Any]) -> None:
    umap, clock, unet = ctx.map, ctx.clock, ctx.unet
    rad_in, rau_out = rau_pair(umap, values["rau_blocks"])
    pool_in, pool_out = pool_pair(umap, values["pool_blocks"])
    if ctx.latent_shape is not None:
        reason = rau_idle(values, umap, ctx.pass_info)
        if reason is not None:
            ctx.warn(reason + ("; only MSW-MSA runs" if values["msw_msa"] else "; nothing to do"))
            return
    current: list[UNetCall | None] = [None]

    def begin(call: UNetCall) -> None:
        sched = pass_schedule(umap.family, values, call.x.shape[-2:], clock.total_steps, unet)
        call.state[STATE_KEY] = sched.active(clock.step)
        current[0] = call

    def drop(*_: Any) -> None:
        current[0] = None  # also when the forward raises: no call's state outlives its forward

    def active() -> tuple[bool, bool]:
        call = current[0]
        return call.state[STATE_KEY] if call is not None else (False, False)

    ctx.hook("begin", begin)
    ctx.patcher.add_handle(unet.register_forward_hook(drop, always_call=True), ctx.technique)

    downsample = _child(unet.input_blocks[rad_in], "Downsample")
    down_forward = current_forward(downsample)

    def rad_forward(x: torch.Tensor) -> torch.Tensor:
        return rad(downsample.op, x) if active()[0] else down_forward(x)

    ctx.patcher.set_attr(downsample, "forward", rad_forward, ctx.technique)

    # Every Upsample goes to the next skip's exact size (the reference always passes diffusers'
    # upsample_size): shapes close for any latent size, and it is the plain x2 where sizes are standard.
    for i, block in enumerate(unet.output_blocks):
        if any(type(m).__name__ == "Upsample" for m in block.modules()):
            _wrap_upsample(ctx, _child(block, "Upsample"), i == rau_out, values["upscale_mode"], current, active)

    def pool_after_input(i: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor:
        if i != pool_in or not call.state[STATE_KEY][1]:
            return h
        call.state["hidiffusion_pool_size"] = tuple(h.shape[-2:])
        return pool(h)

    def enlarge_after_output(i: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor:
        size = call.state.pop("hidiffusion_pool_size", None) if i == pool_out else None
        return h if size is None else resize(h, size, values["pool_upscale_mode"])

    ctx.hook("after_input", pool_after_input)
    ctx.hook("after_output", enlarge_after_output)


def _wrap_upsample(ctx: Any, upsample: nn.Module, is_rau: bool, mode: str, current: list[UNetCall | None],
                   active: Callable[[], tuple[bool, bool]]) -> None:
    previous = current_forward(upsample)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # Forge passes output_shape
        call = current[0]
        size = call.next_skip_size if call is not None else None
        if size is None:
            return previous(x, *args, **kwargs)
        use = mode if is_rau and active()[0] else "nearest"
        if use == "nearest" and tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1]):
            return previous(x, *args, **kwargs)
        return upsample_to(upsample, x, size, use)

    ctx.patcher.set_attr(upsample, "forward", forward, ctx.technique)


def _apply_msw_msa(ctx: Any, values: dict[str, Any]) -> None:
    clock, seed = ctx.clock, ctx.seed
    sizes: dict[int, tuple[int, int]] = {}

    def record_size(module: nn.Module, args: tuple[Any, ...]) -> None:
        sizes[id(module)] = tuple(args[0].shape[-2:])

    hooked: set[int] = set()
    messages = ctx.messages  # reported again after the pass (host.finish_pass)

    def yielded() -> None:
        message = (f"{SPEC.title}: another extension gives self-attention a context (e.g. a Forge attn1_patch): "
                   "MSW-MSA yields to it on those calls")
        if message not in messages:
            messages.append(message)

    for index, layer in enumerate(msw_layers(ctx.map)):
        attn = layer.module
        if "forward" in attn.__dict__:
            ctx.warn(f"MSW-MSA skipped on {layer.name}: its attention is already wrapped (HyperTile, ToMe or another extension)")
            continue
        transformer = _spatial_transformer(layer)
        if id(transformer) not in hooked:
            ctx.patcher.add_handle(transformer.register_forward_pre_hook(record_size), ctx.technique)
            hooked.add(id(transformer))
        forward = _msw_forward(attn, index, lambda t=transformer: sizes.get(id(t)), clock, seed, values, yielded)
        ctx.patcher.set_attr(attn, "forward", forward, ctx.technique)


def _msw_forward(attn: nn.Module, index: int, size: Callable[[], tuple[int, int] | None], clock: Any, seed: int,
                 values: dict[str, Any], yielded: Callable[[], None] = lambda: None) -> Callable[..., torch.Tensor]:
    def own(x: torch.Tensor, context: Any = None, mask: Any = None, **kwargs: Any) -> torch.Tensor:
        return type(attn).forward(attn, x, context=context, mask=mask, **kwargs)  # the host's attention kernel

    def forward(x: torch.Tensor, context: Any = None, mask: Any = None, **kwargs: Any) -> torch.Tensor:
        hw = size()
        if context is not None:
            yielded()
        if (context is not None or mask is not None or hw is None or min(hw) < 2
                or x.shape[1] != hw[0] * hw[1] or not msw_active(values, clock)):
            return own(x, context, mask, **kwargs)  # merged tokens (ToMe), cross-attention or outside the window
        shift = shift_of(shift_index(seed, clock.hires, clock.step, index), *hw)
        return window_attention(lambda t: own(t, **kwargs), x, hw[0], hw[1], shift)

    return forward
