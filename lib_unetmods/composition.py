"""Which techniques can run together: one table, read by apply_mods and the README.

A rule looks at the settings and the model and, where two techniques clash, turns the loser
(or one of its parameters) off and says so. Rules run in order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .settings import Settings
from .techniques.hypertile import tiled_levels
from .unet_map import SDXL, SDXL_REFINER, UNetMap


@dataclass(frozen=True)
class Rule:
    techniques: tuple[str, str]
    policy: str  # one sentence for the README and the message
    applies: Callable[[Settings, UNetMap], bool]
    resolve: Callable[[Settings], None]


def tome_max_level(values: dict, family: str) -> int:
    """Deepest level ToMe merges: downsampling 2**level <= max_downsample ("auto": 1 for SD1/SD2,
    2 for SDXL, whose first attention level is /2)."""
    md = values["max_downsample"]
    if md == "auto":
        md = 2 if family in (SDXL, SDXL_REFINER) else 1
    return int(math.log2(int(md)))


def _tome_hypertile_overlap(settings: Settings, umap: UNetMap) -> bool:
    ht, tome = settings["hypertile"], settings["tome"]
    if not (tome["merge_attn"] and (ht["first_pass"] or ht["hires"])):
        return False
    return any(level <= tome_max_level(tome, umap.family) for level in tiled_levels(umap, ht["max_depth"]))


def _tome_no_attention_merge(settings: Settings) -> None:
    settings["tome"]["merge_attn"] = False


RULES: tuple[Rule, ...] = (
    Rule(("tome", "hypertile"),
         "ToMe + HyperTile: both would act on the same self-attention layers and tiles of merged tokens are not "
         "spatial, so HyperTile keeps self-attention and ToMe's attention merging (merge_attn) is off; its "
         "cross-attention and MLP merging still apply.",
         _tome_hypertile_overlap, _tome_no_attention_merge),
)


def resolve_conflicts(settings: Settings, umap: UNetMap) -> tuple[Settings, list[str]]:
    settings = settings.copy()
    notes = []
    for rule in RULES:
        a, b = rule.techniques
        if all(t in settings.values and settings[t]["enabled"] for t in (a, b)) and rule.applies(settings, umap):
            rule.resolve(settings)
            notes.append(rule.policy)
    return settings, notes
