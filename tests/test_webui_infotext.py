"""What the script says, in the WebUI stand-in: XYZ axes in every launch mode, an infotext that
records what acted in each pass, consistent messages (console, UI, the infotext's messages field
for API clients), paste-back of unknown keys, the API's argument shapes, Send-to, auto values."""
import pytest
import torch

from webui_run import SCRIPT, clean_state, make_runner, script_module, txt2img  # noqa: F401

import gradio
import webui
from modules import infotext_utils, processing, script_callbacks, scripts

from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.composition import PassInfo, resolve_conflicts
from lib_unetmods.forward import Refused
from lib_unetmods.host import STATE_ATTR, ran_infotext
from lib_unetmods.params import MESSAGES_KEY
from lib_unetmods.settings import API_SHAPE, arg_layout
from lib_unetmods.techniques import SPECS, freeu
from lib_unetmods.unet_map import map_unet
from lib_unetmods.xyz import axis_specs


def run(unet, script_module, text_or_args, **kwargs):
    runner, _ = make_runner(script_module)
    args = text_or_args if isinstance(text_or_args, list) else Settings.from_text(text_or_args, strict=True)
    p = txt2img(unet, runner, args, **{"steps": 3, "width": 64, "height": 64, **kwargs})
    processed = processing.process_images(p)
    return p, processed, infotext_utils.parse_generation_parameters(processed.infotexts[0])


def ours(params):
    return {k: v for k, v in params.items() if k.startswith("UNetMods") and k != MESSAGES_KEY}


def messages(params):
    text = params.get(MESSAGES_KEY, "")
    return text.split(" | ") if text else []


# --- XYZ in every launch mode -------------------------------------------------------------

@pytest.fixture
def relaunch():
    """Launch the stand-in as a test wishes; afterwards put back the module's launch."""
    saved = ({k: list(v) for k, v in script_callbacks.callbacks.items()}, list(scripts.scripts_data))
    yield lambda mode: webui.launch(mode, [SCRIPT])
    for name, registered in saved[0].items():
        script_callbacks.callbacks[name][:] = registered
    scripts.scripts_data[:] = saved[1]


@pytest.mark.parametrize("mode", webui.MODES)
def test_xyz_axes_reach_the_grid_once_in_every_launch_mode(relaunch, mode):
    expected = [axis["label"] for axis in axis_specs()]
    for _ in range(2):  # a "Reload UI" launches again
        runners = relaunch(mode)
        for runner in runners.values():
            grid = next(s for s in runner.alwayson_scripts if type(s).__module__ == "xyz_grid.py")
            labels = [o.label for o in grid.current_axis_options]
            assert [label for label in labels if label in expected] == expected
    script_callbacks.before_ui_callback()  # a late on_before_ui adds nothing
    module = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
    labels = [o.label for o in module.axis_options]
    assert len(labels) == len(set(labels)) == len(expected)


def test_xyz_axes_reach_a_grid_loaded_after_the_extension(relaunch):
    """A host that loads xyz_grid after the extensions: the on_before_ui registration adds the axes."""
    relaunch("ui")  # the fixture puts the module's launch back afterwards
    script_callbacks.clear_callbacks()
    scripts.scripts_data.clear()
    for path in [SCRIPT, *webui.WEBUI_SCRIPTS]:
        scripts.load_script(path)
    module = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
    expected = [axis["label"] for axis in axis_specs()]
    assert not [o for o in module.axis_options if o.label in expected]  # not there at import
    script_callbacks.before_ui_callback()
    assert [o.label for o in module.axis_options if o.label in expected] == expected


# --- the infotext records what acted ------------------------------------------------------

