"""Token Downsampling (ToDo; Smith et al. 2024, ethansmith2000/ImprovedTokenMerge, the A1111 extension
feffy380/sd-webui-token-downsampling): self-attention (attn1) keeps every query, but its keys and
values are computed from the tokens downsampled on their spatial grid by `factor` (nearest
neighbour by default). No similarity search, so none of ToMe's matching cost; the attention
matrix shrinks by factor**2.

As the references do it: the downsampled tokens are the attention's `context` (keys and values
come from them through the layer's own to_k / to_v, which are token-wise, so this equals
downsampling after the projections); a layer acts when its downsampling below the latent,
ceil(sqrt(HW // N)), is at most 2**(max_depth - 1); the new side is int(side / factor).
"Disable after" is the end of the step window (the A1111 extension: active while step < int(d * steps)).

Differences from the references, none of which changes the result where they run:
- the grid of a layer is the one the stride-2 convs give (ceil sizes), as the A1111 extension's
  current code takes it; the paper's code takes H // 2**k, which cannot reshape the tokens of a
  latent with an odd side (it fails there);
- the window counts sampler steps (the A1111 extension counts UNet calls, so a second-order
  sampler or split cond/uncond calls would end it early);
- nearest and nearest-exact pick the kept tokens with an index gather (the indices are the ones
  torch's interpolate uses, computed once per size) instead of a permute-interpolate-permute copy.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..clock import covers_no_step
from ..families import ByFamily, is_sdxl
from ..params import Param, TechniqueSpec, first_pass_or_hires_box
from ..patcher import current_forward
from ..unet_map import plain_self_attention
from .hypertile import layer_grid

AUTO_MAX_DEPTH = ByFamily({"sd1": 1, "sd2": 1, "sdxl": 2, "sdxl_refiner": 2})  # SDXL has no attention at full resolution
METHODS = ("nearest-exact", "nearest", "bilinear", "bicubic", "area")

SPEC = TechniqueSpec(
    id="todo",
    title="Token Downsampling (ToDo)",
    description="Self-attention keeps every query but takes its keys and values from spatially downsampled "
                "tokens: faster than ToMe at large sizes, with no matching cost.",
    params=(
        Param("enabled", "bool", False, "Token Downsampling (ToDo)", "Enable Token Downsampling (downsampled keys/values in self-attention)."),
        Param("factor", "float", 2.0, "Downsampling factor",
              "Keys and values come from the tokens downsampled by this factor per side (2 = a quarter of the "
              "tokens); 1 does nothing. Recommended 2-3; higher at very large sizes.", 1.0, 5.0, 0.1),
        Param("max_depth", "choice", "auto", "Max depth",
              "Deepest UNet level that is downsampled: 1 = full resolution only, 2 = also 1/2, ... "
              "auto = 1 for SD1/SD2, 2 for SDXL (which has no attention at full resolution).",
              choices=("auto", "1", "2", "3", "4")),
        Param("end", "float", 1.0, "Disable after",
              "Ratio of the steps after which attention runs in full again, for the fine details "
              "(recommended 0.6-0.8; 1 = every step).", 0.0, 1.0, 0.01),
        Param("hires", "bool", True, "Apply in hires pass", "Also downsample in the hires-fix pass."),
        Param("hr_factor", "float", 0.0, "Hires-pass factor (0 = same as first pass)",
              "Downsampling factor for the hires-fix pass; 0 uses the first-pass factor, 1 leaves the hires pass alone.",
              0.0, 5.0, 0.1, advanced=True),
        Param("method", "choice", "nearest-exact", "Downsampling method",
              "How the key/value tokens are downsampled: nearest-exact (the A1111 extension's), nearest (the "
              "paper's code), or the smoother bilinear, bicubic, area.", choices=METHODS, advanced=True),
        Param("start", "float", 0.0, "Start at", "Ratio of the steps where downsampling starts.", 0.0, 1.0, 0.01, advanced=True),
    ),
    presets={
        "quality": {"factor": 2.0, "max_depth": "auto", "end": 0.7},
        "balanced": {"factor": 2.0, "max_depth": "auto", "end": 1.0},
        "fast": {"factor": 3.0, "max_depth": "auto", "end": 1.0},
    },
    recommended={"default": {"factor": 2.0, "max_depth": "auto"}},
)


# --- the math, on plain tensors ----------------------------------------------------------

def resolve_max_depth(choice: str, family: str) -> int:
    return AUTO_MAX_DEPTH.get(family, 1) if choice == "auto" else int(choice)


def layer_downsample(height: int, width: int, tokens: int) -> int:
    """The references' downsampling of a layer below the latent, from its token count."""
    return int(math.ceil(math.sqrt(height * width // tokens))) if tokens <= height * width else 1


def kv_size(h: int, w: int, factor: float) -> tuple[int, int]:
    """Side lengths of the downsampled grid: int(side / factor), at least 1."""
    return max(1, int(h / factor)), max(1, int(w / factor))


@functools.lru_cache(maxsize=256)
def _nearest_index(size: int, new: int, method: str) -> torch.Tensor:
    """The source index of each output position that F.interpolate(mode=method) reads (computed by
    interpolating the positions themselves, so it is torch's own rounding)."""
    positions = torch.arange(size, dtype=torch.float32).view(1, 1, size)
    return F.interpolate(positions, size=new, mode=method).view(-1).long()


def downsample_tokens(x: torch.Tensor, h: int, w: int, size: tuple[int, int], method: str = "nearest-exact") -> torch.Tensor:
    """(B, h*w, C) tokens in row-major grid order -> (B, nh*nw, C) on the downsampled grid,
    equal to reshaping to (B, C, h, w), F.interpolate(size, mode=method) and back."""
    b, n, c = x.shape
    nh, nw = size
    if (nh, nw) == (h, w):
        return x
    grid = x.view(b, h, w, c)
    if method in ("nearest", "nearest-exact"):
        rows = _nearest_index(h, nh, method).to(x.device)
        cols = _nearest_index(w, nw, method).to(x.device)
        return grid.index_select(1, rows).index_select(2, cols).reshape(b, nh * nw, c)
    options = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    out = F.interpolate(grid.permute(0, 3, 1, 2), size=size, mode=method, **options)
    return out.permute(0, 2, 3, 1).reshape(b, nh * nw, c).to(x.dtype)


# --- wiring ------------------------------------------------------------------------------

class _CallState:
    """Latent size and batch of the current UNet call, whether this step is in the window, and what
    the layer calls in the window were: left whole as tiles or windows, downsampled."""

    def __init__(self, clock: Any, start: float, end: float) -> None:
        self.clock, self.start, self.end = clock, start, end
        self.size: tuple[int, int] | None = None
        self.batch = 0
        self.active = False
        self.seen = self.tiled = self.downsampled = 0

    def idle(self) -> str | None:
        """After the pass: why no layer call was downsampled (None when one was, or none came)."""
        if self.downsampled or not self.seen:
            return None
        if self.tiled == self.seen:
            return "every self-attention call it would downsample was cut into tiles or windows (HyperTile, MSW-MSA)"
        return "no self-attention call of this pass had a depth and size it downsamples"

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("x")
        ok = isinstance(x, torch.Tensor) and x.ndim == 4
        self.size = tuple(x.shape[-2:]) if ok else None
        self.batch = x.shape[0] if ok else 0
        self.active = self.clock.in_window(self.start, self.end)


def _downsampled_forward(inner: Callable[..., Any], state: _CallState, factor: float, max_down: int,
                         method: str) -> Callable[..., Any]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not state.active or state.size is None or x.ndim != 3:
            return inner(x, *args, **kwargs)
        state.seen += 1
        # only plain self-attention on the UNet call's own rows: tiles or windows another technique
        # moved into the batch (HyperTile, MSW-MSA) and merged tokens (ToMe) are left whole
        if x.shape[0] != state.batch:
            state.tiled += 1
            return inner(x, *args, **kwargs)
        if not plain_self_attention(args, kwargs):
            return inner(x, *args, **kwargs)
        height, width = state.size
        if layer_downsample(height, width, x.shape[1]) > max_down:
            return inner(x, *args, **kwargs)
        grid = layer_grid(x.shape[1], height, width)
        if grid is None:
            return inner(x, *args, **kwargs)
        size = kv_size(*grid, factor)
        if size == grid:
            return inner(x, *args, **kwargs)
        context = downsample_tokens(x, *grid, size, method)
        state.downsampled += 1
        if args:
            return inner(x, context, *args[1:], **kwargs)
        return inner(x, **{**kwargs, "context": context})

    return forward


def pass_factor(values: dict[str, Any], hires: bool) -> float:
    """The factor of the pass (1 or less: nothing to do)."""
    return (values["hr_factor"] or values["factor"]) if hires else values["factor"]


runs_in_pass = first_pass_or_hires_box


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    clock = where.clock
    factor = max(pass_factor(values, h) for h in ((clock.hires,) if clock is not None else (False, True)))
    if factor <= 1:
        return f"factor {factor:g} downsamples nothing"
    window = covers_no_step(clock, lambda c: c.window_steps(values["start"], values["end"]))
    if window is not None:
        return window
    if umap is not None:
        max_depth = resolve_max_depth(values["max_depth"], umap.family)
        if not umap.self_attention(max_level=max_depth - 1):
            return (f"no self-attention at depth <= {max_depth} in this {umap.family} UNet"
                    + (" (SDXL has none at full resolution: use 2)" if is_sdxl(umap.family) else ""))
    return None


def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    factor = pass_factor(values, ctx.hires)
    max_depth = resolve_max_depth(values["max_depth"], ctx.map.family)
    layers = ctx.map.self_attention(max_level=max_depth - 1)
    state = _CallState(ctx.clock, values["start"], values["end"])
    ctx.patcher.add_handle(ctx.unet.register_forward_pre_hook(state, with_kwargs=True), ctx.technique)
    ctx.idle_after(state.idle)
    for layer in layers:
        module = layer.module
        forward = _downsampled_forward(current_forward(module), state, factor, 2 ** (max_depth - 1), values["method"])
        ctx.patcher.set_attr(module, "forward", forward, ctx.technique)
