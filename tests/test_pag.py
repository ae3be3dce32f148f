"""Perturbed-Attention Guidance against a direct implementation written here: identity attention
map, and a sampler that evaluates cond, uncond and the perturbed cond separately and combines
eps_u + cfg (eps_c - eps_u) + scale (eps_c - eps_perturbed). Ours, through the host's own CFG, on
the lab's A1111 batch, Forge's uncond-first batch, split calls, AND chunks and cond-only calls at
CFG 1; off, windows, unknown rows, an adaptive scale at 0, restore, cost, bad layers, the combination
with ScaleCrafter's NDCFG and the hires pass. Every A1111 call layout: test_layouts.py."""
import functools

import pytest
import torch

from lib_unetmods.lab.hosts import forge
from lib_unetmods import Settings, SettingsError, StepClock, apply_mods
from lib_unetmods.lab.random_unets import ADM_CHANNELS, build_unet, context_dim, example_inputs
from lib_unetmods.lab.sampler import euler_sample, sd_sigmas, sigma_to_t
from lib_unetmods.techniques import pag
from lib_unetmods.lab.model_state import assert_restored, snapshot
from tiny_unet_calls import announce, identity_map_attention, perturbed
from webui_run import clean_state, make_runner, script_module, txt2img  # noqa: F401

from modules import processing  # noqa: E402

STEPS = 3
SIZE = (16, 24)


