""""Acted" means changed something (lib_unetmods/acts.py), in the WebUI stand-in: a technique with
nothing to do on this image and model writes no infotext key, says why once (in the messages the
API sees), takes nothing from another technique through a rule, shows as idle in the preview, and
the image is the one without it, bit for bit."""
import pytest
import torch

from webui_run import clean_state, make_runner, script_module, txt2img  # noqa: F401

from lib_unetmods.lab.hosts.controlnet import ControlNetHook
from modules import infotext_utils, processing

from lib_unetmods import Settings
from lib_unetmods.params import MESSAGES_KEY
from lib_unetmods.preview import Image, compute
from lib_unetmods.techniques import SPECS, hidiffusion
from lib_unetmods.unet_map import map_unet


def run(unet, script_module, text, **kwargs):
    runner, _ = make_runner(script_module)
    p = txt2img(unet, runner, Settings.from_text(text, strict=True), **{"steps": 6, "width": 64, "height": 64, **kwargs})
    processed = processing.process_images(p)
    return processed, infotext_utils.parse_generation_parameters(processed.infotexts[0])


def said(params):
    text = params.get(MESSAGES_KEY, "")
    return text.split(" | ") if text else []


def key(tid):
    return SPECS[tid].infotext_key


def idle_said(params, title):
    hits = [m for m in said(params) if m.startswith(f"{title}:") and m.endswith("nothing to do")]
    assert len(hits) == 1, said(params)  # once, and in the messages an API client reads
    return hits[0]


@pytest.fixture
def controlnet(make_unet):
    """An SD1 UNet under sd-webui-controlnet's replaced forward; `active` steers guidance start/end."""
    unet = make_unet("sd15")
    made = []

    def hook(active=lambda: True):
        cn = ControlNetHook(unet, scale=0.5, active=active)
        cn.hook()
        made.append(cn)
        return cn

    yield unet, hook
    for cn in made:
        cn.restore()
    unet.__dict__.pop("forward", None)


def test_deepcache_beside_a_unit_to_the_last_step_writes_no_key(script_module, controlnet):
    unet, hook = controlnet
    hook()
    with_dc, params = run(unet, script_module, "deepcache interval=2")
    alone, _ = run(unet, script_module, "")
    assert torch.equal(with_dc.images[0], alone.images[0])  # every step ran in full
    assert key("deepcache") not in params  # pasting the text does not switch DeepCache on
    assert "ControlNet" in idle_said(params, "DeepCache")


def test_deepcache_after_the_unit_ends_acts_and_keeps_its_key(script_module, controlnet):
    unet, hook = controlnet
    cn = hook(active=lambda: cn.calls <= 2)  # guidance end 1/3: residuals on the first two steps only
    with_dc, params = run(unet, script_module, "deepcache interval=2")
    cn.calls = 0
    alone, _ = run(unet, script_module, "")
    assert params[key("deepcache")] == "interval=2"
    assert not torch.equal(with_dc.images[0], alone.images[0])


@pytest.mark.parametrize("other, untouched", [("tome ratio=0.5", "merge_attn=false"), ("hidiffusion", "msw_msa=false")])
def test_hypertile_with_nothing_to_split_takes_nothing_from_the_other(script_module, make_unet, other, untouched):
    unet = make_unet("sd15")
    both, params = run(unet, script_module, f"hypertile; {other}")
    alone, params_alone = run(unet, script_module, other)
    assert key("hypertile") not in params and "no layer splits" in idle_said(params, "HyperTile")
    tid = other.split()[0]
    assert untouched not in params[key(tid)] and params[key(tid)] == params_alone[key(tid)]
    assert not any("HyperTile" in m and "wins" in m or "ToMe + HyperTile" in m for m in said(params))
    assert torch.equal(both.images[0], alone.images[0])


def test_ndcfg_forced_at_the_native_size_runs_no_extra_pass(script_module, make_unet):
    unet = make_unet("sd15")
    calls = []
    handle = unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        forced, params = run(unet, script_module, "scalecrafter ndcfg=on")
        n_forced = len(calls)
        calls.clear()
        plain, _ = run(unet, script_module, "")
    finally:
        handle.remove()
    assert n_forced == len(calls)  # no unconditional extra pass
    assert key("scalecrafter") not in params and "not above the native" in idle_said(params, "ScaleCrafter")
    assert torch.equal(forced.images[0], plain.images[0])


@pytest.mark.parametrize("text", ["freeu b1=1 b2=1 s1=1 s2=1", "deepshrink factor=1", "tome ratio=0.5 start=0.9 end=0.95"])
def test_neutral_values_write_no_key_and_change_nothing(script_module, make_unet, text):
    unet = make_unet("sd15")
    neutral, params = run(unet, script_module, text)
    plain, _ = run(unet, script_module, "")
    assert not [k for k in params if k.startswith("UNetMods ") and k != MESSAGES_KEY]
    idle_said(params, SPECS[text.split()[0]].title)
    assert torch.equal(neutral.images[0], plain.images[0])


