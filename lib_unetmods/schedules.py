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
_LOG_SIGMAS32 = TRAIN_SIGMAS.log().float()


def sigma_to_t(sigma: float) -> float:
    """The training timestep nearest to `sigma` (in log sigma)."""
    return float(torch.argmin((TRAIN_SIGMAS.log() - math.log(sigma)).abs()))


def percent_to_sigma(percent: float) -> float:
    """ComfyUI's and Forge's window edge for a ratio of the sampling: the sigma at timestep
    (1 - percent) * 999, linear in log sigma between the training timesteps around it, in float32
    as Forge's predictor (backend/modules/k_prediction.py) keeps its sigmas; 0 has no upper edge
    (inf), 1 puts the lower edge at 0."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return 0.0
    position = torch.tensor((1.0 - percent) * 999.0)  # float32
    below, above = int(position.floor()), int(position.ceil())
    logs = _LOG_SIGMAS32[[below, above]]
    frac = position - below
    return float(torch.exp((1 - frac) * logs[0] + frac * logs[1]))


def pass_steps(p: Any, hires: bool, fix_steps: bool = False) -> int:
    """The steps the sampler will run in this pass (the cfg callback corrects it if it differs).
    img2img runs t_enc + 1 steps, t_enc = int(strength * steps), unless the steps are fixed."""
    if hires:
        return int(getattr(p, "hr_second_pass_steps", 0) or p.steps)
    strength = getattr(p, "denoising_strength", None)
    if getattr(p, "init_images", None) and strength is not None and not fix_steps:
        return int(min(strength, 0.999) * p.steps) + 1
    return int(p.steps)
