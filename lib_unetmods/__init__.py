"""sd-webui-unetmods backend: training-free UNet modifications, usable without the WebUI."""
from .apply import Applied, ApplyContext, apply_mods
from .clock import StepClock
from .patcher import restore_all, restore_model
from .settings import Settings, SettingsError

__all__ = ["Applied", "ApplyContext", "apply_mods", "StepClock", "restore_all", "restore_model", "Settings", "SettingsError"]
