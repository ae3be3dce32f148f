"""The quality lab's proxy models: real ldm `UNetModel`s trained on lab/shapes.py's one-object
images with v-prediction and SD's scaled-linear schedule, so every technique runs on them
unmodified and their step and sigma windows mean what they mean on SD. Two layouts, so that a
verdict is not one model's:

- `proxy` (proxy.safetensors): SD1.5's block layout shrunk (32 model channels, attention at
  levels 0-2, one transformer block each);
- `proxy_xl` (proxy_xl.safetensors): SDXL's (no attention at level 0, transformer depth 1 and 5
  at levels 1 and 2, SDXL's 2 and 10 halved; an `adm` label input carrying the pooled prompt),
  with 64 channels at its deepest level to stay near 10 MB.

The "latent" is the image itself folded 2x2 into 12 channels (pixel-unshuffle) and normalised;
no VAE. The prompt is three context tokens: a shape, a colour and a position embedding, each with
a learned place; the null token of each (index len(classes)) is the unconditional prompt.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...families import PROXY, PROXY_XL
from ..random_unets import make_sdxl_shaped
from .shapes import COLOURS, POSITIONS, SHAPES

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS = {PROXY: os.path.join(WEIGHTS_DIR, "proxy.safetensors"), PROXY_XL: os.path.join(WEIGHTS_DIR, "proxy_xl.safetensors")}
FOLD = 2  # image pixels per latent pixel (per side)
TRAIN_SIZE = 32  # image side the models are trained at (latent 16)
LATENT_MEAN, LATENT_STD = 0.2, 0.2  # the data's pixel mean and std: the latent has unit variance
CONTEXT_DIM = 64

_COMMON: dict[str, Any] = dict(image_size=TRAIN_SIZE // FOLD, in_channels=3 * FOLD * FOLD, out_channels=3 * FOLD * FOLD,
                               model_channels=32, num_res_blocks=2, num_head_channels=32, use_spatial_transformer=True,
                               transformer_depth=1, context_dim=CONTEXT_DIM, use_checkpoint=False, legacy=False)
UNETS: dict[str, dict[str, Any]] = {
    PROXY: dict(_COMMON, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4]),
    PROXY_XL: dict(_COMMON, attention_resolutions=[4, 2], channel_mult=[1, 2, 2], use_linear_in_transformer=True),
}
SDXL_SHAPE: dict[str, dict[str, Any]] = {PROXY_XL: dict(depth=[0, 1, 5], adm_channels=CONTEXT_DIM)}


@dataclass
class ProxyConfig:
    """The UNet's ldm config and the conditioner's; saved next to the weights."""

    family: str = PROXY
    unet: dict[str, Any] = field(default_factory=lambda: dict(UNETS[PROXY]))
    sdxl_shape: dict[str, Any] | None = None  # per-level transformer depth and adm width, for the SDXL layout
    prediction: str = "v"
    train_size: int = TRAIN_SIZE
    fold: int = FOLD
    latent_mean: float = LATENT_MEAN
    latent_std: float = LATENT_STD

    @classmethod
    def of(cls, family: str) -> "ProxyConfig":
        return cls(family=family, unet=dict(UNETS[family]), sdxl_shape=SDXL_SHAPE.get(family))


class Conditioner(nn.Module):
    """(shape, colour, position) class indices -> three context tokens; index len(classes) of
    each is its null token (the unconditional prompt)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = nn.Embedding(len(SHAPES) + 1, dim)
        self.colour = nn.Embedding(len(COLOURS) + 1, dim)
        self.position = nn.Embedding(len(POSITIONS) + 1, dim)
        self.place = nn.Parameter(torch.randn(3, dim) * 0.02)

    def forward(self, shape: torch.Tensor, colour: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.shape(shape), self.colour(colour), self.position(position)], dim=1) + self.place

    def null(self, n: int) -> torch.Tensor:
        full = lambda k: torch.full((n,), k, device=self.place.device)  # noqa: E731
        return self(full(len(SHAPES)), full(len(COLOURS)), full(len(POSITIONS)))


class Proxy(nn.Module):
    def __init__(self, config: ProxyConfig | None = None) -> None:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        super().__init__()
        self.config = config or ProxyConfig()
        self.unet = UNetModel(**self.config.unet)
        if self.config.sdxl_shape:
            make_sdxl_shaped(self.unet, tuple(self.config.sdxl_shape["depth"]), self.config.sdxl_shape["adm_channels"])
        self.cond = Conditioner(self.config.unet["context_dim"])

    def y(self, context: torch.Tensor) -> torch.Tensor | None:
        """The `adm` input of an SDXL-layout proxy: the pooled prompt (SDXL's pooled text embedding)."""
        return context.mean(1) if self.config.sdxl_shape else None


def to_latent(images: torch.Tensor, config: ProxyConfig) -> torch.Tensor:
    return F.pixel_unshuffle((images - config.latent_mean) / config.latent_std, config.fold)


def to_image(latent: torch.Tensor, config: ProxyConfig) -> torch.Tensor:
    return (F.pixel_shuffle(latent, config.fold) * config.latent_std + config.latent_mean).clamp(0, 1)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(model: Proxy, path: str, meta: dict[str, Any]) -> None:
    """fp16 weights, and beside them (same name, .json) the config, the training record and the checksum."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    record = {"config": asdict(model.config), **meta, "sha256": sha256(path), "bytes": os.path.getsize(path)}
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)


class WeightsError(RuntimeError):
    pass


def load(path: str = WEIGHTS[PROXY], dtype: torch.dtype = torch.float32) -> Proxy:
    """The shipped (or given) weights, checked against the checksum in the .json beside them."""
    from safetensors.torch import load_file

    meta_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(path) or not os.path.isfile(meta_path):
        raise WeightsError(f"{path} or its .json is missing: train them with python -m lib_unetmods.lab.quality.train --model <family>")
    with open(meta_path) as f:
        record = json.load(f)
    if sha256(path) != record["sha256"]:
        raise WeightsError(f"{path} does not match the checksum in {meta_path}")
    model = Proxy(ProxyConfig(**record["config"]))
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(path).items()})
    return model.eval().requires_grad_(False)
