"""Which techniques can run together: one table, read by apply_mods and the README.

A rule looks at the settings and the model and, where two techniques clash, turns the loser
(or one of its parameters) off and says so. Rules run in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .settings import Settings
from .techniques.hidiffusion import msw_level
from .unet_map import UNetMap


@dataclass(frozen=True)
class Rule:
    techniques: tuple[str, str]
    policy: str  # one sentence for the README and the message
    applies: Callable[[Settings, UNetMap], bool]
    resolve: Callable[[Settings], None]


# --- HiDiffusion: its parts yield to the dedicated technique on the same layers -------------

def _msw_level(settings: Settings, umap: UNetMap) -> int | None:
    """The level HiDiffusion's MSW-MSA windows, or None when it is off."""
    return msw_level(umap) if settings["hidiffusion"]["msw_msa"] else None


def _tome_levels(settings: Settings, umap: UNetMap) -> range:
    """Levels ToMe merges at: 2**level <= max_downsample (auto: 1 for SD1/SD2, 2 for SDXL)."""
    value = str(settings["tome"]["max_downsample"])
    factor = (2 if umap.family.startswith("sdxl") else 1) if value == "auto" else int(value)
    return range(factor.bit_length())


def _hypertile_overlaps_msw(settings: Settings, umap: UNetMap) -> bool:
    level = _msw_level(settings, umap)
    return level is not None and level <= int(settings["hypertile"]["max_depth"])


def _tome_overlaps_msw(settings: Settings, umap: UNetMap) -> bool:
    level = _msw_level(settings, umap)
    return level is not None and bool(settings["tome"]["merge_attn"]) and level in _tome_levels(settings, umap)


def _msw_off(settings: Settings) -> None:
    settings["hidiffusion"]["msw_msa"] = False


def _rau_net_off(settings: Settings) -> None:
    settings["hidiffusion"]["rau_net"] = False


HIDIFFUSION_RULES = (
    Rule(("hidiffusion", "deepshrink"),
         "HiDiffusion RAU-Net and Deep Shrink both resize the deep features: Deep Shrink wins, RAU-Net is off "
         "(HiDiffusion's MSW-MSA still runs).",
         lambda s, m: bool(s["hidiffusion"]["rau_net"]), _rau_net_off),
    Rule(("hidiffusion", "hypertile"),
         "HyperTile and HiDiffusion MSW-MSA would both tile the same self-attention layers: HyperTile wins, MSW-MSA is "
         "off (HiDiffusion's RAU-Net still runs).",
         _hypertile_overlaps_msw, _msw_off),
    Rule(("hidiffusion", "tome"),
         "ToMe merges the tokens of the self-attention layers HiDiffusion MSW-MSA windows (out of spatial order): ToMe "
         "wins, MSW-MSA is off (HiDiffusion's RAU-Net still runs).",
         _tome_overlaps_msw, _msw_off),
)

RULES: tuple[Rule, ...] = (*HIDIFFUSION_RULES,)


def resolve_conflicts(settings: Settings, umap: UNetMap) -> tuple[Settings, list[str]]:
    settings = settings.copy()
    notes = []
    for rule in RULES:
        a, b = rule.techniques
        if all(t in settings.values and settings[t]["enabled"] for t in (a, b)) and rule.applies(settings, umap):
            rule.resolve(settings)
            notes.append(rule.policy)
    return settings, notes