@functools.lru_cache(maxsize=None)
def unet_of(arch):
    return build_unet(arch, "tiny", seed=1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def data(arch, batch=1):
    g = torch.Generator().manual_seed(4)
    ctx = context_dim(arch, "tiny")
    sdxl = arch == "sdxl"
    return {"noise": torch.randn(batch, 4, *SIZE, generator=g), "cond": torch.randn(batch, 8, ctx, generator=g),
            "uncond": torch.randn(batch, 8, ctx, generator=g),
            "y": torch.randn(batch, ADM_CHANNELS, generator=g) if sdxl else None,
            "y_uncond": torch.randn(batch, ADM_CHANNELS, generator=g) if sdxl else None}


# --- the direct implementation ---------------------------------------------------------------

@torch.no_grad()
def direct_sample(unet, d, cfg, scale, blocks=None, cond_only=False, parts=1):
    """Euler, each prediction in its own UNet call; guided = cfg result + scale (cond - perturbed).
    `parts` 2: an AND prompt of the cond and the cond with its tokens reversed (Forge's stand-in),
    guided = uncond + cfg sum_k (cond_k - uncond) + scale mean_k (cond_k - perturbed_k)."""
    blocks = blocks or [unet.middle_block]
    sigmas = sd_sigmas(STEPS)
    x = d["noise"] * sigmas[0]
    conds = [d["cond"], d["cond"].flip(1)][:parts]
    for i in range(STEPS):
        sigma = float(sigmas[i])
        xin = x / (sigma ** 2 + 1) ** 0.5
        t = torch.full((x.shape[0],), sigma_to_t(sigma))
        eps_c = [unet(xin, t, context=c, y=d["y"]) for c in conds]
        eps_u = 0 if cond_only else unet(xin, t, context=d["uncond"], y=d["y_uncond"])
        with perturbed(unet, blocks):
            eps_p = [unet(xin, t, context=c, y=d["y"]) for c in conds]
        eps = eps_u + cfg * sum(c - eps_u for c in eps_c) + scale * sum(c - p for c, p in zip(eps_c, eps_p)) / parts
        x = x + eps * (float(sigmas[i + 1]) - sigma)
    return x


# --- ours on each host layout ------------------------------------------------------------------

def run(host, arch, text, cfg=7.0, messages=None, calls=None, layout="cfg"):
    base = unet_of(arch)
    d = data(arch)
    unet = forge.forge_unet(base) if host.startswith("forge") else base
    before = snapshot(unet)
    clock = StepClock()
    clock.start(STEPS)
    applied = apply_mods(unet, Settings.from_text(text, strict=True) if text else Settings(), clock, latent_shape=(1, 4, *SIZE))
    handle = unet.register_forward_pre_hook(lambda m, a, k: calls.append((a or (k["x"],))[0].shape[0]), with_kwargs=True) \
        if calls is not None else None
    try:
        if host == "a1111":
            out = euler_sample(unet, d["noise"], d["cond"], d["uncond"], STEPS, clock, cfg_scale=cfg, y=d["y"],
                               y_uncond=d["y_uncond"])
        else:
            out = forge.sample(forge.UnetPatcher(forge.KModel(unet)), d["noise"], d["cond"], d["uncond"], STEPS, clock,
                               cfg_scale=cfg, split=host == "forge_split", y=d["y"], y_uncond=d["y_uncond"],
                               layout="cfg1" if host == "forge_cfg1" else layout)
    finally:
        if handle is not None:
            handle.remove()
        applied.restore()
        finish = applied.idle_after_pass()
    assert_restored(unet, before)
    if messages is not None:
        messages += applied.messages + list(finish.values())
    return out


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("host", ["a1111", "forge", "forge_split"])
def test_guidance_equals_the_direct_implementation(host, arch):
    unet = unet_of(arch)
    expected = direct_sample(unet, data(arch), cfg=4.0, scale=3.0)
    plain = direct_sample(unet, data(arch), cfg=4.0, scale=0.0)
    assert rel(expected, plain) > 1e-2  # PAG really changes the result
    ours = run(host, arch, "pag scale=3", cfg=4.0)
    assert rel(ours, expected) < 1e-4, rel(ours, expected)


@pytest.mark.parametrize("host", ["a1111", "forge_cfg1"])
def test_cfg_1_guides_with_the_cond_rows(host):
    """At CFG 1 the result is the cond prediction: guided = cond + scale (cond - perturbed), whether the
    uncond rows are still computed (A1111) or dropped (Forge: cond-only calls)."""
    unet = unet_of("sd15")
    expected = direct_sample(unet, data("sd15"), cfg=1.0, scale=3.0, cond_only=True)
    assert rel(expected, direct_sample(unet, data("sd15"), cfg=1.0, scale=0.0, cond_only=True)) > 1e-2
    assert rel(run(host, "sd15", "pag scale=3", cfg=1.0), expected) < 1e-4


def test_other_layers_and_the_identity_map():
    unet = unet_of("sd15")
    attn = unet.middle_block[1].transformer_blocks[0].attn1
    x = torch.randn(2, 6, attn.to_q.in_features)
    with torch.no_grad():
        torch.testing.assert_close(pag.identity_attention(attn, x), identity_map_attention(attn, x))
    expected = direct_sample(unet, data("sd15"), cfg=4.0, scale=2.0, blocks=[unet.input_blocks[4], unet.middle_block])
    ours = run("a1111", "sd15", "pag scale=2 layers=input.4,middle", cfg=4.0)
    assert rel(ours, expected) < 1e-4 and rel(ours, run("a1111", "sd15", "pag scale=2", cfg=4.0)) > 1e-3


def test_one_extra_pass_over_the_cond_rows_per_step():
    calls = []
    run("a1111", "sd15", "pag", calls=calls)
    assert calls == [2, 1] * STEPS  # cond + uncond, then the perturbed cond
    calls.clear()
    run("forge_split", "sd15", "pag", calls=calls)
    assert calls == [1, 1, 1] * STEPS  # uncond call, cond call, perturbed cond
    calls.clear()
    run("a1111", "sd15", "pag end=0.5", calls=calls)  # steps 0 only (int(0.5 * 3) = 1)
    assert calls == [2, 1, 2, 2]
    calls.clear()
    run("a1111", "sd15", "pag adaptive=0.3", calls=calls)  # scale - scale * 0.0081 * (1000 - t) < 0 after step 0
    assert calls == [2, 1, 2, 2]


def test_the_perturbed_pass_is_not_a_call_of_the_step():
    """The clock counts the host's calls in a step (DeepCache keeps a cache entry per call): the
    perturbed pass made inside a call is not one of them."""
    unet, clock_calls = forge.forge_unet(unet_of("sd15")), []
    d = data("sd15")
    clock = StepClock()
    clock.start(STEPS)
    applied = apply_mods(unet, Settings.from_text("pag", strict=True), clock, latent_shape=(1, 4, *SIZE))
    handle = unet.register_forward_pre_hook(lambda m, a, k: clock_calls.append(clock.calls_in_step), with_kwargs=True)
    try:
        forge.sample(forge.UnetPatcher(forge.KModel(unet)), d["noise"], d["cond"], d["uncond"], STEPS, clock, split=True)
    finally:
        handle.remove()
        applied.restore()
    assert clock_calls == [1, 2, 2] * STEPS  # uncond call, cond call, the perturbed pass inside it


def test_off_is_bit_identical_and_restored():
    base = run("a1111", "sd15", "")
    messages = []
    assert torch.equal(run("a1111", "sd15", "pag scale=0", messages=messages), base)
    assert any("nothing to do" in m for m in messages)
    assert torch.equal(run("a1111", "sd15", "pag start=1", messages=messages), base)
    unet = unet_of("sd15")
    before = snapshot(unet)
    assert not torch.equal(run("a1111", "sd15", "pag"), base)
    assert_restored(unet, before)


@pytest.mark.parametrize("host", ["forge", "forge_split"])
def test_forges_and_prompt_chunks(host):
    """Forge's AND prompt: one chunk per part, the second part's first; the parts' weighted mean of
    cond - perturbed, through Forge's CFG scaled by the weights' sum."""
    unet = unet_of("sd15")
    expected = direct_sample(unet, data("sd15"), cfg=4.0, scale=3.0, parts=2)
    assert rel(expected, direct_sample(unet, data("sd15"), cfg=4.0, scale=0.0, parts=2)) > 1e-2
    assert rel(run(host, "sd15", "pag scale=3", cfg=4.0, layout="and"), expected) < 1e-4


def test_calls_with_unknown_rows_are_left_alone_and_said():
    """A call no evaluation announced (another extension calling the UNet, a host the glue does not
    know): no guidance, one message; a pass without a call it could guide writes no key."""
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=16)
    plain = unet(inputs["x"], inputs["timesteps"], context=inputs["context"])
    clock = StepClock()
    clock.start(STEPS)
    applied = apply_mods(unet, Settings.from_text("pag", strict=True), clock)
    try:
        assert torch.equal(unet(inputs["x"], inputs["timesteps"], context=inputs["context"]), plain)
    finally:
        applied.restore()
    assert any("is unknown; no guidance on it" in m for m in applied.messages)
    assert list(applied.idle_after_pass()) == ["pag"]


