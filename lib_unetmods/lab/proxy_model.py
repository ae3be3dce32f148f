"""The quality lab's proxy model: a real ldm `UNetModel` in SD1.5's block layout, shrunk
(32 model channels, 12 latent channels at 1/2 of the image side), trained on lab/shapes.py's
one-object images with v-prediction and SD's scaled-linear schedule, so every technique runs on it
unmodified and its step and sigma windows mean what they mean on SD.

The "latent" is the image itself folded 2x2 into 12 channels (pixel-unshuffle) and normalised;
no VAE. Conditioning is two context tokens: a shape embedding and a colour embedding, each with
a learned position; the null token of each (index len(classes)) is the unconditional prompt.
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

from .shapes import COLOURS, SHAPES

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
WEIGHTS = os.path.join(WEIGHTS_DIR, "proxy.safetensors")
CONFIG = os.path.join(WEIGHTS_DIR, "proxy.json")
FOLD = 2  # image pixels per latent pixel (per side)
TRAIN_SIZE = 32  # image side the model is trained at (latent 16)
LATENT_MEAN, LATENT_STD = 0.2, 0.2  # the data's pixel mean and std: the latent has unit variance


@dataclass
class ProxyConfig:
    """The UNet's ldm config and the conditioner's; saved next to the weights."""

    unet: dict[str, Any] = field(default_factory=lambda: dict(
        image_size=TRAIN_SIZE // FOLD, in_channels=3 * FOLD * FOLD, out_channels=3 * FOLD * FOLD, model_channels=32,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=32,
        use_spatial_transformer=True, transformer_depth=1, context_dim=64, use_checkpoint=False, legacy=False))
    prediction: str = "v"
    train_size: int = TRAIN_SIZE
    fold: int = FOLD
    latent_mean: float = LATENT_MEAN
    latent_std: float = LATENT_STD


class Conditioner(nn.Module):
    """(shape, colour) class indices -> two context tokens; index len(classes) is the null token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.shape = nn.Embedding(len(SHAPES) + 1, dim)
        self.colour = nn.Embedding(len(COLOURS) + 1, dim)
        self.position = nn.Parameter(torch.randn(2, dim) * 0.02)

    def forward(self, shape: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.shape(shape), self.colour(colour)], dim=1) + self.position

    def null(self, n: int) -> torch.Tensor:
        device = self.position.device
        return self(torch.full((n,), len(SHAPES), device=device), torch.full((n,), len(COLOURS), device=device))


class Proxy(nn.Module):
    def __init__(self, config: ProxyConfig | None = None) -> None:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        super().__init__()
        self.config = config or ProxyConfig()
        self.unet = UNetModel(**self.config.unet)
        self.cond = Conditioner(self.config.unet["context_dim"])


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


def load(path: str = WEIGHTS, dtype: torch.dtype = torch.float32) -> Proxy:
    """The shipped (or given) weights, checked against the checksum in the .json beside them."""
    from safetensors.torch import load_file

    meta_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(path) or not os.path.isfile(meta_path):
        raise WeightsError(f"{path} or its .json is missing: train them with python -m lib_unetmods.lab.train_proxy")
    with open(meta_path) as f:
        record = json.load(f)
    if sha256(path) != record["sha256"]:
        raise WeightsError(f"{path} does not match the checksum in {meta_path}")
    model = Proxy(ProxyConfig(**record["config"]))
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(path).items()})
    return model.eval().requires_grad_(False)