def test_scalecrafter_at_native_size_leaves_deep_shrink_alone(script_module, make_unet):
    p, _, params = run(make_unet("sd15"), script_module, "scalecrafter; deepshrink; hidiffusion auto=false")
    said = messages(params)
    assert any(m.startswith("ScaleCrafter:") and m.endswith("nothing to do") for m in said), said
    assert not any("ScaleCrafter and" in m for m in said), "a rule fired for a technique with nothing to do"
    assert set(ours(params)) == {SPECS["deepshrink"].infotext_key, SPECS["hidiffusion"].infotext_key}
    # Deep Shrink wins over RAU-Net: the infotext records RAU-Net off, and pasting it reproduces that
    assert "rau_net=false" in params[SPECS["hidiffusion"].infotext_key]
    assert sum("HiDiffusion runs with MSW-MSA only." in m for m in said) == 1


def test_scalecrafter_above_native_size_switches_the_others_off(make_unet):
    unet_map = map_unet(make_unet("sd15"))
    clock = StepClock()
    clock.start(10)
    settings = Settings.from_text("scalecrafter; deepshrink; hidiffusion", strict=True)
    small, notes_small = resolve_conflicts(settings, unet_map, PassInfo(clock, (1, 4, 64, 64)))
    large, notes_large = resolve_conflicts(settings, unet_map, PassInfo(clock, (1, 4, 128, 128)))
    assert small["deepshrink"]["enabled"] and small["hidiffusion"]["rau_net"] and not notes_small
    assert not large["deepshrink"]["enabled"] and not large["hidiffusion"]["rau_net"]
    assert len(notes_large) == 2  # the two ScaleCrafter rules; Deep Shrink vs RAU-Net has nothing left to do
    assert notes_large[-1].endswith("RAU-Net is turned off while ScaleCrafter acts. HiDiffusion runs with MSW-MSA only.")


def test_messages_do_not_contradict_the_rules(make_unet):
    """HyperTile takes MSW-MSA, Deep Shrink takes RAU-Net: nothing may say "RAU-Net still runs"."""
    unet = make_unet("sd15")
    clock = StepClock()
    clock.start(4)
    settings = Settings.from_text("hypertile tile_size=128; deepshrink; hidiffusion auto=false", strict=True)
    resolved, notes = resolve_conflicts(settings, map_unet(unet), PassInfo(clock, (1, 4, 64, 64)))
    assert not resolved["hidiffusion"]["enabled"]
    assert not any("still runs" in n for n in notes)
    assert notes[-1].endswith("MSW-MSA is off. Nothing is left of HiDiffusion: it is off for this pass.")
    applied = apply_mods(unet, settings, clock, latent_shape=(1, 4, 64, 64))
    applied.restore()
    assert "hidiffusion" not in applied.applied
    assert not any(m.startswith("HiDiffusion:") for m in applied.messages), applied.messages


def test_deepcache_with_nothing_cheap_says_so_once_and_writes_no_key(script_module, make_unet):
    _, _, params = run(make_unet("sd15"), script_module, "deepcache interval=1; freeu")
    said = messages(params)
    assert [m for m in said if m.startswith("DeepCache")] == [
        "DeepCache: no step of this 3-step pass is cheap (interval 1, start/end window); nothing to do"]
    assert set(ours(params)) == {SPECS["freeu"].infotext_key}
    _, _, params = run(make_unet("sd15"), script_module, "deepcache interval=2")
    assert any(m.startswith("DeepCache: only 3 steps") for m in messages(params))
    assert SPECS["deepcache"].infotext_key in params


def test_a_refused_technique_writes_no_key_and_only_its_reason(script_module, make_unet, monkeypatch):
    def warn_then_refuse(ctx, values):
        ctx.warn("about to run")
        raise Refused("not on this host")

    monkeypatch.setattr(freeu, "apply", warn_then_refuse)
    _, _, params = run(make_unet("sd15"), script_module, "freeu; tome ratio=0.5")
    assert messages(params) == ["FreeU skipped: not on this host"]
    assert set(ours(params)) == {SPECS["tome"].infotext_key}


def test_deep_shrink_refused_on_sdxl_block_writes_no_key(script_module, make_unet):
    _, _, params = run(make_unet("sdxl"), script_module, "deepshrink block=11; freeu")
    assert any(m.startswith("Deep Shrink skipped: block 11") for m in messages(params))
    assert set(ours(params)) == {SPECS["freeu"].infotext_key}


