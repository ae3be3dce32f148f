"""The script in a stand-in of the WebUI (tests/webui): call order, hires pass (A1111 and Forge's
double call), batch count, img2img, interruption, exceptions, infotext, API, XYZ."""
import os
import sys

import pytest
import torch

from webui_run import args_for, clean_state, make_runner, script_module, txt2img, xyz_grid  # noqa: F401

from modules import infotext_utils, processing, script_callbacks, scripts  # noqa: E402
from modules.shared import opts, state  # noqa: E402
from sd_model import FakeSDModel  # noqa: E402

from lib_unetmods import Settings  # noqa: E402
from lib_unetmods.host import STATE_ATTR  # noqa: E402
from lib_unetmods.patcher import ACTIVE  # noqa: E402
from lib_unetmods.settings import arg_layout  # noqa: E402
from lib_unetmods.techniques import SPECS  # noqa: E402
from lib_unetmods.lab.model_state import assert_restored, snapshot  # noqa: E402
from settings_cases import every_param_changed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FREEU = "freeu version=v1 b1=1.3 s1=0.7 b2=1.2 s2=0.5"


def test_ui_builds_one_accordion_per_technique_in_arg_order(script_module):
    runner, inputs = make_runner(script_module)
    script = runner.alwayson_scripts[0]
    controls = inputs[script.args_from:script.args_to]
    assert len(controls) == len(arg_layout())
    accordions = [c for c in controls if type(c).__name__ == "InputAccordion"]
    assert [a.label for a in accordions] == [s.title for s in SPECS.values()]
    labels = [c.label for c in controls]
    assert len(set(labels)) == len(labels), "labels must be unique (ui-config keys, tooltips)"
    assert [c.value for c in controls] == Settings().to_args()
    assert all(c.elem_id.startswith("script_txt2img_unet_mods_") for c in controls)
    # ui() again (the API does this for defaults): the same, with nothing registered twice
    n_callbacks = {k: len(v) for k, v in script_callbacks.callbacks.items()}
    assert [c.value for c in script.ui(False)] == [c.value for c in controls]
    assert {k: len(v) for k, v in script_callbacks.callbacks.items()} == n_callbacks


def test_all_off_is_bit_identical_and_installs_nothing(script_module, make_unet):
    unet = make_unet("sd15")
    runner, _ = make_runner(script_module)
    before = snapshot(unet)
    seen = []
    unet.register_forward_pre_hook(lambda m, a: seen.append("forward" in m.__dict__))
    p = txt2img(unet, runner, Settings(), steps=3, width=64, height=64)
    out = processing.process_images(p).images[0]
    assert seen and not any(seen)
    unet._forward_pre_hooks.clear()
    assert_restored(unet, before)
    reference = txt2img(unet, scripts.ScriptRunner([]), [None], steps=3, width=64, height=64)
    assert torch.equal(processing.process_images(reference).images[0], out)
    assert not any(k.startswith("UNetMods") for k in p.extra_generation_params)


@pytest.mark.parametrize("forge", [False, True])
def test_hires_batches_restore_and_no_stacking(script_module, make_unet, forge):
    unet = make_unet("sd15")
    runner, _ = make_runner(script_module, forge=forge)
    before = snapshot(unet)
    hooks_per_call = []
    unet.register_forward_pre_hook(lambda m, a: hooks_per_call.append(len(ACTIVE[id(m)]) if id(m) in ACTIVE else 0))
    p = txt2img(unet, runner, Settings.from_text(FREEU), steps=3, n_iter=2, batch_size=2, width=64, height=64,
                enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2)
    processed = processing.process_images(p)
    unet._forward_pre_hooks.clear()
    assert_restored(unet, before)
    assert not ACTIVE
    assert runner.calls.count("process_before_every_sampling") == 2 * (3 if forge else 2)
    assert runner.calls.count("postprocess_batch") == 2
    assert len(set(hooks_per_call)) == 1 and hooks_per_call[0] > 0, "patches stacked across passes"
    assert processed.images[0].shape == (2, 4, 12, 12)
    assert "UNetMods freeu v1: " + Settings.from_text(FREEU).infotext()["UNetMods freeu v1"] in processed.infotexts[0]
    off = processing.process_images(txt2img(unet, make_runner(script_module)[0], Settings(), steps=3, n_iter=2,
                                            batch_size=2, width=64, height=64, enable_hr=True, hr_scale=1.5,
                                            hr_second_pass_steps=2))
    assert not torch.equal(off.images[1], processed.images[1])


