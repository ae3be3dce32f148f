"""Callback registries, called as the WebUI calls them (exceptions are reported, not raised)."""
import traceback
from dataclasses import dataclass
from typing import Any

callbacks: dict[str, list] = {k: [] for k in ("cfg_denoiser", "before_ui", "model_loaded", "script_unloaded", "after_component")}


@dataclass
class CFGDenoiserParams:
    x: Any
    image_cond: Any
    sigma: Any
    sampling_step: int
    total_sampling_steps: int
    text_cond: Any
    text_uncond: Any
    denoiser: Any = None


def clear_callbacks():
    """What the WebUI does before (re)loading the scripts."""
    for registered in callbacks.values():
        registered.clear()


def _run(name, *args, **kwargs):
    for fn in list(callbacks[name]):
        try:
            fn(*args, **kwargs)
        except Exception:
            traceback.print_exc()


def on_cfg_denoiser(fn):
    callbacks["cfg_denoiser"].append(fn)


def on_before_ui(fn):
    callbacks["before_ui"].append(fn)


def on_model_loaded(fn):
    callbacks["model_loaded"].append(fn)


def on_script_unloaded(fn):
    callbacks["script_unloaded"].append(fn)


def on_after_component(fn):
    callbacks["after_component"].append(fn)


def after_component_callback(component, **kwargs):
    """The WebUI calls this for every gradio component it creates (ui.py's and scripts')."""
    _run("after_component", component, **kwargs)


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def before_ui_callback():
    _run("before_ui")


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def script_unloaded_callback():
    _run("script_unloaded")
