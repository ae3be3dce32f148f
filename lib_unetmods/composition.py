"""Which techniques can run together: one table, read by apply_mods and the README.

A rule looks at the settings and the model and, where two techniques clash, turns the loser
(or one of its parameters) off and says so. Rules run in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .settings import Settings
from .unet_map import UNetMap


@dataclass(frozen=True)
class Rule:
    techniques: tuple[str, str]
    policy: str  # one sentence for the README and the message
    applies: Callable[[Settings, UNetMap], bool]
    resolve: Callable[[Settings], None]


def _turn_off(tid: str, param: str = "enabled") -> Callable[[Settings], None]:
    return lambda settings: settings[tid].__setitem__(param, False)


# ScaleCrafter widens the deep convs' receptive field for a large latent; Deep Shrink and RAU-Net
# instead shrink the deep features back towards the native size in the same early steps. Both
# together would correct the same blocks twice (dilated convs over features already at native
# size), so ScaleCrafter, set up for the image size, keeps the deep blocks; HiDiffusion keeps
# its window attention (MSW-MSA), which touches no conv.
_SCALECRAFTER = (
    Rule(("scalecrafter", "deepshrink"),
         "ScaleCrafter and Deep Shrink both correct the deep blocks for the large size (dilating vs shrinking): "
         "Deep Shrink is turned off while ScaleCrafter is on.",
         lambda settings, umap: True, _turn_off("deepshrink")),
    Rule(("scalecrafter", "hidiffusion"),
         "ScaleCrafter and HiDiffusion's RAU-Net both correct the deep blocks for the large size (dilating vs resizing): "
         "RAU-Net is turned off while ScaleCrafter is on; MSW-MSA stays.",
         lambda settings, umap: bool(settings["hidiffusion"].get("rau_net")), _turn_off("hidiffusion", "rau_net")),
)

RULES: tuple[Rule, ...] = (*_SCALECRAFTER,)


def resolve_conflicts(settings: Settings, umap: UNetMap) -> tuple[Settings, list[str]]:
    settings = settings.copy()
    notes = []
    for rule in RULES:
        a, b = rule.techniques
        if all(t in settings.values and settings[t]["enabled"] for t in (a, b)) and rule.applies(settings, umap):
            rule.resolve(settings)
            notes.append(rule.policy)
    return settings, notes
