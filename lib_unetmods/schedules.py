"""The noise schedule and step counts that hooks and the schedule preview both ask for.

SD1, SD2 and SDXL share one training schedule (scaled-linear betas 0.00085..0.012 over 1000
steps); a UNet call's timestep or sigma is placed on it here, and the number of sampler steps a
pass will run is worked out here, for the WebUI's processing object.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


TRAIN_ALPHAS_CUMPROD = _alphas_cumprod()
TRAIN_SIGMAS = ((1 - TRAIN_ALPHAS_CUMPROD) / TRAIN_ALPHAS_CUMPROD) ** 0.5  # SD's 1000 training sigmas


def sigma_to_t(sigma: float) -> float:
    """The training timestep nearest to `sigma` (in log sigma)."""
    return float(torch.argmin((TRAIN_SIGMAS.log() - math.log(sigma)).abs()))


def pass_steps(p: Any, hires: bool, fix_steps: bool = False) -> int:
    """The steps the sampler will run in this pass (the cfg callback corrects it if it differs).
    img2img runs t_enc + 1 steps, t_enc = int(strength * steps), unless the steps are fixed."""
    if hires:
        return int(getattr(p, "hr_second_pass_steps", 0) or p.steps)
    strength = getattr(p, "denoising_strength", None)
    if getattr(p, "init_images", None) and strength is not None and not fix_steps:
        return int(min(strength, 0.999) * p.steps) + 1
    return int(p.steps)
