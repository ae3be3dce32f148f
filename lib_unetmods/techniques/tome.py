"""Token Merging for SD (Bolya & Hoffman 2023), as tomesd 0.1.3 does it: bipartite soft matching
with one destination token per sy x sx cell, similarity on the transformer block's input (before
norm1), merge by mean, unmerge by copy, around attn1 (optionally attn2 and the MLP) of the blocks
whose downsampling factor is at most max_downsample.

Differences from tomesd, none of which changes the result beyond float rounding:
- the dst/src split is built directly (tomesd argsorts a {-1, 0} buffer, which is not stable on
  CPU, so its token order varies; attention does not depend on the order);
- merge is one index_add_ and unmerge one index_select through a token -> merged-row map, in place
  of tomesd's gathers, scatter_reduce and three scatters (the same means and copies, less work);
- randomness comes from a private generator seeded from the image seed (tomesd forks the global
  RNG state); the draws have tomesd's shapes, so a generator in the same state draws the same cells;
- the (B, Na, Nb) similarities are computed in chunks of source rows into one buffer reused by every
  block of the pass (tomesd allocates them afresh per block: on CPU a 100+ MB tensor at 768x768 whose
  page faults cost about a sixth of the matching); the normalised metric is never built whole;
- the latent size is read from the UNet call whether x is passed by position or keyword, and a
  token count that does not fit the latent grid (e.g. after Deep Shrink) is skipped, not a crash;
- an active window in steps (tomesd merges at every step): the reference's clock is "always on",
  so start=0, end=1 reproduces it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..clock import covers_no_step
from ..families import ByFamily, is_sdxl
from ..params import NOT_THIS_PASS, Param, TechniqueSpec
from ..patcher import current_forward

AUTO_MAX_DOWNSAMPLE = ByFamily({"sd1": 1, "sd2": 1, "sdxl": 2, "sdxl_refiner": 2})  # SDXL has no attention at x1
SITES = (("merge_attn", "attn1"), ("merge_crossattn", "attn2"), ("merge_mlp", "ff"))

SPEC = TechniqueSpec(
    id="tome",
    title="Token Merging (ToMe)",
    description="Merges similar tokens before self-attention and copies the result back: faster at large sizes, small quality cost.",
    params=(
        Param("enabled", "bool", False, "Token Merging (ToMe)", "Enable Token Merging (tomesd 0.1.3 algorithm)."),
        Param("ratio", "float", 0.5, "Merge ratio (at most 1 - 1/(sx*sy): 0.75 with 2x2)",
              "Share of the tokens merged away in each patched block; higher is faster with more quality loss. "
              "At most 1 - 1/(sx*sy) of the tokens can be merged (one destination per sx x sy cell is kept): "
              "a larger value acts like that cap, and a warning says so.", 0.0, 0.95, 0.01),
        Param("hr_ratio", "float", 0.0, "Hires-pass merge ratio (0 = same as first pass)",
              "Merge ratio for the hires-fix second pass; 0 uses the first-pass ratio (as the WebUI's own setting). "
              "The same cap 1 - 1/(sx*sy) applies.", 0.0, 0.95, 0.01),
        Param("max_downsample", "choice", "auto", "Max downsampling",
              "Merge in transformer blocks whose resolution is at most this many times below the latent: "
              "1 = full resolution only, 8 = every block. auto = 1 for SD1/SD2, 2 for SDXL (which has no "
              "attention at full resolution, so 1 would do nothing).", choices=("auto", "1", "2", "4", "8")),
        Param("sx", "int", 2, "Cell width (sx)",
              "Width of the cells that each keep one destination token; larger cells allow merging more "
              "(cap 1 - 1/(sx*sy)).", 1, 8, 1, advanced=True),
        Param("sy", "int", 2, "Cell height (sy)", "Height of the cells that each keep one destination token.", 1, 8, 1, advanced=True),
        Param("use_rand", "bool", False, "Random destinations",
              "Pick each cell's destination token at random (seeded by the image seed) instead of the top-left one. "
              "Forced off when the UNet batch is odd (cond and uncond not in one batch), as in tomesd; "
              "off by default as in the WebUI's own token merging.", advanced=True),
        Param("merge_attn", "bool", True, "Merge for self-attention", "Merge tokens around self-attention (attn1): where the speed is.", advanced=True),
        Param("merge_crossattn", "bool", False, "Merge for cross-attention",
              "Also merge around cross-attention (attn2): little gain, not recommended by tomesd.", advanced=True),
        Param("merge_mlp", "bool", False, "Merge for the MLP",
              "Also merge around the feed-forward layer: visible quality loss, very much not recommended by tomesd.", advanced=True),
        Param("start", "float", 0.0, "Start at", "Ratio of the steps where merging starts.", 0.0, 1.0, 0.01, advanced=True),
        Param("end", "float", 1.0, "End at", "Ratio of the steps where merging ends.", 0.0, 1.0, 0.01, advanced=True),
    ),
    recommended={"default": {"ratio": 0.5, "max_downsample": "auto"}},
)


# --- the math, on plain tensors ----------------------------------------------------------

def merge_cap(sx: int, sy: int) -> float:
    """The largest share of tokens that can be merged: all but one token per sx x sy cell."""
    return 1 - 1 / (sx * sy)


def resolve_max_downsample(choice: str, family: str) -> int:
    return AUTO_MAX_DOWNSAMPLE.get(family, 1) if choice == "auto" else int(choice)


def token_grid(height: int, width: int, tokens: int) -> tuple[int, int, int] | None:
    """(downsample, h, w) of a block with `tokens` tokens in a UNet called on a height x width
    latent: tomesd's ceil(sqrt(HW // N)) and ceil sizes (stride-2 conv arithmetic), or, where those
    do not give h * w == N (a resized feature map), the divisor pair nearest the latent's aspect."""
    downsample = math.ceil(math.sqrt(height * width // tokens)) if tokens <= height * width else 1
    h, w = math.ceil(height / downsample), math.ceil(width / downsample)
    if h * w == tokens:
        return downsample, h, w
    h = max(1, round(math.sqrt(tokens * height / width)))
    return (downsample, h, tokens // h) if tokens % h == 0 else None


def dst_partition(h: int, w: int, sx: int, sy: int, device: torch.device,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the destination tokens (one per full sy x sx cell, ascending) and of the
    source tokens (the rest, ascending: incomplete edge cells are all sources). Without a generator
    each cell's destination is its top-left token; with one, a token drawn as tomesd draws it."""
    hsy, wsx = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(hsy, wsx, dtype=torch.long, device=device)
    else:
        pick = torch.randint(sy * sx, size=(hsy, wsx, 1), device=generator.device, generator=generator)[..., 0].to(device)
    rows = torch.arange(hsy, device=device)[:, None] * sy + pick // sx
    cols = torch.arange(wsx, device=device)[None, :] * sx + pick % sx
    is_dst = torch.zeros(h * w, dtype=torch.long, device=device)
    is_dst[(rows * w + cols).reshape(-1)] = -1
    order = is_dst.argsort(stable=True)  # tomesd's dst|src split, in a fixed order (no host sync)
    return order[:hsy * wsx], order[hsy * wsx:]


@dataclass
class TokenMerge:
    """A matching of a (B, N, C) sequence: `slot` maps each token (flattened over the batch) to its
    row of the merged (B, M, C) sequence, which holds the unmerged sources, then the destinations."""

    batch: int
    tokens: int
    merged: int  # M = N - r
    slot: torch.Tensor  # (B * N,) rows of the flattened merged sequence
    count: torch.Tensor  # (B * M, 1) tokens averaged into each merged row

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Each merged row is the mean of its tokens (a destination with the sources merged into it)."""
        c = x.shape[-1]
        out = x.new_zeros(self.batch * self.merged, c).index_add_(0, self.slot, x.reshape(-1, c))
        return out.div_(self.count.to(out.dtype)).view(self.batch, self.merged, c)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Every token gets its merged row: sources merged into a destination get its copy."""
        c = y.shape[-1]
        return y.reshape(-1, c).index_select(0, self.slot).view(self.batch, self.tokens, c)


SCORE_CHUNK_BYTES = 64 << 20  # similarities computed at once: bounds the buffer of one block call


def best_destinations(metric: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source token (B, Na) the cosine similarity to its most similar destination and
    that destination's index. The (B, Na, Nb) scores are computed whole source rows at a time into
    one buffer of at most SCORE_CHUNK_BYTES, freed on return: at 1024x1024 the whole product is
    400 MB, and a fresh tensor that size per block costs page faults on CPU."""
    norm = metric.norm(dim=-1, keepdim=True)  # the same division as tomesd's, on the selected rows only
    a = metric.index_select(1, src).div_(norm.index_select(1, src))
    bt = metric.index_select(1, dst).div_(norm.index_select(1, dst)).transpose(-1, -2)
    # out= bypasses autocast: cast as it would (the dtype of a 1 x 1 product) to keep tomesd's dtype
    dtype = (a[:, :1] @ bt[..., :1]).dtype
    a, bt = a.to(dtype), bt.to(dtype)
    batch, sources, destinations = a.shape[0], a.shape[1], bt.shape[-1]
    rows = min(sources, max(1, SCORE_CHUNK_BYTES // (batch * destinations * a.element_size())))
    buffer = a.new_empty(batch * rows * destinations)
    best, best_dst = [], []
    for i in range(0, sources, rows):
        chunk = a[:, i:i + rows]
        scores = buffer[:batch * chunk.shape[1] * destinations].view(batch, chunk.shape[1], destinations)
        value, index = torch.matmul(chunk, bt, out=scores).max(dim=-1)
        best.append(value)
        best_dst.append(index)
    return (best[0], best_dst[0]) if len(best) == 1 else (torch.cat(best, 1), torch.cat(best_dst, 1))


def bipartite_soft_matching(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                            generator: torch.Generator | None = None,
                            partition: tuple[torch.Tensor, torch.Tensor] | None = None) -> TokenMerge | None:
    """Match the r source tokens most similar (cosine) to their best destination, per sample;
    None when nothing is merged. `partition` is a precomputed dst_partition (no generator)."""
    batch, tokens, _ = metric.shape
    if r <= 0 or h * w != tokens:
        return None
    with torch.no_grad():
        dst, src = partition if partition is not None else dst_partition(h, w, sx, sy, metric.device, generator)
        r = min(r, src.numel())
        if r <= 0 or dst.numel() == 0:
            return None
        best, best_dst = best_destinations(metric, src, dst)  # (B, Na)
        order = best.argsort(dim=-1, descending=True)  # merged sources first
        kept = src.numel() - r
        # in rank order: the r merged sources go to their destination's row, the rest keep a row each
        rows = torch.cat([kept + best_dst.gather(1, order[:, :r]),
                          torch.arange(kept, device=metric.device).expand(batch, kept)], dim=1)
        src_rows = torch.empty_like(order).scatter_(1, order, rows)
        slot = torch.empty(batch, tokens, dtype=torch.long, device=metric.device)
        slot[:, src] = src_rows
        slot[:, dst] = kept + torch.arange(dst.numel(), device=metric.device)
        merged = kept + dst.numel()
        slot = (slot + torch.arange(batch, device=metric.device)[:, None] * merged).reshape(-1)
        count = torch.zeros(batch * merged, 1, device=metric.device).index_add_(
            0, slot, torch.ones(batch * tokens, 1, device=metric.device))
    return TokenMerge(batch, tokens, merged, slot, count)


# --- per-call state and wiring -----------------------------------------------------------

@dataclass
class MergeState:
    """Shared by the patched blocks of one sampling pass; the UNet pre-hook refreshes it per call."""

    ratio: float
    max_downsample: int
    sx: int
    sy: int
    use_rand: bool
    seed: int
    size: tuple[int, int] | None = None  # latent (H, W) of the current UNet call
    active: bool = False  # inside the step window
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    partitions: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def generator(self, device: torch.device) -> torch.Generator:
        """A private generator per device, seeded from the image seed (never the global RNG);
        devices without their own generator (mps) draw on the CPU."""
        key = str(device)
        if key not in self.generators:
            try:
                gen = torch.Generator(device=device)
            except RuntimeError:
                gen = torch.Generator()
            self.generators[key] = gen.manual_seed(self.seed & 0xFFFF_FFFF_FFFF_FFFF)
        return self.generators[key]

    def plan(self, x: torch.Tensor) -> TokenMerge | None:
        """tomesd's compute_merge for one block call, x = the block's input (B, N, C)."""
        if not self.active or self.size is None:
            return None
        batch, tokens = x.shape[:2]
        grid = token_grid(*self.size, tokens)
        if grid is None or grid[0] > self.max_downsample:
            return None
        _, h, w = grid
        r = int(tokens * self.ratio)
        if self.use_rand and batch % 2 == 0:  # odd batch: cond and uncond are apart, no randomness
            return bipartite_soft_matching(x, h, w, self.sx, self.sy, r, generator=self.generator(x.device))
        key = (h, w, str(x.device))
        if key not in self.partitions:
            self.partitions[key] = dst_partition(h, w, self.sx, self.sy, x.device)
        return bipartite_soft_matching(x, h, w, self.sx, self.sy, r, partition=self.partitions[key])


class _Current:
    """The matching of the block call in progress, read by the block's wrapped sub-modules."""

    merge: TokenMerge | None = None


def _block_forward(original: Callable[..., Any], state: MergeState, current: _Current) -> Callable[..., Any]:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        current.merge = state.plan(x)
        try:
            return original(x, *args, **kwargs)
        finally:
            current.merge = None

    return forward


def _site_forward(original: Callable[..., Any], current: _Current) -> Callable[..., Any]:
    """u(f(m(h))) around attn1 / attn2 / ff. Input of another shape than the block's (an outer
    wrapper that tiled the sequence into the batch) passes through unmerged."""

    def forward(h: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        tm = current.merge
        if tm is None or tuple(h.shape[:2]) != (tm.batch, tm.tokens):
            return original(h, *args, **kwargs)
        return tm.unmerge(original(tm.merge(h), *args, **kwargs))

    return forward


def _latent_size_hook(state: MergeState, clock: Any, start: float, end: float) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("x")
        state.size = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) else None
        state.active = clock.in_window(start, end)

    return hook


def pass_ratio(values: dict[str, Any], hires: bool) -> float:
    """The merge ratio of the pass (0 = ToMe off in it)."""
    return (values["hr_ratio"] or values["ratio"]) if hires else values["ratio"]


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    clock = where.clock
    ratios = [pass_ratio(values, clock.hires)] if clock is not None else [pass_ratio(values, h) for h in (False, True)]
    if max(ratios) <= 0:
        return NOT_THIS_PASS  # ratio 0: ToMe is off in this pass by choice, nothing to say
    if not any(values[flag] for flag, _ in SITES):
        return "attention, cross-attention and MLP merging are all off"
    return covers_no_step(clock, lambda c: c.window_steps(values["start"], values["end"]), "its start/end window")


def apply(ctx: Any, values: dict[str, Any]) -> None:
    ratio = pass_ratio(values, ctx.hires)
    if ratio <= 0:
        return
    sx, sy = values["sx"], values["sy"]
    cap = merge_cap(sx, sy)
    if ratio > cap:
        ctx.warn(f"ratio {ratio:g} is above 1 - 1/(sx*sy) = {cap:g}: at most that share of the tokens "
                 f"can be merged with {sx}x{sy} cells, so it acts like {cap:g}")
    sites = [name for flag, name in SITES if values[flag]]
    if not sites:
        ctx.warn("attention, cross-attention and MLP merging are all off; nothing to do")
        return
    max_downsample = resolve_max_downsample(values["max_downsample"], ctx.map.family)
    blocks = list({id(a.transformer): a.transformer for a in ctx.map.self_attention()
                   if 2 ** a.level <= max_downsample}.values())
    if not blocks:
        ctx.warn(f"no transformer block at downsampling <= {max_downsample} in this {ctx.map.family} UNet"
                 + (" (SDXL has none at full resolution: use 2)" if is_sdxl(ctx.map.family) else ""))
        return
    state = MergeState(ratio, max_downsample, sx, sy, values["use_rand"], int(ctx.seed))
    hook = _latent_size_hook(state, ctx.clock, values["start"], values["end"])
    ctx.patcher.add_handle(ctx.unet.register_forward_pre_hook(hook, with_kwargs=True), "tome")
    for block in blocks:
        current = _Current()
        ctx.patcher.set_attr(block, "forward", _block_forward(current_forward(block), state, current), "tome")
        for name in sites:
            module = getattr(block, name)
            ctx.patcher.set_attr(module, "forward", _site_forward(current_forward(module), current), "tome")
