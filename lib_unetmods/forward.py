"""Hook points of the UNet forward, placed on the UNet's blocks instead of in a forward of our own.

Every host runs the same loop (time embedding, input blocks with a skip list, middle block,
output blocks on cat([h, skip]), `out`) and calls each block as a module: A1111's ldm/sgm
forward, another extension's copy of it (sd-webui-controlnet adds its residuals to the skips
and the middle output), and Forge's `IntegratedUNet2DConditionModel` (which applies `control`
in place, passes `transformer_options` and the next skip's shape to each output block). So the
points live where those loops meet: torch hooks on the UNet module (begin, end) and one
instance forward per block that runs the technique hooks around the block's own forward. The
UNet's forward is never replaced, whoever owns it; with no hook installed nothing is touched,
and with hooks that change nothing the output is bit-identical (same operations, same order).

Classic Forge calls the blocks' children directly (`forward_timestep_embed`), so block-level
points cannot run there: `install_forward` refuses with a message.

Before any of them, `CallTracker` sees each UNet call as it came (its hooks run first and last on
the UNet module, on every host): the caller's arguments, which an extra pass (NDCFG, PAG) replays,
and the call's rows (rows.py), which a host's call takes from the evaluation its glue announced
and an extra pass gets from the technique that makes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .clock import StepClock
from .forge_call import align_control, chunk_options, control_present, forge_call, forge_rows
from .patcher import Patcher, current_forward
from .rows import CallRows, Evaluation
from .unet_map import UNetMap, map_unet

POINTS = ("begin", "after_input", "after_skip", "to_skip", "before_concat", "after_output", "end")


class Refused(Exception):
    """A technique cannot run on this model or host; the message says why."""


@dataclass
class Shortcut:
    """Skip the deep blocks (DeepCache): input_blocks[last_input + 1..], the middle block and
    output_blocks[..first_output - 1] return at once; the block feeding output_blocks[first_output]
    returns `h`, the others zeros of the shapes they had on the full call (`shapes`), so a host's
    loop that adds to or concatenates them still runs."""

    last_input: int
    first_output: int
    h: torch.Tensor
    shapes: dict[tuple[str, int], torch.Size]


@dataclass
class UNetCall:
    x: torch.Tensor
    timesteps: torch.Tensor | None
    kwargs: dict[str, Any]
    clock: StepClock
    state: dict[str, Any] = field(default_factory=dict)  # scratch space shared by hooks
    shortcut: Shortcut | None = None
    # input blocks' outputs, as the host stores them; None once their output block took them (the
    # host drops its reference then, and holding ours would keep every skip alive to the call's end)
    skips: list[torch.Tensor | None] = field(default_factory=list)
    shapes: dict[tuple[str, int], torch.Size] = field(default_factory=dict)  # output shape of each block run
    next_skip_size: tuple[int, ...] | None = None  # skip size of the next output block's concat
    # the host adds residuals: a skip reached its concat changed (ControlNet), or h reached the next
    # block as another tensor than the block returned (sd-webui-controlnet's T2I-Adapters)
    residuals: bool = False
    extra: str = ""  # the technique whose extra pass this call is (NDCFG, PAG); "" = a sampler's call
    rows: CallRows | None = None  # which row is which (None: unknown)

    @property
    def control(self) -> bool:
        """Forge passes its ControlNet's residuals as `control` (lists of tensors or None)."""
        return control_present(self.kwargs)

    def skip_size(self, output_index: int) -> tuple[int, ...] | None:
        """Spatial size of the skip output_blocks[output_index] concatenates (None past the last)."""
        j = len(self.skips) - 1 - output_index
        return tuple(self.shapes["input", j][2:]) if 0 <= j < len(self.skips) else None


