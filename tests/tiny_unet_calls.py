"""Helpers shared by the technique tests: one tiny UNet per architecture, calling it as the WebUI
does (and announcing its rows as A1111 does), a relative difference, another extension's attn1
patch, and PAG's perturbation written out directly (the identity as attention map)."""
import contextlib
import functools
from typing import Iterator

import torch

from lib_unetmods.a1111_call import Layout, evaluation
from lib_unetmods.lab.random_unets import build_unet, sdpa_attention, webui_cat_fix


@functools.lru_cache(maxsize=None)
def unet_of(arch):
    """One tiny UNet per architecture for the whole session: every test restores what it patches."""
    return build_unet(arch, "tiny", seed=1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def announce(clock, images=1, split=False, skip=False):
    """What A1111's cfg_denoiser callback announces for a model evaluation of `images` images with one
    cond and one uncond row each: one call with the cond rows, then the uncond rows (`split`: a call
    each; `skip`: the uncond rows dropped, as NGMS does)."""
    clock.evaluate(evaluation([[1.0]] * images, 7.0, layout=Layout(batch_cond_uncond=not split, skip_uncond=skip)))


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


def identity_map_attention(attn, x, context=None, **_):
    """Attention written out with the identity as attention map (softmax(QK^T) replaced by I)."""
    b, n, _ = x.shape
    heads = attn.heads
    v = attn.to_v(x).view(b, n, heads, -1).transpose(1, 2)
    weights = torch.eye(n).expand(b, heads, n, n)
    out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out(out)


@contextlib.contextmanager
def perturbed(unet, blocks):
    """The self-attention of the blocks' transformers with the identity map while this is on."""
    attns = [m.attn1 for block in blocks for m in block.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for a in attns:
        a.forward = functools.partial(identity_map_attention, a)
    try:
        yield
    finally:
        for a in attns:
            del a.forward
