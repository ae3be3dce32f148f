"""Stand-ins of the UNet hosts the extension runs on, written from their sources (read, not
copied): sd-webui-controlnet's replaced forward on A1111 (`controlnet`) and Forge's current UNet,
UnetPatcher and sampling batch layout (`forge`). Test-only: never shipped with the extension.
The benchmark imports them from a checkout (`python -m lib_unetmods.bench --host ...`)."""

from typing import Any, Callable

import torch.nn as nn

HOSTS = ("ldm", "forge", "controlnet")


def bench_host(name: str, unet: nn.Module) -> tuple[nn.Module, Callable[..., Any]]:
    """(the UNet to patch, a sampler with `lib_unetmods.lab.sampler.euler_sample`'s signature) for the
    benchmark's --host: "forge" = the same weights as Forge's UNet sampled with Forge's batch layout;
    "controlnet" = sd-webui-controlnet's forward installed, its control inactive (no residuals: with
    residuals DeepCache runs every step in full by design)."""
    from lib_unetmods.lab.sampler import euler_sample

    if name == "ldm":
        return unet, euler_sample
    if name == "controlnet":
        from .controlnet import ControlNetHook

        ControlNetHook(unet, control_model=False).hook()
        return unet, euler_sample
    if name == "forge":
        from . import forge

        fu = forge.forge_unet(unet)
        patcher = forge.UnetPatcher(forge.KModel(fu))

        def sample(_unet: nn.Module, noise: Any, cond: Any, uncond: Any, steps: int, clock: Any, **kw: Any) -> Any:
            return forge.sample(patcher, noise, cond, uncond, steps, clock, **kw)

        return fu, sample
    raise ValueError(f"unknown host {name!r}; choose one of {', '.join(HOSTS)}")
