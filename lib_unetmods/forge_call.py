"""What Forge passes with a UNet call and how it batches a model evaluation, read in one place
(backend/nn/unet.py `IntegratedUNet2DConditionModel.forward`, backend/sampling/sampling_function.py
`calc_cond_uncond_batch` and `sampling_function_inner`, modules/sd_samplers_cfg_denoiser.py,
backend/sampling/condition.py `compile_weighted_conditions`). Every other host passes none of it:
each helper then does nothing.

- `control`: Forge's ControlNet and T2I-Adapter residuals, a dict of lists ("input", "middle",
  "output") that the forward pops and adds in place after each input block, to the middle output
  and to each popped skip; a residual of another size is skipped with a warning.
- `transformer_options["cond_or_uncond"]`: the chunks of the call (1 = uncond, 0 = cond), each a
  copy of the whole batch of images. An evaluation stacks one chunk per AND part (as many parts as
  the image with the fewest has, each weighted by the last image's weight) and, unless the CFG scale
  is 1 (also on A1111's "skip early CFG" / NGMS steps), the uncond chunk; its calls pop them from
  the end: uncond first, then the parts last to first, as many per call as fit in memory. The guided
  result is uncond + s * sum_k w_k (cond_k - uncond) (cond chunks averaged by weight, then scaled
  by the weights' sum), s the CFG scale (`hr_cfg` in the hires pass).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .a1111_call import skips_uncond
from .rows import COND, UNCOND, CallRows, Evaluation, Row


def control_present(kwargs: dict[str, Any]) -> bool:
    """Forge passes residuals (`control`: lists of tensors or None) with this call."""
    control = kwargs.get("control")
    return isinstance(control, dict) and any(t is not None for v in control.values() for t in (v or ()))


def call_sigma(kwargs: dict[str, Any]) -> float | None:
    """The sigma Forge passes with the call (`transformer_options["sigmas"][0]`, what its built-in
    patches compare with their windows); None on another host."""
    options = kwargs.get("transformer_options")
    sigmas = options.get("sigmas") if isinstance(options, dict) else None
    return float(sigmas.reshape(-1)[0]) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else None


def forge_call(kwargs: dict[str, Any]) -> bool:
    """Forge describes this call's chunks (the lab's other hosts and A1111 do not)."""
    options = kwargs.get("transformer_options")
    return isinstance(options, dict) and bool(options.get("cond_or_uncond"))


def chunk_options(options: dict[str, Any], kinds: Sequence[str], batch: int) -> dict[str, Any]:
    """Forge's `transformer_options` for an extra pass over whole chunks of a call of `batch` rows
    (rows of these kinds), so that Forge's own patches see what the pass holds."""
    per = batch // len(options["cond_or_uncond"])
    cond = [i for i, kind in enumerate(kinds) if kind != UNCOND]
    return {**options, "cond_or_uncond": [0 if kind != UNCOND else 1 for kind in kinds[::per]], "cond_indices": cond,
            "uncond_indices": [i for i in range(len(kinds)) if i not in cond]}


def evaluation(parts: Sequence[Sequence[float]], cfg_scale: float, latents: torch.Tensor | None = None) -> Evaluation:
    """The chunks Forge stacks for images whose prompts have these AND weights, in the order its
    calls take them."""
    images, s = len(parts), float(cfg_scale)
    weights = [parts[-1][k] for k in range(min(map(len, parts)))]
    chunks = [] if math.isclose(s, 1.0) else [(UNCOND, 0, 1.0, 1 - s * sum(weights))]
    chunks += [(COND, k, w, s * w) for k, w in reversed(list(enumerate(weights)))]
    return Evaluation([Row(kind, i, part, w, coef) for kind, part, w, coef in chunks for i in range(images)], latents)


def forge_rows(kwargs: dict[str, Any], batch: int, announced: Evaluation | None) -> CallRows | None:
    """The rows of a Forge call: the next chunks of the announced evaluation, or without one, each
    chunk's kind and images alone (weights and coefficients unknown)."""
    chunks = kwargs["transformer_options"]["cond_or_uncond"]
    per = batch // len(chunks)
    kinds = [UNCOND if c == 1 else COND for c in chunks for _ in range(per)]
    if announced is not None:
        return announced.take(batch, kinds)
    return CallRows(tuple(Row(kind, r % per) for r, kind in enumerate(kinds)))


def align_control(kwargs: dict[str, Any], name: str, like: torch.Tensor) -> None:
    """Forge adds `control[name][-1]` to `like` next, in place, and skips a residual of another
    size with a warning: where a hook resized the features (Deep Shrink, RAU-Net), resize the
    residual by nearest first, as sd-webui-controlnet's `aligned_adding` does on A1111."""
    control = kwargs.get("control")
    residuals = control.get(name) if isinstance(control, dict) else None
    if residuals and residuals[-1] is not None and residuals[-1].shape[-2:] != like.shape[-2:]:
        residuals[-1] = F.interpolate(residuals[-1], size=tuple(like.shape[-2:]), mode="nearest")


def evaluation_from(params: Any, opts: Any) -> Evaluation | None:
    """The evaluation Forge's CFGDenoiser announces with its cfg_denoiser callback (params.x: the
    images' latents; its sampler holds the prompts' AND weights); None where a piece is missing."""
    denoiser = getattr(params, "denoiser", None)
    extra = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", None) or {}
    batch = getattr(extra.get("cond"), "batch", None)
    p = getattr(denoiser, "p", None)
    if not batch or p is None or params.text_uncond is None:
        return None
    scale = getattr(p, "hr_cfg", None) if getattr(p, "is_hr_pass", False) else extra.get("cond_scale")
    sigma = params.sigma
    if skips_uncond(int(getattr(denoiser, "step", 0)), getattr(denoiser, "total_steps", None), float(sigma.reshape(-1)[0]),
                    float(extra.get("s_min_uncond") or 0.0), opts, False):
        scale = 1.0  # Forge's CFGDenoiser skips the uncond rows by guiding at scale 1
    if scale is None:
        return None
    return evaluation([[float(c.weight) for c in prompt] for prompt in batch], scale, params.x)
