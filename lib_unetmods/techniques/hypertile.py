"""HyperTile (tfernd/HyperTile, the WebUI's built-in extension): self-attention (attn1) of the
chosen transformer blocks runs per spatial tile. The tokens are cut into nh x nw rectangles,
stacked into the batch, attended per tile and put back, which equals attention with a
block-diagonal mask; cross-attention, MLPs and ResBlocks are untouched.

Tile counts are drawn as the built-in draws them (candidate counts from the divisors of each side,
swap size = number of candidates, minimum tile scaled by 2**depth), from a private random.Random
seeded with the image seed, on every call of every enabled layer, nh then nw. Unlike the built-in
and tfernd, which infer the grid from the token count and an aspect ratio (and on non-square
images take interleaved strips for the width split: design doc 2(d)), the grid here comes from the
latent size of the UNet call, so every tile is a contiguous rectangle on every aspect ratio.
"""
from __future__ import annotations

import functools
import math
import random
import re
from typing import Any, Callable

import torch
import torch.nn as nn

from ..params import Param, TechniqueSpec
from ..families import SD1, SD2, layout
from ..patcher import current_forward
from ..unet_map import AttentionLayer, UNetMap, plain_self_attention

MIN_TILE_PX = 128  # the built-in's floor on the tile size (tfernd: 32)
MAX_LEVELS = 8  # downsampling levels searched when matching a token count to the latent

SPEC = TechniqueSpec(
    id="hypertile",
    title="HyperTile",
    description="Splits self-attention into spatial tiles: large images get much faster, small ones barely change.",
    params=(
        Param("enabled", "bool", False, "HyperTile", "Enable HyperTile (self-attention in spatial tiles)."),
        Param("hires", "bool", True, "Apply in hires pass",
              "Also tile in the hires-fix second pass, where images are largest and the gain is biggest."),
        Param("first_pass", "bool", True, "Apply in first pass",
              "Tile in the first pass; off = hires pass only (the WebUI's 'second pass' option).", advanced=True),
        Param("max_depth", "int", 3, "Max depth",
              "Deepest UNet depth that is tiled (0 = only the highest-resolution attention). Deeper layers need "
              "larger images to be split at all, because the minimum tile doubles with each depth.", 0, 3, 1),
        Param("tile_size", "int", 256, "Max tile size",
              "Largest tile side in pixels; the tile is also capped by the largest power of 2 dividing both sides "
              "of the image, and never below 128.", 0, 512, 16),
        Param("swap_size", "int", 3, "Swap size",
              "How many tile counts are candidates for the random choice on each call (1 = always the smallest "
              "allowed tile, which can show seams; 0 acts as 1).", 0, 64, 1),
    ),
    recommended={"default": {}},  # the WebUI's defaults: max depth 3, max tile 256, swap 3
)


# --- tile counts, as the built-in chooses them -------------------------------------------

