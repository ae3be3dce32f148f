"""A small gradio app that mounts the UNet Mods panel as the WebUI does, with the REAL gradio
(3.41.2 or 4.40.0, from .venv-gradio3 / .venv-gradio4) and the A1111 stand-in (lib_unetmods/lab/hosts/webui) for the
WebUI's own modules: the txt2img controls the preview reads (same elem_ids as A1111 1.10 /
Forge, each announced through on_after_component as the WebUI does), the script's ui(), a
loaded model (a tiny ldm UNet of the chosen family) and the infotext paste of the WebUI.

Run it by hand: .venv-gradio4/bin/python tests/ui_app.py [sd15|sd21|sdxl] [port]
"""
from __future__ import annotations

import os
import sys
from typing import Any

# no telemetry or version check: they would try to reach gradio's servers (and their threads can
# keep the process alive at exit on a machine without that network)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402  the real gradio: imported before the stand-in WebUI (which has a gradio stand-in) is on the path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from lib_unetmods.lab.hosts import use_webui_standin  # noqa: E402

use_webui_standin()
assert "lab/hosts/webui" not in gr.__file__.replace(os.sep, "/"), "the gradio stand-in shadows the real gradio"

from modules import infotext_utils, script_callbacks, scripts, shared  # noqa: E402
from modules.ui_components import InputAccordion  # noqa: E402
from sd_model import FakeSDModel  # noqa: E402

from lib_unetmods.lab.random_unets import build_unet  # noqa: E402

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
_script_module: list[Any] = []


def script_module() -> Any:
    """scripts/unetmods.py, loaded once as the WebUI loads it (its callbacks registered once)."""
    if not _script_module:
        _script_module.append(scripts.load_script(os.path.join(ROOT, "scripts", "unetmods.py")))
    return _script_module[0]


def load_model(arch: str) -> None:
    unet = build_unet(arch, "tiny", seed=1)
    shared.sd_model = FakeSDModel(unet, is_sdxl=unet.num_classes is not None)
    script_callbacks.model_loaded_callback(shared.sd_model)


def _announce(component: Any) -> Any:
    script_callbacks.after_component_callback(component, elem_id=component.elem_id)
    return component


def webui_controls() -> dict[str, Any]:
    """The txt2img controls of A1111 1.10's modules/ui.py that the panel reads."""
    with gr.Row():
        steps = _announce(gr.Slider(minimum=1, maximum=150, step=1, value=20, label="Sampling steps", elem_id="txt2img_steps"))
        width = _announce(gr.Slider(minimum=64, maximum=2048, step=8, value=512, label="Width", elem_id="txt2img_width"))
        height = _announce(gr.Slider(minimum=64, maximum=2048, step=8, value=512, label="Height", elem_id="txt2img_height"))
    with InputAccordion(False, label="Hires. fix", elem_id="txt2img_hr") as enable_hr:
        _announce(enable_hr)
        hr_steps = _announce(gr.Slider(minimum=0, maximum=150, step=1, value=0, label="Hires steps", elem_id="txt2img_hires_steps"))
        hr_scale = _announce(gr.Slider(minimum=1.0, maximum=4.0, step=0.05, value=2.0, label="Upscale by", elem_id="txt2img_hr_scale"))
    return {"steps": steps, "width": width, "height": height, "hires": enable_hr, "hr_steps": hr_steps,
            "hr_scale": hr_scale}


def build_app(arch: str = "sd15") -> tuple[gr.Blocks, Any, list[Any], dict[str, Any]]:
    """(app, script, the script's controls, the WebUI controls)."""
    module = script_module()
    load_model(arch)
    with open(os.path.join(ROOT, "style.css")) as f:
        css = f.read()
    with gr.Blocks(css=css, title="UNet Mods panel test") as app:
        webui = webui_controls()
        script = module.UNetModsScript()
        script.is_txt2img, script.is_img2img = True, False
        controls = script.ui(False)
        with gr.Row():
            text = gr.Textbox(label="Generation parameters", elem_id="paste_text", lines=2)
            paste = gr.Button("Paste parameters", elem_id="paste_button")
        fields = [c for c, _ in script.infotext_fields]

        def do_paste(line: str) -> list[Any]:
            """The WebUI's paste: parse the line, call every infotext field, coerce by value type."""
            values = infotext_utils.paste(script.infotext_fields, infotext_utils.parse_generation_parameters(line))
            return [gr.update(value=values[c]) if c in values else gr.update() for c in fields]

        paste.click(fn=do_paste, inputs=[text], outputs=fields)
    return app, script, controls, webui


if __name__ == "__main__":
    demo = build_app(sys.argv[1] if len(sys.argv) > 1 else "sd15")[0]
    demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[2]) if len(sys.argv) > 2 else 7861)
