"""Reference packages run next to ours in the benchmark (--compare) and in the parity tests:
tomesd 0.1.3 patched onto the same ldm UNet, and the DeepCache package's SD helper on a diffusers
copy of the same weights. The packages are imported only when used."""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from .random_unets import _FULL, _TINY

TOMESD_OPTIONS = ("ratio", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp")


def unet_call(unet: nn.Module, inputs: dict) -> torch.Tensor:
    """One call with `x` positional, as tomesd's size hook reads it."""
    kwargs = {"y": inputs["y"]} if inputs["y"] is not None else {}
    return unet(inputs["x"], inputs["timesteps"], context=inputs["context"], **kwargs)


@contextmanager
def tomesd_patch(unet: nn.Module, **options: Any) -> Iterator[None]:
    """tomesd.apply_patch on an ldm/sgm UNet (it wants an object with .model.diffusion_model)."""
    import tomesd

    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.diffusion_model = unet
    tomesd.apply_patch(holder, **options)
    try:
        yield
    finally:
        tomesd.remove_patch(holder)


def with_tomesd(unet: nn.Module, inputs: dict, **options: Any) -> torch.Tensor:
    with tomesd_patch(unet, **options):
        return unet_call(unet, inputs)


def tomesd_options(values: dict[str, Any], family: str) -> dict[str, Any]:
    """tomesd's arguments for our ToMe values (auto max downsampling: 2 on SDXL, else 1)."""
    options = {name: values[name] for name in TOMESD_OPTIONS}
    auto = 2 if family == "sdxl" else 1
    options["max_downsample"] = auto if values["max_downsample"] == "auto" else int(values["max_downsample"])
    return options


# --- DeepCache ------------------------------------------------------------------------------

def diffusers_unet(unet: nn.Module, arch: str, size: str) -> nn.Module:
    """The same weights as a diffusers UNet2DConditionModel (exact mapping, SD1.x/SD2.x)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    params = dict(image_size=32, in_channels=4, out_channels=4, num_res_blocks=2, transformer_depth=1,
                  **(_FULL if size == "full" else _TINY)[arch])
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    reference = UNet2DConditionModel(**config)
    reference.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config))
    return reference.eval().requires_grad_(False).to(next(unet.parameters()).device)


class DiffusersAsLdm(nn.Module):
    """Lets the benchmark's sampler drive a diffusers UNet: DeepCache's helper wants the timestep
    0-d and positional (one timestep for all rows, which the sampler uses anyway)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(x, timesteps[0], context).sample


@contextmanager
def deepcache_helper(model: DiffusersAsLdm, timesteps: torch.Tensor, interval: int, branch: int) -> Iterator[None]:
    """DeepCacheSDHelper (uniform schedule) around one sampling run of `timesteps`."""
    from DeepCache import DeepCacheSDHelper

    pipe = types.SimpleNamespace(unet=model.unet, scheduler=types.SimpleNamespace(timesteps=timesteps))
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()
