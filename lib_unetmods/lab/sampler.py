"""A small Euler sampler with classifier-free guidance that drives the step clock as the WebUI
does: cond rows first, then uncond rows, in one UNet batch, announced as A1111 announces them; the
clock advances once per step. Epsilon- or v-predicting UNets; txt2img from noise or img2img from a
latent (hires fix)."""
from __future__ import annotations


import torch
import torch.nn as nn

from ..a1111_call import evaluation
from ..clock import StepClock
from ..schedules import TRAIN_SIGMAS, sigma_to_t


def sd_sigmas(steps: int) -> torch.Tensor:
    """`steps` timesteps spaced evenly from 999 down, as sigmas, then 0."""
    t = torch.linspace(999, 0, steps, dtype=torch.float64).round().long()
    return torch.cat([TRAIN_SIGMAS[t], torch.zeros(1, dtype=torch.float64)]).float()


@torch.no_grad()
def euler_sample(unet: nn.Module, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
                 clock: StepClock, cfg_scale: float = 7.0, y: torch.Tensor | None = None,
                 y_uncond: torch.Tensor | None = None, prediction: str = "eps", init: torch.Tensor | None = None,
                 denoise: float = 1.0) -> torch.Tensor:
    """Sample `steps` Euler steps from `noise` (batch B); every UNet call has 2B rows. With
    `init` (img2img), only the last round(steps * denoise) steps run, from `init` noised to their
    first sigma (A1111's hires fix: the pass's clock counts those steps)."""
    sigmas = sd_sigmas(steps).to(noise.device)
    first = 0 if init is None else steps - max(1, round(steps * denoise))
    x = noise * sigmas[first] + (0 if init is None else init)
    batch = noise.shape[0]
    context = torch.cat([cond, uncond])
    y_in = None if y is None else torch.cat([y, y if y_uncond is None else y_uncond])
    for i in range(first, steps):
        sigma = float(sigmas[i])
        clock.begin_step(i - first, sigma)
        clock.evaluate(evaluation([[1.0]] * batch, cfg_scale, x))
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        t = torch.full((2 * batch,), sigma_to_t(sigma), device=noise.device)
        x_in = torch.cat([x, x]) * c_in
        eps = unet(x_in, t, context=context, y=y_in)
        if prediction == "v":  # the noise the v prediction implies (A1111's CompVisVDenoiser, sigma_data 1)
            eps = (sigma * x_in + eps) * c_in
        eps_c, eps_u = eps.chunk(2)
        eps = eps_u + cfg_scale * (eps_c - eps_u)
        x = x + eps * (float(sigmas[i + 1]) - sigma)
    clock.end_step()
    return x


def karras_sigmas(steps: int, rho: float = 7.0) -> torch.Tensor:
    """k-diffusion's Karras schedule between SD's smallest and largest training sigma, then 0: the
    sigmas' 1/rho-th powers spaced evenly."""
    lo, hi = float(TRAIN_SIGMAS[0]) ** (1 / rho), float(TRAIN_SIGMAS[-1]) ** (1 / rho)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)]).float()
