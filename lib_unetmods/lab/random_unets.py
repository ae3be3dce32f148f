"""Real ldm UNets (from `stable-diffusion-sdkit`) with random weights, for the benchmark and tests.

A freshly built ldm UNet has zero-initialised output convs (`zero_module`), so it outputs zeros
and every block is an identity: `randomize` re-initialises every parameter. The SDXL-shaped UNet
is assembled from the same ldm blocks (sgm is not on PyPI): per-level transformer depth, no
attention at the first level, an `adm` label embedding of width 2816.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("sd15", "sd21", "sdxl")

_FULL: dict[str, dict[str, Any]] = {
    "sd15": dict(model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_heads=8,
                 context_dim=768),
    "sd21": dict(model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_head_channels=64,
                 context_dim=1024, use_linear_in_transformer=True),
    "sdxl": dict(model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_head_channels=64,
                 context_dim=2048, use_linear_in_transformer=True),
}
_TINY: dict[str, dict[str, Any]] = {
    "sd15": dict(model_channels=32, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_heads=2,
                 context_dim=64),
    "sd21": dict(model_channels=32, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_head_channels=16,
                 context_dim=96, use_linear_in_transformer=True),
    "sdxl": dict(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_head_channels=16,
                 context_dim=64, use_linear_in_transformer=True),
}
SDXL_DEPTH = {"full": (0, 2, 10), "tiny": (0, 1, 2)}  # transformer depth per level
ADM_CHANNELS = 2816


def context_dim(arch: str, size: str = "full") -> int:
    return (_FULL if size == "full" else _TINY)[arch]["context_dim"]


def build_unet(arch: str = "sd15", size: str = "full", seed: int = 0, in_channels: int = 4) -> nn.Module:
    """An ldm UNetModel of the given architecture ("sd15", "sd21", "sdxl"), size "full" (the
    real config) or "tiny" (32 model channels, same block layout), with random weights;
    `in_channels` 8 for an edit model (instruct-pix2pix: the image latent concatenated to x)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    config = dict((_FULL if size == "full" else _TINY)[arch])
    unet = UNetModel(image_size=32, in_channels=in_channels, out_channels=4, num_res_blocks=2, use_spatial_transformer=True,
                     transformer_depth=1, use_checkpoint=False, legacy=False, **config)
    if arch == "sdxl":
        make_sdxl_shaped(unet, SDXL_DEPTH[size], ADM_CHANNELS)
    randomize(unet, seed)
    return unet.eval().requires_grad_(False)


def make_sdxl_shaped(unet: nn.Module, depth: tuple[int, ...], adm_channels: int) -> None:
    """Turn an ldm UNetModel built without attention at level 0 into SDXL's shape: `depth[level]`
    transformer blocks in each SpatialTransformer, and an `adm` label embedding of `adm_channels`
    (sgm's `num_classes="sequential"`)."""
    def deepen(block: nn.Module, level: int) -> None:
        for m in block.modules():
            if isinstance(m, _base_transformer_class()):
                set_transformer_depth(m, depth[level])

    level = 0
    for block in unet.input_blocks:
        deepen(block, level)
        level += any(type(m).__name__ == "Downsample" for m in block.modules())
    deepen(unet.middle_block, level)
    for block in unet.output_blocks:
        deepen(block, level)
        level -= any(type(m).__name__ == "Upsample" for m in block.modules())
    embed = unet.model_channels * 4
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_channels, embed), nn.SiLU(), nn.Linear(embed, embed)))


def _base_transformer_class() -> type:
    from ldm.modules.attention import SpatialTransformer

    return SpatialTransformer


@functools.lru_cache(maxsize=None)
def _deep_transformer_class() -> type:
    base = _base_transformer_class()

    class SpatialTransformer(base):  # sgm's class name, which the UNet map (and hosts' code) look for
        """sgm's behaviour: one context shared by every transformer block of the stack."""

        def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            return super().forward(x, context)

    return SpatialTransformer


def set_transformer_depth(transformer: nn.Module, depth: int) -> None:
    """Give a SpatialTransformer `depth` blocks (sgm-style shared context), keeping its first."""
    transformer.__class__ = _deep_transformer_class()
    first = transformer.transformer_blocks[0]
    inner, heads = first.attn1.to_q.out_features, first.attn1.heads
    blocks = [first] + [type(first)(inner, heads, inner // heads, context_dim=first.attn2.to_k.in_features, checkpoint=False)
                        for _ in range(depth - 1)]
    transformer.transformer_blocks = nn.ModuleList(blocks)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every parameter (norms too: weight 1 + N(0, 0.1), bias N(0, 0.1)) without
    touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
            elif isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                m.reset_parameters()
    return model


def example_inputs(unet: nn.Module, batch: int = 2, height: int = 64, width: int = 64, seed: int = 0,
                   tokens: int = 77) -> dict[str, torch.Tensor | None]:
    """x, timesteps, context (and y for SDXL) for one UNet call, from a private generator."""
    g = torch.Generator().manual_seed(seed)
    ctx_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
    device = next(unet.parameters()).device
    y = torch.randn(batch, ADM_CHANNELS, generator=g) if unet.num_classes is not None else None
    inputs = {
        "x": torch.randn(batch, 4, height, width, generator=g),
        "timesteps": torch.full((batch,), 500.0),
        "context": torch.randn(batch, tokens, ctx_dim, generator=g),
        "y": y,
    }
    return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}


def sdpa_forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **kwargs: Any) -> torch.Tensor:
    """The attention the WebUI uses by default (its "sdp" optimisation): torch SDPA."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, h = x.shape[0], self.heads
    q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]).to(q.dtype)
    return self.to_out(out)


@contextmanager
def sdpa_attention() -> Iterator[None]:
    """Assign SDPA to ldm's CrossAttention.forward at class level, as the WebUI's optimiser does."""
    from ldm.modules.attention import CrossAttention

    original = CrossAttention.__dict__["forward"]
    CrossAttention.forward = sdpa_forward
    try:
        yield
    finally:
        CrossAttention.forward = original


class _CatResizing:
    """The WebUI's `th` stand-in for openaimodel (A1111 `sd_hijack_unet.TorchHijackForUnet`):
    torch, except that cat nearest-resizes the first tensor to the second's size."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def cat(self, tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(tensors) == 2 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            tensors = [F.interpolate(tensors[0], tensors[1].shape[-2:], mode="nearest"), tensors[1]]
        return torch.cat(tensors, *args, **kwargs)


@contextmanager
def webui_cat_fix() -> Iterator[None]:
    """Let the UNet run on latent sizes that are not a multiple of 2**(levels-1), as the WebUI does."""
    import ldm.modules.diffusionmodules.openaimodel as openaimodel

    original = openaimodel.th
    openaimodel.th = _CatResizing()
    try:
        yield
    finally:
        openaimodel.th = original

