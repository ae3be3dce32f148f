"""The panel built with the REAL gradio (3.41.2 as in A1111 1.10, 4.40.0 as in Forge) and the
WebUI stand-ins, its events run through gradio's own processing (preprocess, function,
postprocess). Runs in .venv-gradio3 / .venv-gradio4 (dev/test-ui.sh); skipped in .venv, which
has only the gradio stand-in."""
from __future__ import annotations

import asyncio
import math
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
gr = pytest.importorskip("gradio")
if "tests/webui" in gr.__file__.replace(os.sep, "/") or not hasattr(gr, "Blocks"):
    pytest.skip("needs the real gradio (dev/test-ui.sh)", allow_module_level=True)

import ui_app  # noqa: E402

from lib_unetmods.settings import Settings, arg_layout  # noqa: E402
from lib_unetmods.techniques import SPECS  # noqa: E402

ELEM = "script_txt2img_unet_mods_"


@pytest.fixture(scope="module")
def built():
    app, script, controls, webui = ui_app.build_app("sd15")
    return app, controls, webui


def by_elem_id(app, elem_id):
    return next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def dependencies(app, component, trigger):
    """(fn key, dependency) of the events `trigger` on `component` (gradio 3 and 4 configs)."""
    found = []
    for index, dep in enumerate(app.config["dependencies"]):
        targets = dep["targets"]
        if ui_app.GRADIO_MAJOR >= 4:
            hit = [component._id, trigger] in [list(t) for t in targets]
        else:
            hit = component._id in targets and dep.get("trigger") == trigger
        if hit:
            found.append((dep.get("id", index), dep))
    return found


def run(app, component, trigger, values, which=None):
    """Run the (which-th, or only) `trigger` event of `component` with {component: value} for its
    inputs (the component's initial value where not given); returns {output component: data}."""
    deps = dependencies(app, component, trigger)
    deps = [d for d in deps if which is None or which(d[1])]
    assert len(deps) == 1, f"expected one {trigger} event on {component.elem_id}, found {len(deps)}"
    key, dep = deps[0]
    inputs = [app.blocks[i] for i in dep["inputs"]]
    data = [values.get(c, c.value) for c in inputs]
    state = None if ui_app.GRADIO_MAJOR >= 4 else {}
    # a loop of its own: asyncio.run would leave the thread without a current loop, and gradio 4's
    # queue of an app launched later in this process would then get no locks
    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(app.process_api(key, data, state=state))
    finally:
        loop.close()
    return dict(zip((app.blocks[i] for i in dep["outputs"]), result["data"]))


def value_of(update):
    return update["value"] if isinstance(update, dict) else update


def preview_of(outputs):
    (html,) = [value_of(v) for c, v in outputs.items() if c.elem_id == ELEM + "preview"]
    return html


def rows(html, technique):
    return re.findall(rf'data-technique="{technique}"[^>]*>.*?<span class="um-steps">(.*?)</span>', html)


def test_panel_is_built_from_real_gradio_components(built):
    app, controls, _ = built
    assert len(controls) == len(arg_layout())
    assert all(isinstance(c, gr.components.Component) for c in controls)
    panel = by_elem_id(app, ELEM + "panel")
    assert isinstance(panel, gr.Accordion) and panel.label == "UNet Mods"
    summary = by_elem_id(app, ELEM + "summary")
    assert "All techniques off" in summary.value
    assert "No technique acts" in by_elem_id(app, ELEM + "preview").value
    ids = {c["props"].get("elem_id") for c in app.config["components"]}
    assert {ELEM + "reset", ELEM + "preview", ELEM + "summary"} <= ids
    assert all(f"{ELEM}{tid}-checkbox" in ids for tid in SPECS)


def test_ticking_a_box_updates_summary_and_panel_label(built):
    app, controls, _ = built
    boxes = {tid: c for c, (tid, name) in zip(controls, arg_layout()) if name == "enabled"}
    out = run(app, boxes["deepcache"], "change", {boxes["deepcache"]: True, boxes["freeu"]: True},
              which=lambda d: len(d["outputs"]) == 2)
    summary, panel = (out[by_elem_id(app, ELEM + "summary")], out[by_elem_id(app, ELEM + "panel")])
    assert "On: DeepCache, FreeU" in value_of(summary)
    assert panel["label"] == "UNet Mods · On: DeepCache, FreeU"
    out = run(app, boxes["deepcache"], "change", {}, which=lambda d: len(d["outputs"]) == 2)
    assert "All techniques off" in value_of(out[by_elem_id(app, ELEM + "summary")])


