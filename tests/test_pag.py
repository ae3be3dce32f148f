"""Perturbed-Attention Guidance against a direct implementation written here: identity attention
map, and a sampler that evaluates cond, uncond and the perturbed cond separately and combines
eps_u + cfg (eps_c - eps_u) + scale (eps_c - eps_perturbed). Ours, through the host's own CFG, on
A1111's batch layout, Forge's uncond-first batch, Forge's split calls and cond-only calls at CFG 1;
off, windows, restore, cost, bad layers, the combination with ScaleCrafter's NDCFG and the hires pass."""
import functools
from contextlib import contextmanager

import pytest
import torch

from lib_unetmods.lab.hosts import forge
from lib_unetmods import Settings, SettingsError, StepClock, apply_mods
from lib_unetmods.lab.random_unets import ADM_CHANNELS, build_unet, context_dim, example_inputs
from lib_unetmods.lab.sampler import euler_sample, sd_sigmas, sigma_to_t
from lib_unetmods.techniques import pag
from lib_unetmods.lab.model_state import assert_restored, snapshot
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

def identity_map_attention(attn, x, context=None, **_):
    """Attention written out with the identity as attention map (softmax(QK^T) replaced by I)."""
    b, n, _ = x.shape
    heads = attn.heads
    v = attn.to_v(x).view(b, n, heads, -1).transpose(1, 2)
    weights = torch.eye(n).expand(b, heads, n, n)
    out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out(out)


