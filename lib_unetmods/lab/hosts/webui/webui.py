"""Stand-in for the WebUI's start-up (A1111 1.10 webui.py, modules/initialize.py and the API's
default script args): the callbacks are cleared, the scripts loaded (the WebUI's own scripts/,
xyz_grid among them, before the extensions'), then, by launch mode:
- "ui": the on_before_ui callbacks, then the script UIs of both tabs;
- "api" (--api): the same, and the API builds the UIs again for its default script args;
- "nowebui" (--nowebui): the API builds the script UIs first (Api.__init__ creates the UI when
  no scripts are set up), and only then do the on_before_ui callbacks run.
A "Reload UI" is another launch."""
from __future__ import annotations

import os

from modules import script_callbacks, scripts

WEBUI_SCRIPTS = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "xyz_grid.py")]
MODES = ("ui", "api", "nowebui")


def launch(mode: str, extension_scripts: list[str]) -> dict[bool, scripts.ScriptRunner]:
    """Start the stand-in WebUI; returns the script runners by is_img2img."""
    assert mode in MODES, mode
    script_callbacks.clear_callbacks()
    scripts.scripts_data.clear()
    for path in [*WEBUI_SCRIPTS, *extension_scripts]:
        scripts.load_script(path)
    runners = {tab: scripts.ScriptRunner([data.script_class() for data in scripts.scripts_data]) for tab in (False, True)}

    def build_uis() -> None:
        for is_img2img, runner in runners.items():
            runner.setup_ui(is_img2img)

    if mode == "nowebui":
        build_uis()
        script_callbacks.before_ui_callback()
    else:
        script_callbacks.before_ui_callback()
        build_uis()
        if mode == "api":
            for is_img2img, runner in runners.items():
                for script in runner.alwayson_scripts:
                    script.ui(is_img2img)  # init_default_script_args
    return runners
