"""Helpers shared by the technique tests: one tiny UNet per architecture, calling it as the WebUI
does, a relative difference, and another extension's attn1 patch."""
import contextlib
import functools
from typing import Iterator

import torch

from lib_unetmods.lab.random_unets import build_unet, sdpa_attention, webui_cat_fix


@functools.lru_cache(maxsize=None)
def unet_of(arch):
    """One tiny UNet per architecture for the whole session: every test restores what it patches."""
    return build_unet(arch, "tiny", seed=1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def call(unet, inputs):
    """x positionally, as the WebUI calls the UNet (tomesd reads the size from args[0])."""
    kwargs = {"context": inputs["context"]}
    if inputs["y"] is not None:
        kwargs["y"] = inputs["y"]
    with torch.no_grad(), webui_cat_fix(), sdpa_attention():
        return unet(inputs["x"], inputs["timesteps"], **kwargs)


@contextlib.contextmanager
def attn1_patch_of_another_extension(unet: torch.nn.Module) -> Iterator[None]:
    """Forge's attn1_patch (backend/nn/unet.py BasicTransformerBlock) gives self-attention a
    context: every attn1 is called with context = its input while this is on."""
    attn1 = [m for n, m in unet.named_modules() if n.endswith("attn1")]
    handles = [m.register_forward_pre_hook(lambda m, a, k: (a, {**k, "context": a[0]}), with_kwargs=True) for m in attn1]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
