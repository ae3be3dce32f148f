"""Sampling a row on a lab model: the seeds' prompts and noise, the project's sampler and
`apply_mods` driven exactly as in the WebUI (txt2img, or the hires-fix path: 1x, the image
upscaled x2, the last half of the steps again at denoise 0.5), and the lab's probes.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...apply import apply_mods
from ...clock import StepClock
from ...settings import Settings
from ..sampler import euler_sample
from . import models
from .rows import Row, Scale
from .shapes import COLOURS, POSITIONS, SHAPES

STEPS = 10  # Euler steps of the default table
CFG = 3.0
HIRES_DENOISE = 0.5


@contextmanager
def no_middle_block(unet: nn.Module) -> Iterator[None]:
    """The middle block's contribution removed: it passes h through unchanged."""
    unet.middle_block.forward = lambda h, *args, **kwargs: h
    try:
        yield
    finally:
        del unet.middle_block.forward


PROBES: dict[str, Callable[[nn.Module], ContextManager[None]]] = {"no middle block": no_middle_block}


def seed_classes(seeds: range | list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed i asks for shape i mod 3, colour (i div 3) mod 6 and position i mod 5."""
    idx = torch.tensor(list(seeds))
    return idx % len(SHAPES), (idx // len(SHAPES)) % len(COLOURS), idx % len(POSITIONS)


def seed_noise(seeds: range | list[int], channels: int, side: int, salt: int = 0) -> torch.Tensor:
    return torch.stack([torch.randn(channels, side, side, generator=torch.Generator().manual_seed(1000 * salt + s))
                        for s in seeds])


def latent_side(scale: Scale, train_side: int) -> int:
    """The latent side of a scale's final image (the hires path ends at 2x)."""
    return train_side * (2 if scale == "hires" else int(scale))


class Lab:
    """One lab model, and the sampling of a chunk of seeds under one row."""

    def __init__(self, model: models.Proxy, steps: int = STEPS, cfg: float = CFG) -> None:
        self.model, self.steps, self.cfg = model, steps, cfg
        self.config = model.config
        self.family = model.config.family
        self.channels = self.config.unet["in_channels"]
        self.train_side = self.config.train_size // self.config.fold

    def settings(self, row: Row) -> Settings:
        text = row.mods_for(self.family)
        return Settings() if text == "none" else Settings.from_text(text, strict=True, family=self.family)

    def steps_of(self, row: Row) -> int:
        return max(1, self.steps // 2) if row.half_steps else self.steps

    def _pass(self, settings: Settings, seeds: range | list[int], noise: torch.Tensor, steps: int, cfg: float,
              messages: set[str], init: torch.Tensor | None = None, base_shape: tuple[int, ...] | None = None,
              hires_planned: bool = False) -> torch.Tensor:
        cond = self.model.cond(*seed_classes(seeds))
        uncond = self.model.cond.null(len(seeds))
        clock = StepClock()
        clock.start(steps if init is None else max(1, round(steps * HIRES_DENOISE)), hires=init is not None)
        applied = apply_mods(self.model.unet, settings, clock, seed=seeds[0], latent_shape=tuple(noise.shape),
                             prediction=self.config.prediction, hires_planned=hires_planned, base_shape=base_shape)
        messages.update(applied.messages)
        try:
            return euler_sample(self.model.unet, noise, cond, uncond, steps, clock, cfg_scale=cfg, y=self.model.y(cond),
                                y_uncond=self.model.y(uncond), prediction=self.config.prediction, init=init,
                                denoise=HIRES_DENOISE)
        finally:
            applied.restore()

    def sample(self, row: Row, seeds: range | list[int], messages: set[str]) -> torch.Tensor:
        """Images (n, 3, H, W) in [0, 1] of `seeds` under `row`."""
        settings, steps = self.settings(row), self.steps_of(row)
        cfg = self.cfg if row.cfg is None else row.cfg
        side = latent_side(1 if row.scale == "hires" else row.scale, self.train_side)
        probe = PROBES[row.probe](self.model.unet) if row.probe else nullcontext()
        with probe:
            latent = self._pass(settings, seeds, seed_noise(seeds, self.channels, side), steps, cfg, messages,
                                hires_planned=row.scale == "hires")
            if row.scale == "hires":
                image = F.interpolate(models.to_image(latent, self.config), scale_factor=2, mode="bicubic").clamp(0, 1)
                latent = self._pass(settings, seeds, seed_noise(seeds, self.channels, 2 * side, salt=1), steps, cfg,
                                    messages, init=models.to_latent(image, self.config), base_shape=tuple(latent.shape))
        return models.to_image(latent, self.config)
