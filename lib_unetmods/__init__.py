"""sd-webui-unetmods backend: training-free UNet modifications, usable without the WebUI.

The names below load on first use, so that `python -m lib_unetmods.bench --help` does not
import torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Applied": "apply", "ApplyContext": "apply", "apply_mods": "apply", "StepClock": "clock",
    "restore_all": "patcher", "restore_model": "patcher", "Settings": "settings", "SettingsError": "settings",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