@pytest.mark.parametrize("text", ["deepshrink", "tome ratio=0 hr_ratio=0.5"])
def test_a_pass_a_technique_is_off_in_by_choice_is_never_said(script_module, make_unet, text):
    """Deep Shrink's hires box is off by default, ToMe's first-pass ratio can be 0: each acts in one
    pass, keeps its key, and the other pass says nothing about it."""
    _, params = run(make_unet("sd15"), script_module, text, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2)
    tid = text.split()[0]
    assert key(tid) in params and not [m for m in said(params) if m.startswith(SPECS[tid].title)], said(params)


def test_preview_shows_an_idle_technique_and_no_rule_for_it(make_unet):
    umap = map_unet(make_unet("sd15"))
    preview = compute(Settings.from_text("hypertile; tome ratio=0.5"), Image(width=256, height=256), None, umap)
    row = next(r for r in preview.passes[0].rows if r.technique == "hypertile")
    assert row.acting == 0 and "no layer splits" in row.note and not preview.notes
    # large enough to split: HyperTile acts and the rule takes ToMe's attention merging
    preview = compute(Settings.from_text("hypertile; tome ratio=0.5"), Image(width=1024, height=1024), None, umap)
    assert any(n.startswith("ToMe + HyperTile") for n in preview.notes)


def test_preview_and_run_share_hidiffusion_schedule_with_inpainting(make_unet, monkeypatch):
    """An SDXL inpainting UNet (9 input channels) at 1536: the reference's table turns the
    aggressive RAD stage off for inpainting, so the preview shows no RAD/RAU step, like the run."""
    unet = make_unet("sdxl")
    umap = map_unet(unet)
    settings = Settings.from_text("hidiffusion")
    image = Image(width=1536, height=1536, steps=20)

    def rad_steps():
        rows = compute(settings, image, None, umap).passes[0].rows
        return sum(c.kind == "on" for c in next(r for r in rows if r.label == "RAU-Net RAD/RAU").cells)

    assert rad_steps() > 0
    monkeypatch.setattr(unet, "in_channels", 9)
    assert rad_steps() == 0
    expected = hidiffusion.schedule("sdxl", settings.with_family_values("sdxl")["hidiffusion"], 192, 192, 20, True)
    seen = []
    original = hidiffusion.pass_schedule
    monkeypatch.setattr(hidiffusion, "pass_schedule", lambda *a, **k: seen.append(original(*a, **k)) or seen[-1])
    compute(settings, image, None, umap)
    assert seen and all(s == expected for s in seen)  # the preview asks the one function the run's hook calls


# --- messages of a pasted infotext reach the generation's messages ------------------------------

def paste_and_generate(unet, script_module, line, times=1):
    """As the API's `infotext` field (and a UI paste, then Generate): the paste functions fill the
    script's arguments (modules/api/api.py apply_infotext -> get_field_value), then it generates."""
    runner, inputs = make_runner(script_module)
    script = runner.alwayson_scripts[0]
    pasted = infotext_utils.paste(script.infotext_fields, infotext_utils.parse_generation_parameters(line))
    args = [None] + [pasted.get(c, c.value) for c in inputs[script.args_from:script.args_to]]
    out = []
    for _ in range(times):
        p = txt2img(unet, runner, args, steps=2, width=64, height=64)
        out.append(infotext_utils.parse_generation_parameters(processing.process_images(p).infotexts[0]))
    return out


def test_pasted_problems_reach_the_messages_once(script_module, make_unet):
    first, second = paste_and_generate(make_unet("sd15"), script_module,
                                       'Steps: 2, UNetMods freeu v1: "b1=banana s1=0.5", UNetMods nosuch v1: a=1', times=2)
    assert sum("pasted infotext: freeu.b1" in m and "banana" in m for m in said(first)) == 1
    assert sum("'UNetMods nosuch v1': unknown technique" in m for m in said(first)) == 1
    assert first[key("freeu")] == "s1=0.5"  # the rest applied
    assert not any("pasted infotext" in m for m in said(second))  # the next generation is not blamed for the paste


def test_a_malformed_value_is_named_malformed(script_module, make_unet):
    (params,) = paste_and_generate(make_unet("sd15"), script_module, "Steps: 2, UNetMods freeu v1: ====;;;")
    assert any("freeu: malformed text '====;;;'" in m for m in said(params)), said(params)
    assert not any("unknown parameter ''" in m for m in said(params))
