"""One-click stacks: settings for several techniques at once, per model family.

A stack is plain data, name -> family -> technique -> parameters (everything else at its
default); `stack_settings` turns one into the {technique: {param: value}} dict the API and
`Settings.update_from_dict` take. Every stack passes the composition rules without a rule firing
(tests/test_stacks.py), so what runs is exactly what is listed here.

"fast" is the quickest combination found for high resolution (README, "Speed stack"): DeepCache
skips the deep blocks on most steps, and HiDiffusion makes the full steps cheaper (MSW-MSA windows
the full-resolution self-attention at every step; RAU-Net shrinks the deep features in the early
steps above the native size, which also keeps large images free of duplicated subjects).
DeepCache's level 0 stays above RAU-Net's first resized block, so no rule touches either.
HyperTile or ToMe would clash with MSW-MSA on the same self-attention layers.
DeepCache runs one full step in three, uniform, on every family, as the reference's SDXL demo
does; SD2.1 was reported to distort at longer intervals (horseee/DeepCache#27). The quality lab
kept it (README, "Quality lab"): at 2x on both lab models the stack moves HiDiffusion's picture
about as much as halving the steps does, and one in four moves the SDXL-layout model's twice as much.
"""
from __future__ import annotations

import copy
from typing import Any

from .families import SD1, SD2, SDXL, ByFamily

_HIDIFFUSION = {"rau_net": True, "msw_msa": True, "auto": True}
_FAST = {"deepcache": {"interval": 3, "level": 0, "schedule": "uniform"}, "hidiffusion": _HIDIFFUSION}

STACKS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "fast": ByFamily({SD1: _FAST, SD2: _FAST, SDXL: _FAST}),
}


def stack_settings(name: str, family: str) -> dict[str, dict[str, Any]]:
    """The stack's {technique: {param: value}} for a model family, each technique enabled.
    Raises ValueError naming the valid choices for an unknown stack or family."""
    stack = STACKS.get(str(name).strip().lower())
    if stack is None:
        raise ValueError(f"unknown stack {name!r} (known: {', '.join(STACKS)})")
    if family not in stack:
        raise ValueError(f"stack {name!r} has no settings for the {family} family (has: {', '.join(stack)})")
    return {tid: {**copy.deepcopy(params), "enabled": True} for tid, params in stack[family].items()}
