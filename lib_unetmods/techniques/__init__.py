"""The technique registry. The order is the UI order and the order in which hooks run."""
from __future__ import annotations

from types import ModuleType

from . import cdtuner, deepcache, deepshrink, freeu, hidiffusion, hypertile, scalecrafter, tome

TECHNIQUES: tuple[ModuleType, ...] = (tome, hypertile, deepcache, scalecrafter, deepshrink, hidiffusion, freeu, cdtuner,)
SPECS = {module.SPEC.id: module.SPEC for module in TECHNIQUES}
