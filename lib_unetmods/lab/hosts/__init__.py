"""Stand-ins of the hosts the extension runs on, written from their sources (read, not copied):
sd-webui-controlnet's replaced forward on A1111 (`controlnet`), Forge's current UNet, UnetPatcher
and sampling batch layout (`forge`), and A1111's WebUI itself (`webui/`: its `modules` package,
xyz_grid and start-up, which the extension's script imports as in the real WebUI). The lab's
benchmark (`--host`) and soak run on them, and so do the tests; the WebUI never loads them.
"""

import os
import sys
from typing import Any, Callable

import torch.nn as nn

HOSTS = ("ldm", "forge", "controlnet")
WEBUI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "webui")  # the A1111 stand-in's root


def use_webui_standin() -> None:
    """Put the A1111 stand-in's root on sys.path, as the WebUI's own folder is: `modules`,
    `sd_model`, `webui` and `xyz_grid` then import as the extension's script expects. Refuses
    when another `modules` package (a real WebUI's) is already imported."""
    loaded = sys.modules.get("modules")
    if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "") or "").startswith(WEBUI):
        raise RuntimeError("a WebUI `modules` package is already imported; run the stand-in in its own Python process")
    if WEBUI not in sys.path:
        sys.path.insert(0, WEBUI)


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