def test_clock_counts_sampler_steps_with_a_second_order_sampler(script_module, make_unet):
    unet = make_unet("sd15")
    runner, _ = make_runner(script_module)
    steps_seen = []
    unet.register_forward_pre_hook(lambda m, a: steps_seen.append(script_module._current[0].clock.step))
    p = txt2img(unet, runner, Settings.from_text(FREEU), steps=4, width=64, height=64, second_order=True)
    processing.process_images(p)
    assert steps_seen == [0, 0, 1, 1, 2, 2, 3]  # Heun: two UNet calls per step, one on the last
    assert getattr(p, STATE_ATTR).clock.total_steps == 4


def test_img2img_pass_steps(script_module, make_unet):
    unet = make_unet("sd15")
    runner, _ = make_runner(script_module, img2img=True)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    model = FakeSDModel(unet)
    p = processing.StableDiffusionProcessingImg2Img(model, runner, args_for(Settings.from_text(FREEU)), steps=10,
                                                    init_latent=init, denoising_strength=0.5)
    before = snapshot(unet)
    processing.process_images(p)
    assert getattr(p, STATE_ATTR).clock.total_steps == 6  # int(0.5 * 10) + 1, as A1111 runs it
    assert_restored(unet, before)


def test_interrupt_mid_sampling_restores(script_module, make_unet):
    unet = make_unet("sd15")
    runner, _ = make_runner(script_module)
    before = snapshot(unet)
    calls = []

    def interrupt_on_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:
            state.interrupt()

    unet.register_forward_pre_hook(interrupt_on_third_call)
    p = txt2img(unet, runner, Settings.from_text(FREEU), steps=6, n_iter=2, width=64, height=64, enable_hr=True)
    processed = processing.process_images(p)
    unet._forward_pre_hooks.clear()
    assert len(processed.images) == 1 and "postprocess" in runner.calls
    assert_restored(unet, before)


def test_exception_mid_sampling_is_cleaned_up_by_the_next_generation(script_module, make_unet):
    unet = make_unet("sd15")
    runner, _ = make_runner(script_module)
    before = snapshot(unet)

    def fail(module, args):
        raise RuntimeError("out of memory")

    handle = unet.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError):
        processing.process_images(txt2img(unet, runner, Settings.from_text(FREEU), steps=3, width=64, height=64))
    assert "postprocess" not in runner.calls and id(unet) in ACTIVE  # nothing ran the restore yet
    handle.remove()
    off = processing.process_images(txt2img(unet, make_runner(script_module)[0], Settings(), steps=3, width=64, height=64))
    assert_restored(unet, before)
    plain = processing.process_images(txt2img(unet, scripts.ScriptRunner([]), [None], steps=3, width=64, height=64))
    assert torch.equal(off.images[0], plain.images[0])


def test_model_load_and_unload_callbacks_restore(script_module, make_unet):
    from lib_unetmods import StepClock, apply_mods

    unet = make_unet("sdxl")
    before = snapshot(unet)
    apply_mods(unet, Settings.from_text(FREEU), StepClock())
    script_callbacks.model_loaded_callback(object())
    assert_restored(unet, before)


def test_every_parameter_round_trips_through_infotext_and_paste(script_module):
    runner, inputs = make_runner(script_module)
    script = runner.alwayson_scripts[0]
    settings = every_param_changed()
    p = processing.StableDiffusionProcessingTxt2Img(None, runner, args_for(settings))
    script.process(p, *settings.to_args())
    line = processing.create_infotext(p)
    params = infotext_utils.parse_generation_parameters(line)
    pasted = infotext_utils.paste(script.infotext_fields, params)
    controls = inputs[script.args_from:script.args_to]
    assert [pasted[c] for c in controls] == settings.to_args()
    assert Settings.from_infotext(params) == settings


def test_paste_without_our_keys_turns_techniques_off(script_module):
    runner, inputs = make_runner(script_module)
    script = runner.alwayson_scripts[0]
    pasted = infotext_utils.paste(script.infotext_fields, infotext_utils.parse_generation_parameters("Steps: 20, Seed: 1"))
    controls = dict(zip(arg_layout(), inputs[script.args_from:script.args_to]))
    assert {key for key, c in controls.items() if c in pasted} == {(tid, "enabled") for tid in SPECS}
    assert not any(pasted.values())


