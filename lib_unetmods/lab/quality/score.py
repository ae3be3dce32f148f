"""Scores of a one-object image (lab/shapes.py): how many objects, which colour, which shape,
which position.

Objects are the bright pixels (the background is dark, every object bright and saturated), split
into connected components; specks under 1 % of the image are ignored. The largest component
gives the colour (hue of its pixels, nearest class) and the shape: its area against its bounding
box (square ~1, circle ~pi/4, triangle ~1/2), and for the triangle also the mass below its middle;
the centre of its bounding box, against the image's, gives the position.
Checked at 100 % on the generator's own images at every size the lab uses (tests/test_quality_lab.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .shapes import HUES, POSITIONS, SHAPES

BRIGHT = 0.5  # max channel: background <= 0.22, objects >= 0.85
SPECK = 0.01  # components below this share of the image are noise, not objects
CENTRED = 0.11  # offsets are 0 or 0.22 of the side, +-0.04: a centre within this share is "centre"


@dataclass
class Score:
    count: int  # objects found
    colour: int | None  # class index of the largest object (None: no object)
    shape: int | None
    position: int | None


def hue_class(rgb: np.ndarray) -> int:
    """Nearest hue class of an (n, 3) set of pixels, by their mean hue on the circle."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    # hue as an angle: the RGB colour's projection on the chroma plane
    x = r - 0.5 * (g + b)
    y = (np.sqrt(3) / 2) * (g - b)
    angle = np.degrees(np.arctan2(y.sum(), x.sum())) % 360
    gap = np.abs((np.asarray(HUES) - angle + 180) % 360 - 180)
    return int(gap.argmin())


def shape_class(mask: np.ndarray) -> int:
    """Shape of one component (boolean mask): square, circle or upright triangle."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / (h * w)
    lower = (ys > (ys.min() + ys.max()) / 2).mean()  # share of the area below the middle row
    if lower > 0.568:  # generator's images: triangles >= 0.579, the others <= 0.558
        return SHAPES.index("triangle")
    return SHAPES.index("square" if fill > 0.94 else "circle")  # squares fill 1.0, circles <= 0.884


def position_class(mask: np.ndarray) -> int:
    """Where one component (boolean mask) sits: its bounding box's centre against the image's."""
    ys, xs = np.nonzero(mask)
    dy = ((ys.min() + ys.max() + 1) / 2 - mask.shape[0] / 2) / mask.shape[0]
    dx = ((xs.min() + xs.max() + 1) / 2 - mask.shape[1] / 2) / mask.shape[1]
    if max(abs(dx), abs(dy)) < CENTRED:
        return POSITIONS.index("centre")
    if abs(dx) >= abs(dy):
        return POSITIONS.index("left" if dx < 0 else "right")
    return POSITIONS.index("top" if dy < 0 else "bottom")


def score(image: torch.Tensor) -> Score:
    """One (3, H, W) image in [0, 1]."""
    img = image.detach().float().cpu().numpy()
    bright = img.max(axis=0) > BRIGHT
    labels, n = ndimage.label(bright)
    if n == 0:
        return Score(0, None, None, None)
    sizes = ndimage.sum_labels(bright, labels, index=np.arange(1, n + 1))
    objects = [i + 1 for i, s in enumerate(sizes) if s >= SPECK * bright.size]
    if not objects:
        return Score(0, None, None, None)
    largest = max(objects, key=lambda i: sizes[i - 1])
    mask = labels == largest
    return Score(len(objects), hue_class(img[:, mask].T), shape_class(mask), position_class(mask))


def score_batch(images: torch.Tensor) -> list[Score]:
    return [score(im) for im in images]