@contextmanager
def perturbed(unet, blocks):
    attns = [m.attn1 for block in blocks for m in block.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for a in attns:
        a.forward = functools.partial(identity_map_attention, a)
    try:
        yield
    finally:
        for a in attns:
            del a.forward


@torch.no_grad()
def direct_sample(unet, d, cfg, scale, blocks=None, cond_only=False):
    """Euler, each prediction in its own UNet call; guided = cfg result + scale (cond - perturbed)."""
    blocks = blocks or [unet.middle_block]
    sigmas = sd_sigmas(STEPS)
    x = d["noise"] * sigmas[0]
    for i in range(STEPS):
        sigma = float(sigmas[i])
        xin = x / (sigma ** 2 + 1) ** 0.5
        t = torch.full((x.shape[0],), sigma_to_t(sigma))
        eps_c = unet(xin, t, context=d["cond"], y=d["y"])
        eps_u = eps_c if cond_only else unet(xin, t, context=d["uncond"], y=d["y_uncond"])
        with perturbed(unet, blocks):
            eps_p = unet(xin, t, context=d["cond"], y=d["y"])
        eps = eps_u + cfg * (eps_c - eps_u) + scale * (eps_c - eps_p)
        x = x + eps * (float(sigmas[i + 1]) - sigma)
    return x


# --- ours on each host layout ------------------------------------------------------------------

@torch.no_grad()
def forge_cond_only(patcher, d, clock):
    """Forge at CFG 1: the uncond chunk is dropped, every call holds the cond rows only."""
    sigmas = sd_sigmas(STEPS)
    x = d["noise"] * sigmas[0]
    clock.set_layout(None, None)
    for i in range(STEPS):
        sigma = float(sigmas[i])
        clock.begin_step(i, sigma)
        s = torch.full((x.shape[0],), sigma)
        to = {"cond_or_uncond": [0], "cond_indices": list(range(x.shape[0])), "uncond_indices": [], "sigmas": s}
        extra = {} if d["y"] is None else {"y": d["y"]}
        denoised = patcher.model.apply_model(x, s, c_crossattn=d["cond"], transformer_options=to, **extra)
        x = x + (x - denoised) / sigma * (float(sigmas[i + 1]) - sigma)
    clock.end_step()
    return x


def run(host, arch, text, cfg=7.0, give_cfg=True, messages=None, calls=None):
    base = unet_of(arch)
    d = data(arch)
    unet = forge.forge_unet(base) if host.startswith("forge") else base
    before = snapshot(unet)
    clock = StepClock()
    clock.start(STEPS)
    applied = apply_mods(unet, Settings.from_text(text, strict=True) if text else Settings(), clock,
                         latent_shape=(1, 4, *SIZE), cfg_scale=cfg if give_cfg else None)
    handle = unet.register_forward_pre_hook(lambda m, a, k: calls.append((a or (k["x"],))[0].shape[0]), with_kwargs=True) \
        if calls is not None else None
    try:
        if host == "a1111":
            out = euler_sample(unet, d["noise"], d["cond"], d["uncond"], STEPS, clock, cfg_scale=cfg, y=d["y"],
                               y_uncond=d["y_uncond"])
        elif host == "forge_cfg1":
            out = forge_cond_only(forge.UnetPatcher(forge.KModel(unet)), d, clock)
        else:
            out = forge.sample(forge.UnetPatcher(forge.KModel(unet)), d["noise"], d["cond"], d["uncond"], STEPS, clock,
                               cfg_scale=cfg, split=host == "forge_split", y=d["y"], y_uncond=d["y_uncond"])
    finally:
        if handle is not None:
            handle.remove()
        applied.restore()
    assert_restored(unet, before)
    if messages is not None:
        messages += applied.messages
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


def test_split_calls_without_the_cfg_scale_say_so():
    messages = []
    out = run("forge_split", "sd15", "pag", give_cfg=False, messages=messages)
    assert torch.equal(out, run("forge_split", "sd15", ""))
    assert any("need the CFG scale" in m for m in messages)


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
        clock.set_layout(1, 1)
        applied = apply_mods(unet, Settings.from_text(text, strict=True), clock, latent_shape=tuple(inputs["x"].shape))
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


def test_guidance_rows_give_the_formula_through_the_hosts_cfg():
    """Two images, two cond rows each (AND prompts): A1111 (cond rows per image, then uncond rows),
    Forge (uncond chunk first, cond chunks of all images), split (cond rows only, CFG weight known),
    and cond-only at CFG 1: the host's CFG of the shifted rows is cfg + scale * mean_k (c_k - p_k)."""
    c = torch.randn(2, 2, 3)  # image, cond k, value
    u, p = torch.randn(2, 3), torch.randn(2, 2, 3)
    w, s = torch.tensor([[4.0], [2.0]]).T[0], 3.0  # weights of the two conds
    cfg = lambda cc, uu: uu + (w.view(1, 2, 1) * (cc - uu[:, None])).sum(1)  # noqa: E731
    expected = cfg(c, u) + s * (c - p).mean(1)
    a1111 = torch.cat([c.reshape(4, 3), u])
    out = pag.guided_rows(a1111, p.reshape(4, 3), [0, 1, 2, 3], [4, 5], [0, 0, 1, 1], [0, 1], s)
    torch.testing.assert_close(cfg(out[:4].view(2, 2, 3), out[4:]), expected)
    forge_rows = torch.cat([u, c[:, 0], c[:, 1]])  # chunks: uncond, cond 0, cond 1
    pf = torch.cat([p[:, 0], p[:, 1]])
    out = pag.guided_rows(forge_rows, pf, [2, 3, 4, 5], [0, 1], [0, 1, 0, 1], [0, 1], s)
    torch.testing.assert_close(cfg(torch.stack([out[2:4], out[4:6]], 1), out[:2]), expected)
    split = pag.guided_rows(torch.cat([c[:, 0], c[:, 1]]), pf, [0, 1, 2, 3], [], [0, 1, 0, 1], [], s, cfg_weight=6.0)
    mean_w = lambda cc, uu: uu + 6.0 * (cc.mean(1) - uu)  # noqa: E731 - Forge: conds averaged, then CFG
    torch.testing.assert_close(mean_w(torch.stack([split[:2], split[2:]], 1), u), mean_w(c, u) + s * (c - p).mean(1))
    one = pag.guided_rows(c[:, 0], p[:, 0], [0, 1], [], [0, 1], [], s)
    torch.testing.assert_close(one, c[:, 0] + s * (c[:, 0] - p[:, 0]))