def test_garbage_infotext_names_the_parameter_and_keeps_the_rest(script_module, capsys):
    runner, inputs = make_runner(script_module)
    script = runner.alwayson_scripts[0]
    params = infotext_utils.parse_generation_parameters('Steps: 20, UNetMods freeu v1: "b1=banana s1=0.5 zz"')
    pasted = infotext_utils.paste(script.infotext_fields, params)
    controls = dict(zip(arg_layout(), inputs[script.args_from:script.args_to]))
    assert pasted[controls[("freeu", "enabled")]] is True
    assert pasted[controls[("freeu", "s1")]] == 0.5
    assert pasted[controls[("freeu", "b1")]] == SPECS["freeu"].param("b1").default
    out = capsys.readouterr().out
    assert "freeu.b1" in out and "banana" in out


def test_api_dict_and_bad_values_do_not_stop_generation(script_module, make_unet):
    unet = make_unet("sd15")
    runner, inputs = make_runner(script_module)
    script = runner.alwayson_scripts[0]
    defaults = [c.value for c in inputs[script.args_from:script.args_to]]
    api_args = [None, {"freeu": {"b1": 1.3, "s1": 0.7, "version": "v1", "b2": "7", "nonsense": 1}}, *defaults[1:]]
    p = txt2img(unet, runner, api_args, steps=2, width=64, height=64)
    processing.process_images(p)
    settings = getattr(p, STATE_ATTR).settings
    assert settings["freeu"]["enabled"] and settings["freeu"]["b1"] == 1.3 and settings["freeu"]["b2"] == 1.6
    messages = " ".join(p.comments)
    assert "freeu.b2" in messages and "outside" in messages and "nonsense" in messages
    positional = [None, *defaults]
    positional[1 + arg_layout().index(("freeu", "enabled"))] = "yes please"
    p = txt2img(unet, runner, positional, steps=2, width=64, height=64)
    processing.process_images(p)
    assert "freeu.enabled" in " ".join(p.comments)


def test_xyz_axes_cells_and_shared_infotext(script_module, xyz_grid, make_unet):
    script_callbacks.before_ui_callback()
    script_callbacks.before_ui_callback()  # registering twice adds nothing
    labels = [a.label for a in xyz_grid.axis_options]
    assert len(labels) == len(set(labels))
    assert "[UNet Mods] FreeU Stage 1 backbone scale (b1)" in labels
    axis = next(a for a in xyz_grid.axis_options if a.label == "[UNet Mods] FreeU Stage 1 backbone scale (b1)")
    with pytest.raises(RuntimeError, match="freeu.b1"):
        xyz_grid.run_cells(None, axis, ["1.1", "9"], lambda pc: None)
    unet = make_unet("sd15")
    runner, _ = make_runner(script_module)
    p = txt2img(unet, runner, Settings(), steps=2, width=64, height=64)
    seen = []

    def run(pc):
        processing.process_images(pc)
        seen.append(dict(pc.extra_generation_params))
        return getattr(pc, STATE_ATTR).settings["freeu"]["b1"]

    assert xyz_grid.run_cells(p, axis, ["1.1", "1.4"], run) == [1.1, 1.4]
    assert [s["UNetMods freeu v1"] for s in seen] == ["b1=1.1", "b1=1.4"]
    enabled = next(a for a in xyz_grid.axis_options if a.label == "[UNet Mods] FreeU enabled")
    p = txt2img(unet, runner, Settings.from_text("freeu b1=1.2"), steps=2, width=64, height=64)
    xyz_grid.run_cells(p, enabled, ["True", "False"], run)
    assert "UNetMods freeu v1" in seen[-2] and "UNetMods freeu v1" not in seen[-1]


def test_webui_token_merging_message(script_module):
    from lib_unetmods.host import webui_token_merging

    p = processing.StableDiffusionProcessingTxt2Img(None, None, [])
    opts.token_merging_ratio_hr = 0.4
    assert webui_token_merging(p, hires=True) == 0.4 and webui_token_merging(p, hires=False) == 0.0


def test_install_py_is_harmless_outside_the_webui():
    import subprocess

    result = subprocess.run([sys.executable, os.path.join(ROOT, "install.py")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "not running inside the WebUI" in result.stdout