@pytest.mark.parametrize("steps", [12, 30])
def test_preview_follows_steps_size_and_hires(built, steps):
    app, controls, webui = built
    values = dict(zip(controls, Settings.from_text("deepcache interval=3; scalecrafter").to_args()))
    values[webui["steps"]] = steps
    out = run(app, webui["steps"], "change", values)
    html = preview_of(out)
    (deepcache,) = rows(html, "deepcache")
    assert deepcache.count("<i ") == steps
    assert deepcache.count('class="um-full"') == math.ceil(steps / 3)
    assert "um-dilate" not in "".join(rows(html, "scalecrafter")) and "nothing to do" in html, "512x512 is SD1's native size"
    values.update({webui["width"]: 1024, webui["height"]: 1024, webui["hires"]: True, webui["hr_steps"]: 8})
    html = preview_of(run(app, webui["width"], "change", values))
    assert re.search(rf'data-pass="hires pass" data-steps="8"', html)
    assert "2048x2048" in html and "um-dilate" in "".join(rows(html, "scalecrafter"))
    assert len(rows(html, "deepcache")) == 1, "DeepCache is first-pass only by default"


def test_every_control_updates_the_preview(built):
    app, controls, webui = built
    for component in controls + list(webui.values()):
        assert any(ELEM + "preview" in [app.blocks[o].elem_id for o in dep["outputs"]]
                   for _, dep in dependencies(app, component, "change")), component.elem_id


def test_reset_all_restores_every_default(built):
    app, controls, _ = built
    out = run(app, by_elem_id(app, ELEM + "reset"), "click", {})
    got = [value_of(out[c]) for c in controls]
    assert got == Settings().to_args()
    presets = [v for c, v in out.items() if c not in controls]
    assert presets and all(value_of(v) == "(custom)" for v in presets)


def test_stack_button_sets_the_stack_and_turns_the_rest_off(built):
    from lib_unetmods.stacks import STACKS, stack_settings
    from lib_unetmods.unet_map import SD1

    app, controls, _ = built
    assert set(STACKS) == {"fast"}
    out = run(app, by_elem_id(app, ELEM + "stack_fast"), "click", {})
    got = Settings.from_args([value_of(out[c]) for c in controls])
    assert got == Settings(stack_settings("fast", SD1))
    assert set(got.enabled_ids()) == set(STACKS["fast"][SD1])
    presets = [v for c, v in out.items() if c not in controls]
    assert presets and all(value_of(v) == "(custom)" for v in presets)


def test_preset_fills_controls(built):
    app, controls, _ = built
    named = dict(zip(arg_layout(), controls))
    dropdown = by_elem_id(app, ELEM + "deepshrink_preset")
    out = run(app, dropdown, "change", {dropdown: "wcde"}, which=lambda d: len(d["outputs"]) > 1)
    for name, value in SPECS["deepshrink"].presets["wcde"].items():
        assert value_of(out[named[("deepshrink", name)]]) == value, name


def test_paste_sets_the_controls(built):
    app, controls, _ = built
    named = dict(zip(arg_layout(), controls))
    text = by_elem_id(app, "paste_text")
    line = "Steps: 20, Sampler: Euler, UNetMods deepcache v1: interval=5 level=1, UNetMods freeu v1: b1=1.3"
    out = run(app, by_elem_id(app, "paste_button"), "click", {text: line})
    assert value_of(out[named[("deepcache", "enabled")]]) is True
    assert value_of(out[named[("deepcache", "interval")]]) == 5
    assert value_of(out[named[("freeu", "b1")]]) == 1.3
    assert value_of(out[named[("tome", "enabled")]]) is False



def test_ui_again_in_a_new_blocks_as_the_api_does(built):
    """A1111's API calls ui() again inside a throwaway gr.Blocks() to read the defaults."""
    app, controls, _ = built
    script = ui_app.script_module().UNetModsScript()
    with gr.Blocks():
        again = script.ui(False)
    assert [c.value for c in again] == Settings().to_args() == [c.value for c in controls]
