"""What Forge passes with a UNet call, read in one place (backend/nn/unet.py
`IntegratedUNet2DConditionModel.forward`, backend/sampling/sampling_function.py
`calc_cond_uncond_batch`). Every other host passes none of it: each helper then does nothing.

- `control`: Forge's ControlNet and T2I-Adapter residuals, a dict of lists ("input", "middle",
  "output") that the forward pops and adds in place after each input block, to the middle output
  and to each popped skip; a residual of another size is skipped with a warning.
- `transformer_options`: the rows of each chunk (`cond_indices`, `uncond_indices`): uncond chunk
  first in one call, or one call per chunk.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def control_present(kwargs: dict[str, Any]) -> bool:
    """Forge passes residuals (`control`: lists of tensors or None) with this call."""
    control = kwargs.get("control")
    return isinstance(control, dict) and any(t is not None for v in control.values() for t in (v or ()))


def forge_rows(kwargs: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    """(cond rows, uncond rows) from Forge's `transformer_options`, or None on another host."""
    options = kwargs.get("transformer_options")
    if isinstance(options, dict) and "cond_indices" in options:
        return list(options["cond_indices"]), list(options["uncond_indices"])
    return None


def align_control(kwargs: dict[str, Any], name: str, like: torch.Tensor) -> None:
    """Forge adds `control[name][-1]` to `like` next, in place, and skips a residual of another
    size with a warning: where a hook resized the features (Deep Shrink, RAU-Net), resize the
    residual by nearest first, as sd-webui-controlnet's `aligned_adding` does on A1111."""
    control = kwargs.get("control")
    residuals = control.get(name) if isinstance(control, dict) else None
    if residuals and residuals[-1] is not None and residuals[-1].shape[-2:] != like.shape[-2:]:
        residuals[-1] = F.interpolate(residuals[-1], size=tuple(like.shape[-2:]), mode="nearest")
