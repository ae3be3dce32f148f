"""Every technique on every host stand-in (tests/hosts): A1111's ldm/sgm-shaped UNet, A1111 with
sd-webui-controlnet's replaced forward (zero and non-zero residuals, its leftover after restore),
and Forge's UNet with its batch layout (uncond chunk first, or one call per chunk) and `control`.

Same weights and inputs everywhere: a technique must give the A1111 result on every host (float
tolerance) and differ from that host without it, so a host where our hooks were bypassed fails.
Each run also checks the exact restore of the model (and of Forge's UnetPatcher)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lib_unetmods.lab.hosts import forge
from lib_unetmods.lab.hosts.controlnet import ControlNetHook
from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.lab.random_unets import ADM_CHANNELS, build_unet, context_dim
from lib_unetmods.lab.sampler import euler_sample, karras_sigmas, sd_sigmas
from lib_unetmods.techniques.deepshrink import Window, in_sigma_window
from lib_unetmods.lab.model_state import assert_restored, snapshot

STEPS = 4
SIZE = (32, 40)  # latent; every level divides it
# each technique at settings that make it act on this latent within STEPS steps
ACTIVE = {
    "tome": "tome ratio=0.5",
    "hypertile": "hypertile tile_size=128 swap_size=1",  # random tile counts are drawn per UNet call (as the reference): split calls draw others
    "deepcache": "deepcache interval=2",
    "scalecrafter": "scalecrafter level1=2 level2=2 stop=1",
    "ndcfg": "scalecrafter level1=2 level2=2 stop=1 ndcfg=on ndcfg_stop=1",
    "deepshrink": "deepshrink end=0.5",
    "hidiffusion": "hidiffusion auto=false t1=0.5",
    "freeu": "freeu",
    "cdtuner": "cdtuner d1=2 d2=2 con1=1",
    "colour_map": "cdtuner cm_colors=5,-5,-5 cm_stop=2",
    "todo": "todo",
    "pag": "pag",
}
HOSTS = ("a1111", "controlnet", "forge", "forge_split")


def inputs(arch: str, size: tuple[int, int] = SIZE) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(3)
    ctx = context_dim(arch, "tiny")
    sdxl = arch == "sdxl"
    return {"noise": torch.randn(1, 4, *size, generator=g), "cond": torch.randn(1, 8, ctx, generator=g),
            "uncond": torch.randn(1, 8, ctx, generator=g),
            "y": torch.randn(1, ADM_CHANNELS, generator=g) if sdxl else None,
            "y_uncond": torch.randn(1, ADM_CHANNELS, generator=g) if sdxl else None}


_UNETS: dict[str, torch.nn.Module] = {}


def ldm_unet(arch: str) -> torch.nn.Module:
    if arch not in _UNETS:
        _UNETS[arch] = build_unet(arch, "tiny", seed=1)
    return _UNETS[arch]


KOHYA = {"block": 3, "factor": 2.0, "start": 0.0, "end": 0.5, "after_skip": True, "down": "bicubic", "up": "bicubic"}


def forge_kohya_hrfix(patcher, block: int, factor: float, start: float, end: float, after_skip: bool, down: str,
                      up: str) -> None:
    """Forge's built-in Kohya HRFix (extensions-builtin/sd_forge_kohya_hrfix, ComfyUI's
    PatchModelAddDownscale), written out directly: while percent_to_sigma(end) <= the call's
    sigmas[0] <= percent_to_sigma(start) (the predictor's edges), h is shrunk to round(side / factor)
    after input block `block` (before or after its skip is stored); before each concat h is resized
    to the skip when their sizes differ; Forge's own Upsample goes to the next skip's shape."""
    sigma_start, sigma_end = patcher.model.percent_to_sigma(start), patcher.model.percent_to_sigma(end)

    def shrink(h, options):
        if options["block"][1] != block or not sigma_end <= options["sigmas"][0].item() <= sigma_start:
            return h
        return F.interpolate(h, size=(round(h.shape[-2] / factor), round(h.shape[-1] / factor)), mode=down)

    def to_skip(h, hsp, options):
        if h.shape[-2:] != hsp.shape[-2:]:
            h = F.interpolate(h, size=tuple(hsp.shape[-2:]), mode=up)
        return h, hsp

    (patcher.set_model_input_block_patch_after_skip if after_skip else patcher.set_model_input_block_patch)(shrink)
    patcher.set_model_output_block_patch(to_skip)


def kohya_text(v: dict) -> str:
    return (f"deepshrink block={v['block']} factor={v['factor']} start={v['start']} end={v['end']} "
            f"after_skip={v['after_skip']} downscale_method={v['down']} upscale_method={v['up']}")


def run(host: str, arch: str, text: str, control_scale: float = 0.0, control_active=lambda: True,
        messages: list[str] | None = None, idle: bool = False, adapter: bool = False,
        kohya: dict | None = None, size: tuple[int, int] = SIZE, layout: str = "cfg", steps: int = STEPS,
        sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Sample `steps` steps (Forge: on `sigmas`, default evenly spaced) on the host with `text` applied,
    restore, check the restore."""
    base = ldm_unet(arch)
    data = inputs(arch, size)
    clock = StepClock()
    clock.start(steps)
    unet = forge.forge_unet(base) if host.startswith("forge") else base
    patcher = forge.UnetPatcher(forge.KModel(unet)) if host.startswith("forge") else None
    options_before = copy.deepcopy(patcher.model_options) if patcher else None
    before = snapshot(unet)
    cn = None
    if host == "controlnet":
        cn = ControlNetHook(base, scale=control_scale, active=control_active, adapter=adapter)
        cn.hook()
    applied = apply_mods(unet, Settings.from_text(text, strict=True) if text else Settings(), clock, seed=5,
                         latent_shape=(1, 4, *size))
    try:
        if patcher is not None:
            control = None
            if host.startswith("forge") and control_scale:
                unit = ControlNetHook(base, scale=control_scale, active=control_active, adapter=adapter)
                control = forge.control_from(unit.residuals, unit.injection_blocks() if adapter else None)
            sampling = patcher
            if kohya is not None:  # Forge's built-in on a clone, as Forge's scripts patch
                sampling = patcher.clone()
                forge_kohya_hrfix(sampling, **kohya)
            out = forge.sample(sampling, data["noise"], data["cond"], data["uncond"], steps, clock,
                               split=host == "forge_split", control=control, y=data["y"], y_uncond=data["y_uncond"],
                               layout=layout, sigmas=sigmas)
        else:
            out = euler_sample(unet, data["noise"], data["cond"], data["uncond"], steps, clock, y=data["y"],
                               y_uncond=data["y_uncond"])
    finally:  # also after an exception or interrupt
        applied.restore()
        if cn is not None:
            cn.restore()
            del base.forward  # ControlNet's leftover, checked on its own below
        assert_restored(unet, before)
        if patcher is not None:
            assert patcher.model_options == options_before and set(vars(patcher)) == {"model", "model_options", "controlnet_linked_list"}
    if messages is not None:
        messages.extend(applied.messages)
    for tid in {t.split()[0] for t in text.split(";") if t}:
        if idle:  # nothing to do: nothing installed, no key, one message that says why
            assert tid not in applied.applied and any(m.endswith("nothing to do") for m in applied.messages), applied.messages
        else:
            assert tid in applied.applied, applied.messages
    return out


_RESULTS: dict[tuple, torch.Tensor] = {}


def result(host: str, arch: str, key: str | None, **kw) -> torch.Tensor:
    k = (host, arch, key, tuple(sorted(kw.items())))
    if k not in _RESULTS:
        _RESULTS[k] = run(host, arch, ACTIVE[key] if key else "", **kw)
    return _RESULTS[k]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("host", HOSTS[1:])
def test_hosts_agree_without_techniques(host):
    assert close(result(host, "sd15", None), result("a1111", "sd15", None))


@pytest.mark.parametrize("key", list(ACTIVE))
@pytest.mark.parametrize("host", HOSTS[1:])
def test_every_technique_gives_the_a1111_result_on_every_host(host, key):
    """...and Deep Shrink on Forge gives Forge's built-in Kohya HRFix (see the next tests)."""
    expected = result("a1111", "sd15", key)
    if key == "deepshrink" and host.startswith("forge"):
        assert not close(expected, result("a1111", "sd15", None)), "the technique does not act at these settings"
        expected = run(host, "sd15", "", kohya={**KOHYA, "end": 0.5})
    assert not close(expected, result("a1111", "sd15", None)), "the technique does not act at these settings"
    out = result(host, "sd15", key)
    assert out.shape == expected.shape
    assert not close(out, result(host, "sd15", None)), f"{key} did not act on {host}"
    assert close(out, expected), (out - expected).abs().max()


@pytest.mark.parametrize("key", ["deepcache", "deepshrink", "hidiffusion", "ndcfg", "freeu", "todo", "pag"])
@pytest.mark.parametrize("host", ["controlnet", "forge"])
def test_sdxl_shape(host, key):
    expected = result("a1111", "sdxl", key)
    assert not close(expected, result("a1111", "sdxl", None))
    if key == "deepshrink" and host == "forge":
        expected = run(host, "sdxl", "", kohya={**KOHYA, "end": 0.5})
    assert close(result(host, "sdxl", key), expected)


# --- ControlNet's residuals -------------------------------------------------------------------

@pytest.mark.parametrize("key", ["tome", "deepcache", "scalecrafter", "ndcfg", "deepshrink", "hidiffusion", "freeu", "colour_map",
                                 "todo", "pag"])
def test_with_control_residuals_the_technique_acts_and_residuals_still_apply(key):
    """A1111 + ControlNet and Forge + its `control` give the same result with the technique on;
    it differs from ControlNet alone (the technique acts) and from the technique alone (the
    residuals apply). DeepCache runs every step in full while control is active (its policy), so
    there it equals ControlNet alone."""
    cn = result("controlnet", "sd15", key, control_scale=0.5)
    cn_alone = result("controlnet", "sd15", None, control_scale=0.5)
    assert not close(cn, result("a1111", "sd15", key)), "residuals lost"
    if key == "deepcache":
        assert torch.equal(cn, cn_alone)
    else:
        assert not close(cn, cn_alone), "technique lost"
    if key == "deepshrink":  # Forge has its own anchor (its built-in, which drops residuals of another size)
        forge_cn = result("forge", "sd15", key, control_scale=0.5)
        assert not close(forge_cn, result("forge", "sd15", key)) and not close(forge_cn, cn_alone)
        return
    if key != "colour_map":  # Forge computes control before the UNet call, from the latent the colour map has not pushed yet
        assert close(result("forge", "sd15", key, control_scale=0.5), cn)


# Neutral values are "nothing to do" (acts.py): nothing is installed. DeepCache with control active
# runs every step in full, which test_with_control_residuals... checks bit-exactly.
@pytest.mark.parametrize("text", ["freeu b1=1 b2=1 s1=1 s2=1", "deepshrink factor=1",
                                  "hidiffusion auto=false t1=0 msw_msa=false", "deepcache interval=1",
                                  "tome ratio=0.5 start=0.9 end=0.95"])
def test_neutral_technique_under_controlnet_is_idle_and_controlnet_alone(text):
    assert torch.equal(run("controlnet", "sd15", text, control_scale=0.5, idle=True),
                       result("controlnet", "sd15", None, control_scale=0.5))


def test_installed_hooks_that_change_nothing_keep_controlnet_bit_identical():
    """Deep Shrink by 1.01 rounds every size back to itself on this latent: its hooks are installed
    and run at every block, and ControlNet's residuals pass through them unchanged."""
    assert torch.equal(run("controlnet", "sd15", "deepshrink factor=1.01 end=0.5", control_scale=0.5),
                       result("controlnet", "sd15", None, control_scale=0.5))


def middle_calls(host: str, text: str, **kw) -> list[int]:
    unet = ldm_unet("sd15")
    steps: list[int] = []
    handle = unet.middle_block[0].register_forward_hook(lambda *a: steps.append(1))
    try:
        run(host, "sd15", text, **kw)
    finally:
        handle.remove()
    return steps


def test_deepcache_runs_full_steps_while_control_is_active():
    """Interval 2 over 4 steps: steps 1 and 3 are cheap. With ControlNet active on steps 0-1 only,
    step 1 is full (residuals seen on step 0), step 2 full (scheduled, no residuals), step 3 cheap."""
    assert len(middle_calls("a1111", "deepcache interval=2")) == 2
    assert len(middle_calls("controlnet", "deepcache interval=2")) == 2  # zero residuals: tensors, but nothing added
    assert len(middle_calls("controlnet", "deepcache interval=2", control_scale=0.5)) == 4
    seen = []

    def first_two_steps() -> bool:
        seen.append(1)
        return len(seen) <= 2  # one ControlNet call per step (cond and uncond in one batch)

    assert len(middle_calls("controlnet", "deepcache interval=2", control_scale=0.5, control_active=first_two_steps)) == 3
    assert len(middle_calls("forge", "deepcache interval=2", control_scale=0.5)) == 4
    assert len(middle_calls("forge_split", "deepcache interval=2")) == 4  # two calls per step, each cheap on 1 and 3


# --- Forge's other batch layouts: CFG 1 (cond rows only) and AND-prompts (one chunk per cond) -----

@pytest.mark.parametrize("layout", ["cfg1", "and", "area"])
@pytest.mark.parametrize("key", list(ACTIVE))
def test_every_technique_with_forges_cfg1_and_and_prompt_chunks(key, layout):
    """Every technique runs on these layouts, acts (unless it needs uncond rows: NDCFG and the
    colour map then say why and leave them alone), and is taken off exactly (run() checks)."""
    messages: list[str] = []
    for host in ("forge", "forge_split"):
        out = run(host, "sd15", ACTIVE[key], layout=layout, messages=messages)
        plain = run(host, "sd15", "", layout=layout)
        if layout == "cfg1" and key in ("ndcfg", "colour_map"):
            continue
        assert not close(out, plain), f"{key} did not act on {host} with {layout}"


# --- Deep Shrink: each host's own anchor ----------------------------------------------------------

@pytest.mark.parametrize("host", ["forge", "forge_split"])
@pytest.mark.parametrize("change", [{}, {"after_skip": False}, {"factor": 1.5}, {"up": "bilinear"},
                                    {"block": 6, "factor": 1.5, "after_skip": False, "down": "area", "up": "bilinear"},
                                    {"start": 0.25, "end": 0.75, "down": "nearest-exact"}])
def test_deep_shrink_on_forge_is_forges_builtin_kohya_hrfix(host, change):
    """Forge users compare with Forge's built-in: every setting gives its image (its Upsample goes
    straight to the next skip's shape while features are shrunk)."""
    v = {**KOHYA, **change}
    ours = run(host, "sd15", kohya_text(v))
    torch.testing.assert_close(ours, run(host, "sd15", "", kohya=v), rtol=0, atol=1e-5)


@pytest.mark.parametrize("schedule", ["even", "karras"])
@pytest.mark.parametrize("steps", [3, 4, 20, 30])
def test_deep_shrink_on_forge_keeps_the_builtins_sigma_window(steps, schedule):
    """At any step count and schedule the built-in shrinks the calls whose sigma lies in its window
    (percent_to_sigma), which the A1111 rule int(end * steps) does not always give (at 4 steps 2 steps
    against 1, at 30 steps 11 against 10, either schedule): on Forge Deep Shrink follows the built-in."""
    v = {**KOHYA, "end": 0.35}
    sigmas = karras_sigmas(steps) if schedule == "karras" else None
    ours = run("forge", "sd15", kohya_text(v), steps=steps, sigmas=sigmas, size=(16, 24))
    torch.testing.assert_close(ours, run("forge", "sd15", "", kohya=v, steps=steps, sigmas=sigmas, size=(16, 24)),
                               rtol=0, atol=1e-5)
    window = Window(v["block"], v["start"], v["end"])
    schedule_sigmas = (karras_sigmas(steps) if schedule == "karras" else sd_sigmas(steps))[:-1]
    by_sigma = sum(in_sigma_window(window, float(s)) for s in schedule_sigmas)
    assert by_sigma == int(0.35 * steps) + (steps in (4, 30))


def test_deep_shrink_hosts_differ_only_where_the_upsample_meets_a_shrunk_size():
    """A1111's anchor (wcde / ComfyUI block by block on ldm's x2 Upsample, test_deepshrink.py) and
    Forge's built-in agree at the defaults (the full-size skip is met at a concat, not after an
    Upsample) and differ with 'downscale after skip' off or factor 1.5, as the real hosts do (at 512x512:
    a latent whose shrunk sizes halve evenly; at odd sizes Forge's Upsample differs at the defaults too)."""
    for change, same in (({}, True), ({"after_skip": False}, False), ({"factor": 1.5}, False)):
        v = {**KOHYA, **change}
        assert close(run("forge", "sd15", kohya_text(v), size=(32, 32)), run("a1111", "sd15", kohya_text(v), size=(32, 32))) == same, change


# --- T2I-Adapters: residuals on h after input blocks 2, 5, 8, 11 (SD1) ----------------------------

def test_deepcache_runs_full_steps_while_an_adapter_adds_residuals():
    """The adapter changes h between input blocks, not the shallow skip a level-0 cache compares:
    every step still runs in full on A1111 + sd-webui-controlnet and on Forge (control["input"])."""
    assert len(middle_calls("controlnet", "deepcache interval=2", control_scale=0.5, adapter=True)) == 4
    assert len(middle_calls("forge", "deepcache interval=2", control_scale=0.5, adapter=True)) == 4
    assert torch.equal(run("controlnet", "sd15", "deepcache interval=2", control_scale=0.5, adapter=True),
                       run("controlnet", "sd15", "", control_scale=0.5, adapter=True))


@pytest.mark.parametrize("key", ["tome", "hypertile", "scalecrafter", "deepshrink", "hidiffusion", "freeu", "cdtuner"])
def test_with_adapter_residuals_the_technique_acts_and_the_hosts_agree(key):
    """Every technique with a T2I-Adapter unit: it acts, the adapter's residuals still apply, and
    Forge's control["input"] gives A1111 + ControlNet's result (where a technique resizes the
    features, Forge's input residuals are resized to them as sd-webui-controlnet's aligned_adding does)."""
    text = ACTIVE[key]
    size = (32, 32) if key == "deepshrink" else SIZE  # where Forge's Upsample and ldm's agree (see above)
    cn = run("controlnet", "sd15", text, control_scale=0.5, adapter=True, size=size)
    assert not close(cn, run("a1111", "sd15", text, size=size)), "adapter residuals lost"
    assert not close(cn, run("controlnet", "sd15", "", control_scale=0.5, adapter=True, size=size)), "technique lost"
    assert close(run("forge", "sd15", text, control_scale=0.5, adapter=True, size=size), cn)


def test_forge_input_residuals_follow_deep_shrink_after_the_skip():
    """Deep Shrink after block 3's skip shrinks what block 4 gets: the adapter's residual of block 5
    must be resized to it (Forge alone would print a warning and drop it)."""
    text = "deepshrink block=3 end=1 after_skip=true"
    size = (32, 32)  # where Forge's Upsample and ldm's agree
    cn = run("controlnet", "sd15", text, control_scale=0.5, adapter=True, size=size)
    assert close(run("forge", "sd15", text, control_scale=0.5, adapter=True, size=size), cn)
    assert not close(run("forge", "sd15", text, size=size), cn)


# --- leftovers and restore order ----------------------------------------------------------------

def test_controlnets_leftover_forward_never_disables_a_technique():
    """ControlNet's hook-then-restore leaves `unet.forward = <bound UNetModel.forward>` on the
    instance; every technique then runs as without it."""
    unet = ldm_unet("sd15")
    cn = ControlNetHook(unet, scale=0.5)
    cn.hook()
    applied = apply_mods(unet, Settings.from_text("freeu"), StepClock())
    cn.restore()  # ControlNet's postprocess may run before ours
    applied.restore()
    leftover = unet.__dict__["forward"]
    assert leftover.__self__ is unet and leftover.__func__ is type(unet).forward
    try:
        for key, text in ACTIVE.items():
            data = inputs("sd15")
            clock = StepClock()
            clock.start(STEPS)
            applied = apply_mods(unet, Settings.from_text(text), clock, seed=5, latent_shape=(1, 4, *SIZE))
            try:
                out = euler_sample(unet, data["noise"], data["cond"], data["uncond"], STEPS, clock)
            finally:
                applied.restore()
            assert applied.applied == [text.split()[0]] and not any("skipped" in m for m in applied.messages), key
            assert unet.__dict__["forward"] is leftover
            assert close(out, result("a1111", "sd15", key)), key
    finally:
        del unet.forward


# --- interruption, exceptions, Forge's patcher ------------------------------------------------------

COMBINED = "deepcache interval=2 level=1; freeu; hidiffusion auto=false t1=0.5; cdtuner cm_colors=5,-5,-5 cm_stop=2"


@pytest.mark.parametrize("host", ["a1111", "controlnet", "forge"])
def test_exception_mid_sampling_restores_everything(host):
    """An exception (or the WebUI's interrupt, raised from a block) in the middle of a call: the
    restore leaves the model (and Forge's UnetPatcher) as before, checked in `run`, and the next
    generation is unaffected."""
    unet = ldm_unet("sd15")
    calls = []

    def fail_on_second(module, args):
        calls.append(1)
        if len(calls) == 2:  # output block 4 runs on DeepCache's full steps only
            raise KeyboardInterrupt if host == "forge" else RuntimeError("out of memory")

    handle = unet.output_blocks[4][0].register_forward_pre_hook(fail_on_second)
    try:
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            run(host, "sd15", COMBINED)
    finally:
        handle.remove()
    assert "forward" not in unet.__dict__
    assert torch.equal(run(host, "sd15", COMBINED), run(host, "sd15", COMBINED))


def test_forge_patches_of_other_extensions_keep_running_with_ours():
    """Another extension's unet function wrapper (the one slot, MultiDiffusion uses it) and block
    modifier stay in place and run; our techniques do not use Forge's slots, so nothing is chained
    over or left on the UnetPatcher."""
    base = ldm_unet("sd15")
    unet = forge.forge_unet(base)
    patcher = forge.UnetPatcher(forge.KModel(unet)).clone()
    wrapped, modified = [], []

    def wrapper(apply_model, args):
        wrapped.append(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    def modifier(h, when, options):
        modified.append(options["block"])
        return h

    patcher.set_model_unet_function_wrapper(wrapper)
    patcher.add_block_modifier(modifier)
    options = copy.copy(patcher.model_options)
    data = inputs("sd15")
    clock = StepClock()
    clock.start(STEPS)
    applied = apply_mods(unet, Settings.from_text(ACTIVE["deepcache"] + "; " + ACTIVE["freeu"]), clock, latent_shape=(1, 4, *SIZE))
    try:
        out = forge.sample(patcher, data["noise"], data["cond"], data["uncond"], STEPS, clock)
    finally:
        applied.restore()
    assert wrapped == [[1, 0]] * STEPS and ("last", 0) in modified
    assert patcher.model_options == options and patcher.model_options["model_function_wrapper"] is wrapper
    reference = run("a1111", "sd15", ACTIVE["deepcache"] + "; " + ACTIVE["freeu"])
    assert close(out, reference)


def test_classic_forge_says_what_is_skipped():
    base = ldm_unet("sd15")
    unet = copy.deepcopy(base)
    unet.__class__ = type("UNetModel", (type(base),), {"__module__": "ldm_patched.ldm.modules.diffusionmodules.openaimodel"})
    clock = StepClock()
    clock.start(STEPS)  # a pass with cheap steps: DeepCache would act, so it is refused rather than idle
    applied = apply_mods(unet, Settings.from_text(ACTIVE["deepcache"] + "; tome ratio=0.5"), clock)
    try:
        assert applied.applied == ["tome"]
        assert any(m.startswith("DeepCache skipped") and "classic Forge" in m for m in applied.messages)
    finally:
        applied.restore()
