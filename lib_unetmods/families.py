"""The model families the techniques know: SD1, SD2, SDXL, the SDXL refiner, and the quality
lab's two proxy models (lib_unetmods/lab/proxy_model.py), declared in one place.

A family's `layout` names the family whose block layout, reference tables and recommended values
apply to it: itself for the SD families; SD1 for `proxy`, an SD1.5-layout UNet shrunk, and SDXL
for `proxy_xl`, an SDXL-layout one (both 32 channels, 12 latent channels, trained at a 16x16
latent). Tables keyed by family are read through
`ByFamily`, so a family without its own entry uses its layout's, and sizes relative to the
training size (HiDiffusion's thresholds, ScaleCrafter's native size) come from `native_side`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SD1, SD2, SDXL, SDXL_REFINER, PROXY, PROXY_XL = "sd1", "sd2", "sdxl", "sdxl_refiner", "proxy", "proxy_xl"
PIXELS_PER_LATENT = 8  # the SD VAE's factor: sizes in pixels shown to users are latent sizes x 8


@dataclass(frozen=True)
class Family:
    id: str
    title: str
    layout: str  # the family whose block layout and reference tables apply
    native_side: int  # latent side of the training size
    latent_channels: int


FAMILIES: dict[str, Family] = {f.id: f for f in (
    Family(SD1, "SD1", SD1, 64, 4),
    Family(SD2, "SD2", SD2, 96, 4),
    Family(SDXL, "SDXL", SDXL, 128, 4),
    Family(SDXL_REFINER, "SDXL refiner", SDXL_REFINER, 128, 4),
    # Its 12 latent channels are the image folded 2x2, not SD's VAE channels: CD Tuner's latent
    # shift and colour map, written for SD's 4 channels, have no meaning on it (they skip, saying so).
    Family(PROXY, "quality-lab proxy (SD1 layout)", SD1, 16, 12),
    Family(PROXY_XL, "quality-lab proxy (SDXL layout)", SDXL, 16, 12),
)}


def layout(family: str) -> str:
    return FAMILIES[family].layout if family in FAMILIES else family


def is_sdxl(family: str) -> bool:
    """Laid out like SDXL (its refiner and the lab's SDXL-layout proxy included): SDXL's block
    names, no attention at full resolution."""
    return layout(family) in (SDXL, SDXL_REFINER)


def native_side(family: str) -> int:
    """Latent side of the family's training size (SD1's for an unknown family)."""
    return FAMILIES.get(family, FAMILIES[SD1]).native_side


def title(family: str) -> str:
    return FAMILIES[family].title if family in FAMILIES else family


def derived_family(layout_family: str, latent_channels: int) -> str | None:
    """A family laid out like `layout_family`, recognised by its latent channels (the proxies' 12)."""
    return next((f.id for f in FAMILIES.values()
                 if f.layout != f.id and f.layout == layout_family and f.latent_channels == latent_channels), None)


class ByFamily(dict):
    """A table keyed by family in which a family without its own entry reads its layout's."""

    def __missing__(self, family: str) -> Any:
        if layout(family) != family:
            return self[layout(family)]
        raise KeyError(family)

    def __contains__(self, family: object) -> bool:
        return dict.__contains__(self, family) or (isinstance(family, str) and dict.__contains__(self, layout(family)))

    def get(self, family: str, default: Any = None) -> Any:
        return self[family] if family in self else default
