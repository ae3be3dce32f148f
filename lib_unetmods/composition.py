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


RULES: tuple[Rule, ...] = ()


def resolve_conflicts(settings: Settings, umap: UNetMap) -> tuple[Settings, list[str]]:
    settings = settings.copy()
    notes = []
    for rule in RULES:
        a, b = rule.techniques
        if all(t in settings.values and settings[t]["enabled"] for t in (a, b)) and rule.applies(settings, umap):
            rule.resolve(settings)
            notes.append(rule.policy)
    return settings, notes