def test_an_adaptive_scale_at_0_on_every_step_writes_no_key():
    messages, calls = [], []
    assert torch.equal(run("a1111", "sd15", "pag adaptive=1", messages=messages, calls=calls), run("a1111", "sd15", ""))
    assert calls == [2] * STEPS and any("adaptive scale was 0 at every step of this pass; nothing to do" in m for m in messages)


def test_bad_layers_and_values():
    for text, words in (("pag layers=input.99", "no input block 99"), ("pag layers=input.0", "has no self-attention"),
                        ("pag layers=output.0", "has no self-attention")):
        messages = []
        clock = StepClock()
        clock.start(STEPS)
        applied = apply_mods(unet_of("sd15"), Settings.from_text(text, strict=True), clock)
        applied.restore()
        assert applied.patcher is None and any(m.startswith("Perturbed-Attention Guidance (PAG) skipped") and words in m
                                               for m in applied.messages), applied.messages
    for bad in ("pag layers=middle;x", "pag layers=mid", "pag scale=-1", "pag adaptive=2"):
        with pytest.raises(SettingsError, match="pag"):
            Settings.from_text(bad, strict=True)


def test_with_scalecrafter_ndcfg_both_passes_run():
    """One call: NDCFG's rows plus PAG's shift a = scale (cond - perturbed), the perturbed pass dilated
    like the main one (a measured with NDCFG off); 3 UNet calls (main, mild uncond, perturbed cond)."""
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=32, width=40)
    sc = "scalecrafter level1=2 level2=2 stop=1"

    def one(text, calls=None):
        clock = StepClock()
        clock.start(1)
        applied = apply_mods(unet, Settings.from_text(text, strict=True), clock, latent_shape=tuple(inputs["x"].shape))
        announce(clock)
        handle = unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0])) if calls is not None else None
        try:
            with torch.no_grad():
                return unet(inputs["x"], inputs["timesteps"], context=inputs["context"]), applied
        finally:
            if handle:
                handle.remove()
            applied.restore()

    dilated, _ = one(f"{sc} ndcfg=off")
    shifted, _ = one(f"{sc} ndcfg=off; pag")
    damped, _ = one(f"{sc} ndcfg=on ndcfg_stop=1")
    calls = []
    both, applied = one(f"{sc} ndcfg=on ndcfg_stop=1; pag", calls)
    a = shifted - dilated
    torch.testing.assert_close(a[0], a[1])  # the same shift on the cond and the uncond row
    assert rel(damped, dilated) > 1e-3 and float(a.norm()) > 1e-3 * float(dilated.norm())
    torch.testing.assert_close(both, damped + a, rtol=1e-4, atol=1e-5)
    assert calls == [2, 1, 1] and applied.applied == ["scalecrafter", "pag"]
    assert any(m.startswith("PAG + ScaleCrafter noise-damped CFG") for m in applied.messages)


def test_hires_pass_through_the_webui_stand_in(script_module):
    """Both new techniques act in the first and the hires pass of a real script run, write their keys,
    and the infotext pastes back as the settings that ran."""
    unet = unet_of("sd15")
    before = snapshot(unet)
    text = "todo hr_factor=3; pag scale=2"
    kw = dict(steps=3, width=64, height=64, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2)
    p = txt2img(unet, make_runner(script_module)[0], Settings.from_text(text, strict=True), **kw)
    out = processing.process_images(p)
    assert_restored(unet, before)
    params = p.extra_generation_params
    assert params["UNetMods todo v1"] == "hr_factor=3.0" and params["UNetMods pag v1"] == "scale=2.0"
    assert Settings.from_infotext(params) == Settings.from_text(text, strict=True)
    plain = processing.process_images(txt2img(unet, make_runner(script_module)[0], Settings(), **kw))
    hires_only = Settings.from_text("todo hr_factor=3 hires=true; pag scale=2", strict=True)
    assert not torch.equal(out.images[0], plain.images[0]) and hires_only == Settings.from_text(text, strict=True)
