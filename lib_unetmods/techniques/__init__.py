"""The technique registry. The order is the UI order and the order in which hooks run."""
from __future__ import annotations

from types import ModuleType

from . import cdtuner, deepcache, deepshrink, freeu, hidiffusion, hypertile, pag, scalecrafter, todo, tome

# todo before hypertile: HyperTile's wrapper around attn1 is then the outer one (it tiles first, ToDo
# downsamples the calls it leaves whole); pag last: its identity attention bypasses every inner wrapper
TECHNIQUES: tuple[ModuleType, ...] = (tome, todo, hypertile, deepcache, scalecrafter, deepshrink, hidiffusion, freeu, cdtuner, pag)
SPECS = {module.SPEC.id: module.SPEC for module in TECHNIQUES}