def test_hires_pass_is_recorded_by_the_pass_switches(script_module, make_unet):
    unet = make_unet("sd15")
    # Deep Shrink asked for the hires pass, but its window covers no step of that 2-step pass: the
    # infotext says hires=false (the default, so nothing); HyperTile acted in the hires pass only
    _, _, params = run(unet, script_module, "deepshrink hires=true; hypertile tile_size=128 first_pass=false",
                       enable_hr=True, hr_scale=2, hr_second_pass_steps=2, width=128, height=128)
    assert "Deep Shrink: the window covers no step of this 2-step pass; nothing to do" in messages(params)
    assert params[SPECS["deepshrink"].infotext_key] == "default"
    assert params[SPECS["hypertile"].infotext_key] == "first_pass=false tile_size=128"
    ran = {False: {"deepshrink": SPECS["deepshrink"].defaults() | {"enabled": True, "hires": True}}, True: {}}
    assert ran_infotext(ran)[SPECS["deepshrink"].infotext_key] == "default"  # hires=false is the default
    ran = {False: {}, True: {"hypertile": SPECS["hypertile"].defaults() | {"enabled": True}}}
    assert ran_infotext(ran)[SPECS["hypertile"].infotext_key] == "first_pass=false"
    assert ran_infotext({False: {}}) == {}


def test_every_batch_records_what_acted(script_module, make_unet):
    unet = make_unet("sd15")
    p, processed, _ = run(unet, script_module, "freeu; deepcache interval=1", n_iter=2)
    for text in processed.infotexts:
        params = infotext_utils.parse_generation_parameters(text)
        assert set(ours(params)) == {SPECS["freeu"].infotext_key}
        assert len(messages(params)) == len(set(messages(params))) == 1


# --- the messages field for API clients ---------------------------------------------------

def test_messages_reach_the_api_through_the_infotext(script_module, make_unet):
    p, processed, params = run(make_unet("sd15"), script_module, [None, {"freeu": {"b1": 9}, "nosuch": {}}])
    said = messages(params)
    assert [f"[UNet Mods] {m}" for m in said] == list(p.comments) and len(said) == 2
    assert any("freeu.b1" in m for m in said) and any("'nosuch'" in m for m in said)
    assert p.extra_generation_params[MESSAGES_KEY] == params[MESSAGES_KEY]  # info.extra_generation_params
    pasted = Settings.from_infotext(params)
    assert pasted["freeu"]["enabled"] and not pasted.errors  # the messages key is ours, not unknown


@pytest.mark.parametrize("arg", ["tome", "freeu b1=1.3", ["freeu"], None, 7])
def test_api_rejects_other_shapes_than_a_dict(script_module, make_unet, arg):
    runner, inputs = make_runner(script_module)
    script = runner.alwayson_scripts[0]
    defaults = [c.value for c in inputs[script.args_from:script.args_to]]
    p = txt2img(make_unet("sd15"), runner, [None, arg, *defaults[1:]], steps=2, width=64, height=64)
    processing.process_images(p)
    assert list(p.comments) == [f"[UNet Mods] {API_SHAPE}; got {type(arg).__name__} {arg!r}: every technique is off"]
    assert not getattr(p, STATE_ATTR).settings.enabled_ids()


def test_api_positional_values_still_work(script_module, make_unet):
    args = Settings.from_text("tome ratio=0.5").to_args()
    args[0] = "true"  # a JSON client may send the switch as text
    p, _, params = run(make_unet("sd15"), script_module, [None, *args])
    assert not p.comments and SPECS["tome"].infotext_key in params


# --- paste-back -----------------------------------------------------------------------------

