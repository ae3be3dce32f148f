"""sd-webui-controlnet's UNet hook on A1111 (scripts/hook.py `UnetHook.hook` / `restore`), as it
behaves for the UNet:

- `hook()` keeps `unet.forward` (the bound class forward when nothing else replaced it) as
  `unet._original_forward` and sets an instance forward: ControlNet's own copy of the ldm loop. It
  runs the control model on x and the hint, calls every block as a module (`module(h, emb,
  context)`, `self.middle_block(...)`, `self.out(...)`), adds one residual to the middle output and
  one to each skip as it is popped (`aligned_adding`: a float 0.0 adds nothing, a tensor of another
  size is resized to the target by nearest), and concatenates with a `cat` that resizes h to the
  skip by nearest when they differ.
- `restore()` assigns `_original_forward` back to `unet.forward`: the UNet is left with its own
  bound class forward as an instance attribute, the leftover the extension must not mistake for
  another extension's forward.

- T2I-Adapters (the same hooked forward, scripts/hook.py): their residuals are added to `h` right
  after input blocks 2, 5, 8, 11 (SD1) or 3, 5, 8 (SDXL, plus one on the middle output), before
  `h` is saved as a skip (`t2i_injection`, `aligned_adding`). `adapter=True` makes this stand-in
  a T2I-Adapter unit: its residuals go there and the ControlNet ones are 0.0.

The control model here is a copy of the UNet's encoder (without its hooks) taken at construction (a ControlNet is a
trained copy of it), fed x plus a fixed hint; its outputs times `scale` are the residuals, and
only while `active()` says so (ControlNet's guidance start/end), else 0.0 floats.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import timestep_embedding


def aligned_adding(base: torch.Tensor, x: Any) -> torch.Tensor:
    if isinstance(x, float):
        return base if x == 0.0 else base + x
    if x.shape[-2:] != base.shape[-2:]:
        x = F.interpolate(x, size=tuple(base.shape[-2:]), mode="nearest")
    return base + x


def resizing_cat(tensors: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    a, b = tensors
    if a.shape[-2:] != b.shape[-2:]:
        a = F.interpolate(a, size=tuple(b.shape[-2:]), mode="nearest")
    return torch.cat([a, b], dim=dim)


class ControlNetHook:
    def __init__(self, unet: nn.Module, scale: float = 1.0, active: Callable[[], bool] = lambda: True, seed: int = 0,
                 control_model: bool = True, adapter: bool = False) -> None:
        """scale 0: residuals of zeros (tensors); control_model False: never active (its forward only);
        adapter: a T2I-Adapter unit (residuals on h after the injection blocks)."""
        self.unet, self.scale, self.adapter = unet, scale, adapter
        self.active = active if control_model else lambda: False
        self.control_model = self._copy_encoder(unet) if control_model else None
        self.hint = torch.randn(1, unet.in_channels, 1, 1, generator=torch.Generator().manual_seed(seed))
        self.calls = 0

    @staticmethod
    def _copy_encoder(unet: nn.Module) -> nn.ModuleDict:
        encoder = copy.deepcopy(unet)  # a separate model: none of the UNet's hooks or instance forwards
        for m in encoder.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            m.__dict__.pop("forward", None)
        parts = {"time_embed": encoder.time_embed, "input_blocks": encoder.input_blocks, "middle_block": encoder.middle_block}
        if getattr(encoder, "label_emb", None) is not None:
            parts["label_emb"] = encoder.label_emb
        return nn.ModuleDict(parts)

    def residuals(self, x: torch.Tensor, timesteps: torch.Tensor, context: Any, y: Any) -> list[Any]:
        n = len(self.unet.input_blocks) + 1
        if not self.active():
            return [0.0] * n
        cm = self.control_model
        emb = cm["time_embed"](timestep_embedding(timesteps, self.unet.model_channels, repeat_only=False))
        if "label_emb" in cm and y is not None:
            emb = emb + cm["label_emb"](y)
        h, outs = x + self.hint.to(x.device), []
        for block in cm["input_blocks"]:
            h = block(h, emb, context)
            outs.append(h * self.scale)
        outs.append(cm["middle_block"](h, emb, context) * self.scale)
        return outs

    def injection_blocks(self) -> list[int]:
        """sd-webui-controlnet's `t2i_injection`: [3, 5, 8] for SDXL, else [2, 5, 8, 11]."""
        return [3, 5, 8] if self.unet.num_classes is not None else [2, 5, 8, 11]

    def split(self, outs: list[Any]) -> tuple[list[Any], list[Any]]:
        """(ControlNet residuals: one per skip and the middle, adapter residuals in injection order)."""
        n = len(outs)
        if not self.adapter:
            return outs, [0.0] * 4
        adapter = [outs[i] for i in self.injection_blocks() if i < n - 1]
        if self.unet.num_classes is not None:
            adapter.append(outs[-1])
        return [0.0] * n, adapter

    def hook(self) -> None:
        unet, outer = self.unet, self

        def forward(self: nn.Module, x: torch.Tensor, timesteps: Any = None, context: Any = None, y: Any = None,
                    **kwargs: Any) -> torch.Tensor:
            outer.calls += 1
            control, adapter = outer.split(outer.residuals(x, timesteps, context, y))
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
            if self.num_classes is not None:
                emb = emb + self.label_emb(y)
            hs, h = [], x
            injection = outer.injection_blocks()
            for i, module in enumerate(self.input_blocks):
                h = module(h, emb, context)
                if i in injection and adapter:
                    h = aligned_adding(h, adapter.pop(0))
                hs.append(h)
            h = self.middle_block(h, emb, context)
            h = aligned_adding(h, control.pop())
            if adapter and self.num_classes is not None:
                h = aligned_adding(h, adapter.pop(0))
            for module in self.output_blocks:
                h = resizing_cat([h, aligned_adding(hs.pop(), control.pop())], dim=1)
                h = module(h, emb, context)
            return self.out(h.type(x.dtype))

        unet._original_forward = unet.forward
        unet.forward = forward.__get__(unet, type(unet))

    def restore(self) -> None:
        if hasattr(self.unet, "_original_forward"):
            self.unet.forward = self.unet._original_forward
            del self.unet._original_forward
