"""The UNet forward with hook points.

It reproduces the ldm/sgm `UNetModel.forward` operation for operation, so with no hook in a list
its output is bit-identical. It looks up `th` (A1111 replaces it with its size-fixing `cat`) and
`timestep_embedding` in the UNet class's own module on every call, so host hijacks keep working.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .clock import StepClock
from .patcher import Patcher

POINTS = ("begin", "after_input", "after_skip", "after_middle", "before_concat", "after_output", "end")


class Refused(Exception):
    """A technique cannot run on this model or host; the message says why."""


@dataclass
class Shortcut:
    """Skip the deep blocks: run input_blocks[0..last_input], then output_blocks[first_output..]
    with `h` as the tensor entering output_blocks[first_output] before its concat (DeepCache)."""

    last_input: int
    first_output: int
    h: torch.Tensor


@dataclass
class UNetCall:
    x: torch.Tensor
    timesteps: torch.Tensor | None
    context: Any
    y: torch.Tensor | None
    kwargs: dict[str, Any]
    clock: StepClock
    state: dict[str, Any] = field(default_factory=dict)  # scratch space shared by hooks
    shortcut: Shortcut | None = None
    next_skip_size: tuple[int, ...] | None = None  # skip size of the next output block's concat


class ForwardHooks:
    """Hook lists by point, called in registration order (= technique order):
    begin(call), which may replace call.x / timesteps / context / y or set call.shortcut; after_input(i, h, call) -> h, before the skip is saved (so it changes the skip);
    after_skip(i, h, call) -> h, after it is saved; after_middle(h, call) -> h;
    before_concat(i, h, skip, call) -> (h, skip); after_output(i, h, call) -> h; end(out, call) -> out.
    """

    def __init__(self) -> None:
        self.lists: dict[str, list[Callable[..., Any]]] = {p: [] for p in POINTS}

    def add(self, point: str, fn: Callable[..., Any], patcher: Patcher, owner: str = "") -> None:
        hooks = self.lists[point]
        hooks.append(fn)
        patcher.on_restore(lambda: hooks.remove(fn), owner)


def _unet_forward(unet: nn.Module, hooks: ForwardHooks, clock: StepClock) -> Callable[..., torch.Tensor]:
    host_module = sys.modules[type(unet).__module__]
    cast_input = not type(unet).__module__.startswith("sgm")  # sgm keeps x's dtype, ldm casts
    begin, after_input, after_skip, after_middle, before_concat, after_output, end = (hooks.lists[p] for p in POINTS)

    def forward(x: torch.Tensor, timesteps: torch.Tensor | None = None, context: Any = None,
                y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        assert (y is not None) == (unet.num_classes is not None), "must specify y if and only if the model is class-conditional"
        th = getattr(host_module, "th", torch)
        clock.calls_in_step += 1
        call = UNetCall(x, timesteps, context, y, kwargs, clock)
        for fn in begin:
            fn(call)
        x, timesteps, context, y = call.x, call.timesteps, call.context, call.y  # begin hooks may replace them
        hs = []
        t_emb = host_module.timestep_embedding(timesteps, unet.model_channels, repeat_only=False)
        emb = unet.time_embed(t_emb)
        if unet.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + unet.label_emb(y)
        h = x.type(unet.dtype) if cast_input else x
        shortcut = call.shortcut
        n_inputs = shortcut.last_input + 1 if shortcut else len(unet.input_blocks)
        for i in range(n_inputs):
            h = unet.input_blocks[i](h, emb, context)
            for fn in after_input:
                h = fn(i, h, call)
            hs.append(h)
            for fn in after_skip:
                h = fn(i, h, call)
        if shortcut:
            h, first_output = shortcut.h, shortcut.first_output
        else:
            h, first_output = unet.middle_block(h, emb, context), 0
            for fn in after_middle:
                h = fn(h, call)
        for i in range(first_output, len(unet.output_blocks)):
            skip = hs.pop()
            for fn in before_concat:
                h, skip = fn(i, h, skip, call)
            call.next_skip_size = tuple(hs[-1].shape[2:]) if hs else None
            h = th.cat([h, skip], dim=1)
            h = unet.output_blocks[i](h, emb, context)
            for fn in after_output:
                h = fn(i, h, call)
        h = h.type(x.dtype)
        out = unet.id_predictor(h) if getattr(unet, "predict_codebook_ids", False) else unet.out(h)
        for fn in end:
            out = fn(out, call)
        return out

    forward.__unetmods__ = True  # type: ignore[attr-defined]
    return forward


def foreign_forward(unet: nn.Module) -> Callable[..., Any] | None:
    """A forward another extension installed on the instance (ControlNet does), if any."""
    fn = unet.__dict__.get("forward")
    return None if fn is None or getattr(fn, "__unetmods__", False) else fn


def install_forward(unet: nn.Module, patcher: Patcher, clock: StepClock) -> ForwardHooks:
    """Replace the instance's forward by the hooked one (undone by the patcher)."""
    if foreign_forward(unet) is not None:
        raise Refused("another extension replaced the UNet forward (ControlNet?); this technique needs its own forward")
    if not type(unet).__module__.startswith(("ldm.", "sgm.")) or not hasattr(sys.modules[type(unet).__module__], "timestep_embedding"):
        raise Refused(f"the hooked forward supports the ldm/sgm UNet, not {type(unet).__module__}.{type(unet).__name__}")
    hooks = ForwardHooks()
    patcher.set_attr(unet, "forward", _unet_forward(unet, hooks, clock), "forward")
    return hooks