def test_unknown_keys_and_versions_are_named_in_console_and_ui(script_module, capsys):
    runner, _ = make_runner(script_module)
    gradio.warnings.clear()
    params = infotext_utils.parse_generation_parameters(
        "Steps: 20, UNetMods nosuch v1: a=1, UNetMods tome v7: ratio=0.5, UNetMods freeu v1: b1=1.2, "
        f'{MESSAGES_KEY}: "FreeU: something"')
    pasted = infotext_utils.paste(runner.infotext_fields, params)
    out = capsys.readouterr().out
    for shown in (out, "\n".join(gradio.warnings)):
        assert "'UNetMods nosuch v1': unknown technique 'nosuch'" in shown
        assert "'UNetMods tome v7': version 7" in shown
        assert MESSAGES_KEY not in shown
    assert len(gradio.warnings) == 2, "each problem once per paste, not once per control"
    controls = dict(zip(arg_layout(), [component for component, _ in runner.infotext_fields]))
    assert pasted[controls[("tome", "enabled")]] is False and pasted[controls[("freeu", "enabled")]] is True


def test_send_to_carries_every_parameter(script_module):
    txt, txt_inputs = make_runner(script_module)
    img, img_inputs = make_runner(script_module, img2img=True)
    sources, targets = infotext_utils.send_to(txt.infotext_fields, img.infotext_fields, txt.paste_field_names)
    n = len(arg_layout())
    assert sources == txt_inputs[1:1 + n] and targets == img_inputs[1:1 + n]
    assert [s.label for s in sources] == [t.label for t in targets]


# --- auto values by model family ------------------------------------------------------------

@pytest.mark.parametrize("arch,family", [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_auto_values_pick_the_family_and_the_infotext_names_them(script_module, make_unet, arch, family):
    _, _, params = run(make_unet(arch), script_module, "freeu auto_values=true b1=2.5; cdtuner auto_values=true d1=5")
    for tid in ("freeu", "cdtuner"):
        spec = SPECS[tid]
        pasted = Settings.from_infotext(params)[tid]
        assert not pasted["auto_values"] and "auto_values" not in params[spec.infotext_key]
        recommended = spec.recommended_values(family)
        assert {k: pasted[k] for k in spec.family_keys()} == {k: recommended[k] for k in spec.family_keys()}
    assert Settings.from_infotext(params)["freeu"]["b1"] != 2.5


def test_auto_values_differ_by_family_and_leave_other_values_alone():
    spec = SPECS["deepshrink"]
    values = spec.defaults() | {"enabled": True, "auto_values": True, "hires": True, "block": 5}
    sd1, sdxl = spec.with_family_values(values, "sd1"), spec.with_family_values(values, "sdxl")
    assert sd1 != sdxl and sd1["block"] == spec.recommended_values("sd1")["block"]
    assert sd1["hires"] is True and not sd1["auto_values"]
    assert spec.with_family_values(values, "sdxl_refiner") == sdxl
    manual = values | {"auto_values": False}
    assert spec.with_family_values(manual, "sdxl") == manual


def test_auto_values_change_the_image(make_unet, make_inputs):
    unet = make_unet("sdxl")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    outs = []
    for text in ("freeu auto_values=true", "freeu"):
        clock = StepClock()
        clock.start(4)
        applied = apply_mods(unet, Settings.from_text(text), clock, latent_shape=tuple(inputs["x"].shape))
        try:
            outs.append(unet(**inputs))
        finally:
            applied.restore()
    assert not torch.equal(*outs)


def test_deepcache_level_is_kept_where_deep_shrink_does_not_act(make_unet):
    """Deep Shrink stays out of the hires pass by default: there DeepCache keeps its level."""
    umap = map_unet(make_unet("sd15"))
    settings = Settings.from_text("deepcache level=5 hires=true; deepshrink block=3", strict=True)
    levels = {}
    for hires in (False, True):
        clock = StepClock()
        clock.start(20, hires=hires)
        resolved, notes = resolve_conflicts(settings, umap, PassInfo(clock, (1, 4, 8, 8)))
        levels[hires] = (resolved["deepcache"]["level"], len(notes))
    assert levels == {False: (2, 1), True: (5, 0)}
