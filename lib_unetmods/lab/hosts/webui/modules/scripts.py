"""Stand-in for modules.scripts: the Script base class, scripts_data, and a runner that calls
AlwaysVisible scripts with their slice of the positional args, swallowing (reporting) errors
as the WebUI's ScriptRunner does."""
from __future__ import annotations

import importlib.util
import os
import re
import traceback
from dataclasses import dataclass
from typing import Any

AlwaysVisible = object()
scripts_data: list["ScriptClassData"] = []


@dataclass
class ScriptClassData:
    script_class: type
    path: str
    basedir: str
    module: Any


class Script:
    is_txt2img = False
    is_img2img = False
    args_from = None
    args_to = None
    infotext_fields = None
    paste_field_names = None

    def elem_id(self, item_id: str) -> str:
        need_tabname = self.show(True) == self.show(False)
        tabname = ("img2img_" if self.is_img2img else "txt2img_") if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


def load_script(path: str) -> Any:
    """Load a script file the way the WebUI does (module named after the file)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Script) and obj is not Script:
            scripts_data.append(ScriptClassData(obj, path, os.path.dirname(path), module))
    return module


class ScriptRunner:
    def __init__(self, scripts: list[Script], forge: bool = False) -> None:
        self.alwayson_scripts = scripts
        self.forge = forge
        self.calls: list[str] = []
        self.infotext_fields: list[Any] = []
        self.paste_field_names: list[Any] = []

    def setup_ui(self, is_img2img: bool) -> list[Any]:
        inputs: list[Any] = [None]  # slot 0: the selectable-script dropdown
        for script in self.alwayson_scripts:
            script.is_img2img, script.is_txt2img = is_img2img, not is_img2img
            controls = script.ui(is_img2img)
            script.args_from, script.args_to = len(inputs), len(inputs) + len(controls)
            inputs += controls
            self.infotext_fields += script.infotext_fields or []
            self.paste_field_names += script.paste_field_names or []
        return inputs

    def _run(self, name: str, p: Any, *extra: Any, **kwargs: Any) -> None:
        self.calls.append(name)
        for script in self.alwayson_scripts:
            try:
                getattr(script, name)(p, *extra, *p.script_args[script.args_from:script.args_to], **kwargs)
            except Exception:
                traceback.print_exc()

    def before_process(self, p):
        self._run("before_process", p)

    def process(self, p):
        self._run("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        self._run("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, images, batch_number):
        self._run("postprocess_batch", p, images=images, batch_number=batch_number)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)
