"""Running the script in the WebUI stand-in (lib_unetmods/lab/hosts/webui): the launched script,
runners and processing objects, shared by the test files that drive it."""
import os

import pytest

from lib_unetmods.lab.hosts import use_webui_standin

use_webui_standin()

from modules import processing, script_callbacks, scripts  # noqa: E402
from modules.shared import LAYOUT_DEFAULTS, opts, state  # noqa: E402
from sd_model import FakeSDModel  # noqa: E402

import webui  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "unetmods.py")


@pytest.fixture(scope="module")
def script_module():
    webui.launch("ui", [SCRIPT])
    yield next(d.module for d in scripts.scripts_data if d.path == SCRIPT)
    script_callbacks.script_unloaded_callback()


@pytest.fixture
def xyz_grid(script_module):
    return next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")


@pytest.fixture(autouse=True)
def clean_state():
    from lib_unetmods import ui

    ui._pasted.clear()  # a paste of another test is not this test's generation's
    state.interrupted = state.skipped = False
    opts.token_merging_ratio = opts.token_merging_ratio_hr = 0.0
    vars(opts).update(LAYOUT_DEFAULTS)
    yield
    state.interrupted = state.skipped = False


def make_runner(script_module, forge=False, img2img=False):
    runner = scripts.ScriptRunner([script_module.UNetModsScript()], forge=forge)
    inputs = runner.setup_ui(img2img)
    return runner, inputs


def args_for(settings):
    return [None, *settings.to_args()]


def txt2img(unet, runner, settings_or_args, **kwargs):
    args = settings_or_args if isinstance(settings_or_args, list) else args_for(settings_or_args)
    model = FakeSDModel(unet, is_sdxl=unet.num_classes is not None)
    return processing.StableDiffusionProcessingTxt2Img(model, runner, args, **kwargs)
