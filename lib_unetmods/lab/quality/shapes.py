"""The quality lab's data: images with exactly one bright, saturated object (circle, square or
upright triangle, in one of six hue classes) on a dark, slightly tinted plain background, placed
in one of five positions (centre, left, right, top, bottom), drawn from a seed with anti-aliased
signed distances, at any size (the object and its place scale with the image).

The position is part of the prompt because a model cannot place an object from its first level
alone: convolutions there see a few pixels and attention has no notion of where it is, so where
the object goes must come through the deeper, coarser levels (the path the high-resolution and
deep-feature techniques change). A trained model's samples are scored against the same classes
(lab/score.py): how many objects, which colour, which shape, which position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
HUES = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)  # class centres in degrees: red, yellow, green, cyan, blue, magenta
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
HUE_JITTER = 12.0  # degrees either side of the class centre
SIZE_RANGE = (0.26, 0.46)  # side or diameter as a share of the image side
POSITIONS = ("centre", "left", "right", "top", "bottom")
OFFSETS = ((0.0, 0.0), (-0.22, 0.0), (0.22, 0.0), (0.0, -0.22), (0.0, 0.22))  # (x, y) share of the side; y down
POSITION_JITTER = 0.04  # uniform, either side, on both axes (share of the side)


@dataclass
class Batch:
    images: torch.Tensor  # (n, 3, s, s) in [0, 1]
    shape: torch.Tensor  # (n,) index into SHAPES
    colour: torch.Tensor  # (n,) index into COLOURS
    position: torch.Tensor  # (n,) index into POSITIONS


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h in degrees, s and v in [0, 1]: (n, 3) RGB."""
    k = torch.stack([(5 + h / 60) % 6, (3 + h / 60) % 6, (1 + h / 60) % 6], dim=-1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def shape_sdf(kind: torch.Tensor, x: torch.Tensor, y: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of each object on the pixel grid; x, y are
    (n, s, s) offsets from the object's centre, size its side or diameter (n, 1, 1)."""
    circle = torch.sqrt(x ** 2 + y ** 2) - size / 2
    square = torch.maximum(x.abs(), y.abs()) - size / 2
    # upright equilateral triangle of side `size`, centred on its bounding box: the largest of the
    # signed distances to its three edges (exact inside and along the edges, which is what AA needs)
    height = size * math.sqrt(3) / 2
    yt = y - 0.0  # y grows downwards; apex at -height/2, base at +height/2
    base = yt - height / 2
    n1 = (math.sqrt(3) / 2, 0.5)  # outward normals of the two slanted edges
    apex_y = -height / 2
    left = (-x * n1[0] - (yt - apex_y) * n1[1])
    right = (x * n1[0] - (yt - apex_y) * n1[1])
    triangle = torch.maximum(base, torch.maximum(left, right))
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def make_batch(n: int, size: int = 32, generator: torch.Generator | None = None) -> Batch:
    """`n` images of `size` x `size` pixels drawn from `generator`."""
    g = generator
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    shape = torch.randint(0, len(SHAPES), (n,), generator=g)
    colour = torch.randint(0, len(HUES), (n,), generator=g)
    hue = torch.tensor(HUES)[colour] + (rand(n) * 2 - 1) * HUE_JITTER
    fg = hsv_to_rgb(hue % 360, 0.75 + 0.25 * rand(n), 0.85 + 0.15 * rand(n))
    bg = 0.06 + 0.10 * rand(n, 1) + 0.06 * rand(n, 3)  # dark, slightly tinted
    side = (SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * rand(n)) * size
    position = torch.randint(0, len(POSITIONS), (n,), generator=g)
    margin = side / 2 + 1
    centre = size * (0.5 + torch.tensor(OFFSETS)[position] + (rand(n, 2) * 2 - 1) * POSITION_JITTER)
    centre = torch.minimum(torch.maximum(centre, margin[:, None]), size - margin[:, None])
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    x = grid[None, None, :] - centre[:, 0, None, None]
    y = grid[None, :, None] - centre[:, 1, None, None]
    sdf = shape_sdf(shape[:, None, None], x, y, side[:, None, None])
    cover = (0.5 - sdf).clamp(0, 1)[:, None]  # anti-aliased coverage of each pixel
    images = bg[:, :, None, None] * (1 - cover) + fg[:, :, None, None] * cover
    return Batch(images.clamp(0, 1), shape, colour, position)