def host_rows(kwargs: dict[str, Any], announced: Evaluation | None, batch: int) -> CallRows | None:
    """The rows of a host's UNet call: Forge's chunks (`transformer_options`), else the next rows of
    the evaluation the host announced (A1111's cfg_denoiser callback, the lab's samplers)."""
    if forge_call(kwargs):
        return forge_rows(kwargs, batch, announced)
    return announced.take(batch) if announced is not None else None


def _split_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(x, timesteps) of a UNet call, by position or keyword."""
    return tuple(args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(("x", "timesteps")))  # type: ignore[return-value]


# --- the arguments of an extra pass (NDCFG, PAG) ----------------------------------------

def select_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """The given rows of every batch-sized tensor in a UNet call's arguments (for an extra pass)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: select_rows(v, rows, batch) for k, v in value.items()}
    return value


def fresh_containers(value: Any) -> Any:
    """Copies of the dicts and lists (not of the tensors) in a UNet call's arguments."""
    if isinstance(value, dict):
        return {k: fresh_containers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fresh_containers(v) for v in value)
    return value


@dataclass
class HostCall:
    """One UNet call as it came: the arguments as the caller passed them (before any technique's
    pre-hook changed them; an extra pass replays them), its rows, and the technique whose extra
    pass it is ("" = a call of the host's sampler)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    rows: CallRows | None
    extra: str = ""


class CallTracker:
    """The UNet calls under way (an extra pass runs inside its host call): its pre-hook runs before
    every technique's, its hook after them (apply.py installs both around the techniques). Host calls
    take their rows and count as calls of the step; an extra pass gets the rows its technique gives."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock
        self.calls: list[HostCall] = []
        self._extra: tuple[str, CallRows | None] | None = None

    @property
    def current(self) -> HostCall | None:
        return self.calls[-1] if self.calls else None

    def install(self, unet: nn.Module, patcher: Patcher) -> None:
        patcher.add_handle(unet.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True), "calls")
        patcher.add_handle(unet.register_forward_hook(self._leave, with_kwargs=True, always_call=True), "calls")
        patcher.on_restore(self.calls.clear, "calls")

    def rerun(self, unet: nn.Module, owner: str, rows: CallRows, index: list[int]) -> Any:
        """The current call again on some of its rows, as `owner`'s extra pass (NDCFG, PAG), made
        from an end hook: every technique's hooks run on it, it is marked (UNetCall.extra = owner, so
        other techniques' end hooks leave it alone), is not a call of the step, and has these rows."""
        host = self.calls[-1]
        picked = torch.tensor(index, device=_split_call(host.args, host.kwargs)[0].device)
        kwargs = select_rows(host.kwargs, picked, len(rows))
        if forge_call(kwargs):
            kwargs["transformer_options"] = chunk_options(kwargs["transformer_options"], [rows.rows[i].kind for i in index],
                                                          len(rows))
        self._extra = (owner, rows.select(index))
        try:
            return unet(*select_rows(host.args, picked, len(rows)), **kwargs)
        finally:
            self._extra = None

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        extra, self._extra = self._extra, None
        if extra is None:
            self.clock.calls_in_step += 1
            x = _split_call(args, kwargs)[0]
            extra = ("", host_rows(kwargs, self.clock.evaluation, x.shape[0]) if isinstance(x, torch.Tensor) else None)
        self.calls.append(HostCall(args, fresh_containers(kwargs), extra[1], extra[0]))  # Forge's forward pops its control lists

    def _leave(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if self.calls:
            self.calls.pop()


class ForwardHooks:
    """Hook lists by point, called in registration order (= technique order):
    begin(call), may set call.shortcut; after_input(i, h, call) -> h, before the skip is saved
    (so it changes the skip); after_skip(i, h, call) -> h, after it is saved;
    to_skip(i, h, size, call) -> h, where h leaves the block that feeds output_blocks[i]
    (size: the skip's spatial size; resize h there, the host concatenates next);
    before_concat(i, h, skip, call) -> (h, skip), same sizes; after_output(i, h, call) -> h;
    end(out, call) -> out.
    """

    def __init__(self, h_channels: list[int], clock: StepClock, calls: CallTracker) -> None:
        self.h_channels, self.clock, self.calls = h_channels, clock, calls
        self.lists: dict[str, list[Callable[..., Any]]] = {p: [] for p in POINTS}
        self.current: UNetCall | None = None
        # output blocks at whose concat the skip is compared with the input block's output, to see
        # whether the host adds residuals (one comparison, and on a GPU one sync, per block and call)
        self.watch_residuals: set[int] = set()

    def add(self, point: str, fn: Callable[..., Any], patcher: Patcher, owner: str = "") -> None:
        hooks = self.lists[point]
        hooks.append(fn)
        patcher.on_restore(lambda: hooks.remove(fn), owner)

    # --- the UNet call ---------------------------------------------------------------------

    def _begin(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x, timesteps = _split_call(args, kwargs)
        host = self.calls.current
        call = UNetCall(x, timesteps, kwargs, self.clock, extra=host.extra if host else "", rows=host.rows if host else None)
        self.current = call
        for fn in self.lists["begin"]:
            fn(call)

    def _end(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        call, self.current = self.current, None  # cleared first: an end hook may call the UNet again
        if call is None or out is None:  # out is None when the forward raised (always_call)
            return None
        call.state["output"] = out  # the UNet's own output, before any end hook changed it (PAG reads it)
        for fn in self.lists["end"]:
            out = fn(out, call)
        return out

    # --- the blocks ------------------------------------------------------------------------

    def _placeholder(self, call: UNetCall, key: tuple[str, int]) -> torch.Tensor:
        sc = call.shortcut
        if (key == ("middle", 0) and sc.first_output == 0) or key == ("output", sc.first_output - 1):
            return sc.h
        return torch.zeros((), dtype=sc.h.dtype, device=sc.h.device).expand(sc.shapes[key])

    @staticmethod
    def _align_control(call: UNetCall, name: str, like: torch.Tensor) -> None:
        align_control(call.kwargs, name, like)  # Forge's `control` (forge_call.py)

    @staticmethod
    def _see_host_add(call: UNetCall, h: torch.Tensor) -> None:
        """Every host passes a block's output to the next block as is, unless it adds to it between
        them: sd-webui-controlnet's T2I-Adapters add their residuals after input blocks 2, 5, 8, 11
        (`aligned_adding` makes a new tensor). Forge adds in place, but passes `control` (call.control)."""
        if not call.residuals and call.skips and h is not call.skips[-1]:
            call.residuals = True

    def _after_skip(self, i: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor:
        for fn in self.lists["after_skip"]:
            h = fn(i, h, call)
        return h

    def _before_concat(self, i: int, x: torch.Tensor, h_channels: int, call: UNetCall,
                       mine: torch.Tensor | None) -> torch.Tensor:
        """The before_concat hooks on the host's concatenated input x = [h, skip] (with `mine`, the
        skip this input block saved, first see whether the host added residuals to it). A part a
        hook replaced is written back into x where x owns its memory (the host's fresh concat), so
        no second x lives through the block; the hooks' tensors are freed when this returns."""
        h, skip = x[:, :h_channels], x[:, h_channels:]
        if mine is not None and not call.residuals:
            call.residuals = mine.shape != skip.shape or not torch.equal(mine, skip)
        h0, skip0 = h, skip
        for fn in self.lists["before_concat"]:
            h, skip = fn(i, h, skip, call)
        if h is h0 and skip is skip0:
            return x
        owned = x._base is None and x.is_contiguous() and not x.requires_grad
        if not owned or (h.shape, skip.shape) != (h0.shape, skip0.shape):
            return torch.cat([h, skip], dim=1)
        for new, part in ((h, h0), (skip, skip0)):
            if new is not part:
                part.copy_(new)
        return x

    def _to_skip(self, i: int, h: torch.Tensor, call: UNetCall) -> torch.Tensor:
        size = call.skip_size(i)
        if size is not None:
            for fn in self.lists["to_skip"]:
                h = fn(i, h, size, call)
        return h

    def input_forward(self, i: int, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(h: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            call = self.current
            if call is None:
                return inner(h, *args, **kwargs)
            if i == 0:
                call.skips.clear()
            self._see_host_add(call, h)
            if call.shortcut is not None and i > call.shortcut.last_input:
                h = self._placeholder(call, ("input", i))
            else:
                if i > 0:
                    h = self._after_skip(i - 1, h, call)
                h = inner(h, *args, **kwargs)
                for fn in self.lists["after_input"]:
                    h = fn(i, h, call)
            call.skips.append(h)
            call.shapes["input", i] = h.shape
            self._align_control(call, "input", h)
            return h

        return forward

    def middle_forward(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(h: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            call = self.current
            if call is None:
                return inner(h, *args, **kwargs)
            self._see_host_add(call, h)
            if call.shortcut is not None:
                return self._placeholder(call, ("middle", 0))
            h = self._after_skip(len(call.skips) - 1, h, call)
            h = inner(h, *args, **kwargs)
            h = self._to_skip(0, h, call)
            call.shapes["middle", 0] = h.shape
            self._align_control(call, "middle", h)
            if call.skips:
                self._align_control(call, "output", call.skips[-1])
            return h

        return forward

    def output_forward(self, i: int, inner: Callable[..., Any]) -> Callable[..., Any]:
        h_channels = self.h_channels[i]

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            call = self.current
            if call is None:
                return inner(x, *args, **kwargs)
            if call.shortcut is not None and i < call.shortcut.first_output:
                return self._placeholder(call, ("output", i))
            watch = i in self.watch_residuals
            own = len(call.skips) - 1 - i
            if self.lists["before_concat"] or watch:
                x = self._before_concat(i, x, h_channels, call, call.skips[own] if watch and own >= 0 else None)
            if own >= 0:
                call.skips[own] = None
            call.next_skip_size = call.skip_size(i + 1)
            h = inner(x, *args, **kwargs)
            for fn in self.lists["after_output"]:
                h = fn(i, h, call)
            h = self._to_skip(i + 1, h, call)
            call.shapes["output", i] = h.shape
            j = len(call.skips) - 2 - i  # the skip output_blocks[i + 1] pops next
            if j >= 0:
                self._align_control(call, "output", call.skips[j])
            return h

        return forward


def install_forward(unet: nn.Module, patcher: Patcher, clock: StepClock, calls: CallTracker | None = None,
                    umap: UNetMap | None = None) -> ForwardHooks:
    """Install the hook points on the UNet and its blocks (undone by the patcher); `calls`: the
    tracker apply.py installs (without it, calls have no rows and none is an extra pass)."""
    umap = umap or map_unet(unet)
    if umap.host == "forge_classic":
        raise Refused("classic Forge calls the UNet blocks' layers directly, so block-level hooks never run there")
    hooks = ForwardHooks(umap.h_channels, clock, calls or CallTracker(clock))
    patcher.add_handle(unet.register_forward_pre_hook(hooks._begin, with_kwargs=True), "forward")
    patcher.add_handle(unet.register_forward_hook(hooks._end, with_kwargs=True, always_call=True), "forward")
    for i, block in enumerate(unet.input_blocks):
        patcher.set_attr(block, "forward", hooks.input_forward(i, current_forward(block)), "forward")
    patcher.set_attr(unet.middle_block, "forward", hooks.middle_forward(current_forward(unet.middle_block)), "forward")
    for i, block in enumerate(unet.output_blocks):
        patcher.set_attr(block, "forward", hooks.output_forward(i, current_forward(block)), "forward")
    patcher.on_restore(lambda: setattr(hooks, "current", None), "forward")
    return hooks

