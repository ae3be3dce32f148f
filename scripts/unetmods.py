"""sd-webui-unetmods: the WebUI script. UI values in, settings out, the backend does the rest."""
from __future__ import annotations

from typing import Any

from modules import script_callbacks, scripts, shared

from lib_unetmods import restore_all
from lib_unetmods.host import (STATE_ATTR, Generation, begin_pass, finish_pass, on_cfg_denoiser, record_pass,
                               settings_from, write_infotext)
from lib_unetmods.ui import (build, forget_model, infotext_fields, loaded_model, paste_field_names, remember_component,
                             take_paste_problems, webui_sources)
from lib_unetmods.xyz import find_xyz_module, register

_current: list[Generation] = []  # the generation whose sampling is under way (read by callbacks)


class UNetModsScript(scripts.Script):
    sorting_priority = 15

    def title(self) -> str:
        return "UNet Mods"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        components = build(self.elem_id, webui_sources("img2img" if is_img2img else "txt2img"), loaded_model, is_img2img)
        self.infotext_fields = infotext_fields(components)
        self.paste_field_names = paste_field_names()
        return components

    def before_process(self, p: Any, *args: Any) -> None:
        restore_all()  # whatever a generation that raised left behind

    def process(self, p: Any, *args: Any) -> None:
        generation = Generation(settings_from(p, args))
        setattr(p, STATE_ATTR, generation)
        generation.report(p, [*take_paste_problems(generation.settings), *generation.settings.errors])
        # what was asked for (params.txt is written before sampling); each pass replaces it by what acted
        write_infotext(p, generation.settings.infotext(), generation)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        generation = getattr(p, STATE_ATTR, None)
        if generation is None:  # process() did not run for this p (another script called sampling)
            generation = Generation(settings_from(p, args))
            setattr(p, STATE_ATTR, generation)
        finish_pass(p, generation)  # the pass before (the first pass, before the hires pass)
        x = kwargs.get("x")
        begin_pass(p, generation, tuple(x.shape) if x is not None else None,
                   fix_steps=bool(getattr(shared.opts, "img2img_fix_steps", False)), custom_unet=_custom_unet_active())
        record_pass(p, generation, bool(getattr(p, "is_hr_pass", False)), generation.applied)
        _current[:] = [generation]

    def postprocess_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        self._finish(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        self._finish(p)

    def _finish(self, p: Any) -> None:
        generation = getattr(p, STATE_ATTR, None)
        if generation is not None:
            finish_pass(p, generation)
            generation.restore()
        restore_all()
        _current.clear()


def _custom_unet_active() -> bool:
    try:
        from modules import sd_unet
    except ImportError:
        return False
    return getattr(sd_unet, "current_unet", None) is not None


def _cfg_denoiser(params: Any) -> None:
    on_cfg_denoiser(_current[0] if _current else None, params, shared.opts)


def _register_xyz() -> None:
    """Add our XYZ axes (once per xyz_grid module). At import: the WebUI loads its own scripts,
    xyz_grid among them, before extensions, and with --nowebui it builds the script UIs before
    on_before_ui runs. on_before_ui as well, for a host that loads xyz_grid after us."""
    module = find_xyz_module(scripts.scripts_data)
    if module is not None:
        register(module)


def _unload() -> None:
    restore_all()
    _current.clear()


script_callbacks.on_cfg_denoiser(_cfg_denoiser)
script_callbacks.on_before_ui(_register_xyz)
script_callbacks.on_model_loaded(lambda sd_model: restore_all())
script_callbacks.on_model_loaded(forget_model)
script_callbacks.on_after_component(remember_component)
script_callbacks.on_script_unloaded(_unload)
_register_xyz()