@functools.lru_cache(maxsize=None)
def tile_counts(value: int, min_tile: int, swap_size: int) -> tuple[int, ...]:
    """Candidate tile counts along a side of `value` tokens: value // d for the `swap_size`
    smallest divisors d of value with d >= min(min_tile, value); largest count first."""
    min_tile = min(min_tile, value)
    sizes = [d for d in range(min_tile, value + 1) if value % d == 0]
    return tuple(value // d for d in sizes[:max(1, swap_size)])


def random_divisor(value: int, min_tile: int, swap_size: int, rng: random.Random) -> int:
    """One draw, consuming the generator even when there is a single candidate (as the built-in)."""
    counts = tile_counts(value, min_tile, swap_size)
    return counts[rng.randint(0, len(counts) - 1)]


@functools.lru_cache(maxsize=None)
def largest_tile_size_available(width: int, height: int) -> int:
    """The largest power of 2 dividing both sides (pixels)."""
    gcd = math.gcd(width, height)
    size = 1
    while gcd % (size * 2) == 0:
        size *= 2
    return size


def latent_tile_size(width: int, height: int, tile_size: int) -> int:
    """Minimum tile side in latent tokens at depth 0 for an image of width x height pixels."""
    return max(MIN_TILE_PX, min(largest_tile_size_available(width, height), tile_size)) // 8


# --- the grid of a layer and the tile partition -------------------------------------------

@functools.lru_cache(maxsize=1024)
def layer_grid(tokens: int, height: int, width: int) -> tuple[int, int] | None:
    """(rows, cols) of a layer's token grid for a latent of height x width, or None.

    ldm halves a side with a stride-2 conv, so level k is ceil(side / 2**k); a resize by another
    factor (Deep Shrink) is matched by its scale when both sides land within one token. Anything
    else (merged tokens from ToMe, a foreign layout) has no grid and is left untiled."""
    for k in range(MAX_LEVELS):
        h, w = -(-height // 2 ** k), -(-width // 2 ** k)
        if h * w == tokens:
            return h, w
    scale = math.sqrt(tokens / (height * width))
    for h in {math.floor(height * scale), math.ceil(height * scale)}:
        if h > 0 and tokens % h == 0 and abs(tokens // h - width * scale) < 1 and abs(h - height * scale) < 1:
            return h, tokens // h
    return None


def split_tiles(x: torch.Tensor, h: int, w: int, nh: int, nw: int) -> torch.Tensor:
    """(B, h*w, C) in row-major order -> (B*nh*nw, (h/nh)*(w/nw), C): tile (i, j) of sample b
    is row b*nh*nw + i*nw + j and holds rows i*h/nh.. and columns j*w/nw.. of the grid."""
    b, _, c = x.shape
    th, tw = h // nh, w // nw
    return x.reshape(b, nh, th, nw, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, th * tw, c)


def merge_tiles(y: torch.Tensor, h: int, w: int, nh: int, nw: int) -> torch.Tensor:
    """The inverse of split_tiles."""
    c = y.shape[-1]
    th, tw = h // nh, w // nw
    return y.reshape(-1, nh, nw, th, tw, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h * w, c)


def tiled(fn: Callable[..., torch.Tensor], x: torch.Tensor, h: int, w: int, nh: int, nw: int,
          *args: Any, **kwargs: Any) -> torch.Tensor:
    """fn applied to each tile of x (all tiles in one batched call), reassembled."""
    if nh * nw == 1:
        return fn(x, *args, **kwargs)
    return merge_tiles(fn(split_tiles(x, h, w, nh, nw), *args, **kwargs), h, w, nh, nw)


# --- which layers, at which depth (the built-in's DEPTH_LAYERS / DEPTH_LAYERS_XL) ----------

def _transformer_index(layer: AttentionLayer) -> int:
    match = re.search(r"transformer_blocks\.(\d+)\.attn1$", layer.name)
    return int(match.group(1)) if match else 0


def layer_depth(layer: AttentionLayer, family: str, first_level: int) -> int | None:
    """HyperTile depth of a self-attention layer, or None when the built-in never tiles it.

    SD1/SD2: depth = resolution level, first transformer block only (they have one).
    SDXL: at its first attention level, transformer block 0 is depth 0 and block 1 depth 1;
    every block of the next level is depth 1; the middle block is depth 2; depth 3 is empty.
    The SDXL refiner gets the same structure (the built-in's name table misplaces its layers)."""
    if not layer.is_self:
        return None
    index = _transformer_index(layer)
    if layout(family) in (SD1, SD2):
        return layer.level if index == 0 else None
    if layer.block.kind == "middle":
        return 2
    relative = layer.level - first_level
    if relative == 0:
        return index if index <= 1 else None
    return 1 if relative == 1 else None


def depth_layers(umap: UNetMap, max_depth: int = 3) -> list[tuple[AttentionLayer, int]]:
    """The self-attention layers HyperTile wraps, with their depth."""
    layers = umap.self_attention()
    if not layers:
        return []
    first = min(a.level for a in layers)
    found = [(a, layer_depth(a, umap.family, first)) for a in layers]
    return [(a, d) for a, d in found if d is not None and d <= max_depth]


# --- wiring ------------------------------------------------------------------------------

class _LatentSize:
    """(height, width) of the latent of the current UNet call, from a pre-hook on the UNet's
    __call__ (so it also fires when another extension replaced the forward)."""

    def __init__(self) -> None:
        self.hw: tuple[int, int] | None = None
        self.calls = 0  # UNet calls seen, layer calls cut into more than one tile, layer calls left to another patch
        self.tiled = 0
        self.yielded = 0

    def idle(self) -> str | None:
        """After the pass: why no layer was tiled (None when one was, or no call ran)."""
        if not self.calls or self.tiled:
            return None
        if self.yielded:
            return ("another extension gives self-attention a context (e.g. a Forge attn1_patch): HyperTile yields "
                    "to it and tiled no layer")
        return "no layer was split into tiles in this pass"

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls += 1
        x = args[0] if args else kwargs.get("x")
        self.hw = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.ndim == 4 else None


def _tiled_forward(original: Callable[..., torch.Tensor], depth: int, size: _LatentSize, values: dict[str, Any],
                   rng: random.Random) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        cross = not plain_self_attention(args, kwargs)
        if cross:  # self-attention given a context: another extension's patch (Forge's attn1_patch) owns it
            size.yielded += 1
        grid = None if size.hw is None or x.ndim != 3 or cross else layer_grid(x.shape[1], *size.hw)
        if grid is None:  # not plain self-attention on a spatial grid: leave it whole
            return original(x, *args, **kwargs)
        h, w = grid
        min_tile = latent_tile_size(size.hw[1] * 8, size.hw[0] * 8, values["tile_size"]) * 2 ** depth
        nh = random_divisor(h, min_tile, values["swap_size"], rng)
        nw = random_divisor(w, min_tile, values["swap_size"], rng)
        if nh * nw > 1:
            size.tiled += 1
        return tiled(original, x, h, w, nh, nw, *args, **kwargs)

    return forward


def runs_in_pass(values: dict[str, Any], hires: bool) -> bool:
    return values["hires" if hires else "first_pass"]


def splits(values: dict[str, Any], depth: int, level: int, hw: tuple[int, int]) -> bool:
    """Whether a layer at `depth` on resolution `level` can be cut into more than one tile for a
    latent of hw (the candidates of both sides; the random draw picks among them)."""
    h, w = (-(-side // 2 ** level) for side in hw)
    min_tile = latent_tile_size(hw[1] * 8, hw[0] * 8, values["tile_size"]) * 2 ** depth
    return any(max(tile_counts(side, min_tile, values["swap_size"])) > 1 for side in (h, w))


def split_levels(umap: UNetMap, values: dict[str, Any], hw: tuple[int, int] | None) -> set[int]:
    """Resolution levels where some wrapped layer splits (every wrapped level where hw is unknown)."""
    return {a.level for a, d in depth_layers(umap, values["max_depth"]) if hw is None or splits(values, d, a.level, hw)}


def idle(values: dict[str, Any], umap: UNetMap | None, where: Any) -> str | None:
    if umap is None:
        return None
    if not depth_layers(umap, values["max_depth"]):
        return f"no self-attention layer at depth <= {values['max_depth']} in this {umap.family} UNet"
    if where.hw is not None and not split_levels(umap, values, where.hw):
        return f"no layer splits into tiles at {where.hw[1] * 8}x{where.hw[0] * 8} (every tile would be the whole layer)"
    return None


def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    layers = depth_layers(ctx.map, values["max_depth"])
    if not layers:
        ctx.warn(f"no self-attention layer at depth <= {values['max_depth']} in this {ctx.map.family} UNet")
        return
    rng = random.Random(ctx.seed)  # reseeded every pass, as the built-in reseeds for the hires pass
    size = _LatentSize()
    ctx.patcher.add_handle(ctx.unet.register_forward_pre_hook(size, with_kwargs=True), ctx.technique)
    for layer, depth in layers:
        module = layer.module
        ctx.patcher.set_attr(module, "forward", _tiled_forward(current_forward(module), depth, size, values, rng), ctx.technique)
    ctx.idle_after(size.idle)
