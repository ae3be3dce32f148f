"""CD-Tuner: identity when all zero, the reference's formulas, hook form == weight-edit form,
latent-shift tables, hires scaling, stop steps, colour map, VAE saturation and exact restore."""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.params import ParamError
from lib_unetmods.patcher import Patcher
from lib_unetmods.lab.random_unets import ADM_CHANNELS, build_unet, context_dim, randomize
from lib_unetmods.lab.sampler import euler_sample, sd_sigmas, sigma_to_t
from lib_unetmods.techniques import cdtuner
from lib_unetmods.techniques.cdtuner import (K_SHIFT, colour_map_push, colour_map_ratio, colour_vector, denoiser_scalings,
                                             detail_scales, in_window, latent_shift, parse_cells, pass_detail,
                                             region_boxes, sigma_of_timesteps)
from lib_unetmods.lab.model_state import assert_restored, snapshot

SPEC = cdtuner.SPEC


ZERO = dict.fromkeys(("d1", "d2", "hd1", "hd2", "con1", "con2", "bri", "col1", "col2", "col3", "sat", "sat2"), 0.0)


def settings(**values):
    return Settings({"cdtuner": {**SPEC.defaults(), "enabled": True, **values}})


def replace_parameter(patcher, module, name, value):
    """The reference's weight edit: a new Parameter now, the original object back on restore."""
    old = module._parameters[name]
    module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    patcher.on_restore(lambda: module._parameters.__setitem__(name, old))


def inputs(unet, batch=2, size=16, t=500.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
    y = torch.randn(batch, ADM_CHANNELS, generator=g) if unet.num_classes is not None else None
    return {"x": torch.randn(batch, 4, size, size, generator=g), "timesteps": torch.full((batch,), t),
            "context": torch.randn(batch, 8, ctx_dim, generator=g), "y": y}


def tiny_vae(seed=0):
    """A first-stage model shaped like ldm's AutoencoderKL (its .decoder is ldm's Decoder)."""
    from ldm.modules.diffusionmodules.model import Decoder

    class FirstStage(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder(ch=32, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=[],
                                   in_channels=3, resolution=32, z_channels=4)

        def decode(self, z):
            out = self.decoder(z)
            del self.decoder.last_z_shape  # a new object per call; snapshots compare the model, not the last call
            return out

    return randomize(FirstStage(), seed).eval().requires_grad_(False)


def sample(unet, arch, steps=3, size=16, batch=1, seed=0, **apply_kwargs):
    g = torch.Generator().manual_seed(seed)
    dim = context_dim(arch, "tiny")
    cond, uncond = torch.randn(batch, 8, dim, generator=g), torch.randn(batch, 8, dim, generator=g)
    y = torch.randn(batch, ADM_CHANNELS, generator=g) if unet.num_classes is not None else None
    noise = torch.randn(batch, 4, size, size, generator=g)
    clock = StepClock()
    clock.start(steps)
    applied = apply_mods(unet, apply_kwargs.pop("settings", Settings()), clock, **apply_kwargs)
    try:
        return euler_sample(unet, noise, cond, uncond, steps, clock, y=y), applied
    finally:
        applied.restore()


# --- identity ----------------------------------------------------------------------------

def test_all_zero_installs_nothing_and_is_bit_identical(make_unet):
    unet, vae = make_unet("sd15"), tiny_vae()
    x = inputs(unet)
    expected = unet(**x)
    before, vae_before = snapshot(unet), snapshot(vae)
    for values in ({}, {**ZERO, "cm_colors": "5,-5,-5", "cm_strength": 0.0}, {"cm_colors": "5,-5,-5", "cm_stop": 0}):
        clock = StepClock()
        for hires in (False, True):
            clock.start(4, hires=hires)
            applied = apply_mods(unet, settings(**values), clock, vae=vae, base_shape=(1, 4, 8, 8))
            assert applied.patcher is None and applied.applied == []  # acted on nothing: no infotext key, says why
            assert applied.messages == ["CD Tuner: every value is 0 and there is no colour map; nothing to do"]
            assert torch.equal(unet(**x), expected)
            assert_restored(unet, before)
            assert_restored(vae, vae_before)


# --- Detail 1 / Detail 2 / Contrast 1 ------------------------------------------------------

def test_detail_and_contrast_match_hand_computed_layers(make_unet):
    unet = make_unet("sd15")
    conv_in, norm, out_conv = unet.input_blocks[0][0], unet.out[0], unet.out[2]
    x_in, x_mid = torch.randn(2, 4, 8, 8), torch.randn(2, out_conv.in_channels, 8, 8)
    applied = apply_mods(unet, settings(d1=3.0, d2=-4.0, con1=5.0), StepClock())
    got = conv_in(x_in), norm(x_mid), out_conv(x_mid)
    applied.restore()
    assert detail_scales(3.0) == (0.97, 1.06)
    torch.testing.assert_close(got[0], F.conv2d(x_in, conv_in.weight * 0.97, conv_in.bias * 1.06, padding=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], F.group_norm(x_mid, norm.num_groups, norm.weight * 1.04, norm.bias * 0.92, norm.eps),
                               rtol=1e-5, atol=1e-5)
    bias = out_conv.bias + torch.tensor([0.1, 0.0, 0.0, 0.0])
    torch.testing.assert_close(got[2], F.conv2d(x_mid, out_conv.weight, bias, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_hook_form_equals_weight_edit_form(make_unet, arch):
    unet = make_unet(arch)
    x = inputs(unet)
    before = snapshot(unet)
    applied = apply_mods(unet, settings(d1=4.0, d2=-3.0, con1=6.0), StepClock())
    hooked = unet(**x)
    applied.restore()
    assert_restored(unet, before)

    edits = Patcher(unet)  # the reference's weight edit, as A2.3 writes it
    conv_in, norm, out_conv = unet.input_blocks[0][0], unet.out[0], unet.out[2]
    replace_parameter(edits, conv_in, "weight", conv_in.weight * (1 - 0.04))
    replace_parameter(edits, conv_in, "bias", conv_in.bias * (1 + 0.08))
    replace_parameter(edits, norm, "weight", norm.weight * (1 + 0.03))
    replace_parameter(edits, norm, "bias", norm.bias * (1 - 0.06))
    replace_parameter(edits, out_conv, "bias", out_conv.bias + torch.tensor([0.12, 0, 0, 0]))
    edited = unet(**x)
    edits.restore()
    assert_restored(unet, before)
    assert not torch.equal(hooked, unet(**x))
    torch.testing.assert_close(hooked, edited, rtol=1e-4, atol=1e-5)


def test_hires_detail_and_area_scaling(make_unet):
    assert pass_detail(2.0, 0.0, False, True, 4.0) == 2.0  # first pass: d, never scaled
    assert pass_detail(2.0, 0.0, True, False, 4.0) == 2.0
    assert pass_detail(2.0, 1.5, True, False, 4.0) == 1.5  # hd replaces d
    assert pass_detail(2.0, 0.0, True, True, 4.0) == 8.0  # hrs: times the area ratio
    assert pass_detail(2.0, 1.5, True, True, 2.25) == 1.5 * 2.25

    unet = make_unet("sd15")
    conv_in = unet.input_blocks[0][0]
    x = torch.randn(1, 4, 16, 24)
    clock = StepClock()
    for hd1, hrs, d in ((0.0, True, 2.0 * 6), (1.5, True, 1.5 * 6), (1.5, False, 1.5), (0.0, False, 2.0)):
        clock.start(4, hires=True)
        applied = apply_mods(unet, settings(d1=2.0, hd1=hd1, hrs=hrs), clock, base_shape=(1, 4, 8, 8))  # area x6
        got = conv_in(x)
        applied.restore()
        a, c = detail_scales(d)
        torch.testing.assert_close(got, F.conv2d(x, conv_in.weight * a, conv_in.bias * c, padding=1), rtol=1e-5, atol=1e-5)
    clock.start(4, hires=True)
    applied = apply_mods(unet, settings(d1=2.0, hrs=True), clock)
    assert any("hr-scaling needs" in m for m in applied.messages)
    applied.restore()


def test_stop_and_start_steps(make_unet):
    assert [in_window(s, 10, 0.0, 3) for s in range(5)] == [True, True, True, False, False]
    assert [in_window(s, 10, 0.2, -1) for s in range(4)] == [False, False, True, True]  # ratio 0.2 of 10 = step 2
    assert not any(in_window(s, 10, 0, 0) for s in range(10))
    assert all(in_window(s, 10, 0, -1) for s in range(10))

    unet = make_unet("sd15")
    x = inputs(unet)
    base = unet(**x)
    before = snapshot(unet)
    clock = StepClock()
    for hires, values in ((False, dict(start=1, stop=0.6)), (True, dict(hr_start=1, hr_stop=3, stop=1))):
        clock.start(5, hires=hires)
        applied = apply_mods(unet, settings(d1=3.0, d2=2.0, con1=4.0, **values), clock)
        changed = []
        for step in range(5):
            clock.begin_step(step)
            changed.append(not torch.equal(unet(**x), base))
        applied.restore()
        assert changed == [False, True, True, False, False]  # after the stop the UNet is bit-identical again
    assert_restored(unet, before)


# --- latent shift ------------------------------------------------------------------------

def table(family, con2=0.0, bri=0.0, col1=0.0, col2=0.0, col3=0.0):
    """A2.4, as printed there."""
    if family == "sdxl":
        return [con2, col1 - col2 - col3, -col2 + col3, bri]
    return [con2, -bri + col1 + col3, bri / 3 + col1 - col2, 2 * bri / 3 - col2 + col3]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_latent_shift_equals_the_tables(family):
    tab = "sdxl" if family == "sdxl" else "sd"
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        v = dict(zip(("con2", "bri", "col1", "col2", "col3"), (torch.rand(5, generator=g) * 40 - 20).tolist()))
        assert latent_shift(v, family) == pytest.approx([K_SHIFT * e for e in table(tab, **v)], abs=1e-12)
    assert K_SHIFT == pytest.approx(0.1333333333)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_latent_shift_moves_the_final_latent_per_channel(make_unet, arch):
    unet = make_unet(arch)
    family = "sdxl" if arch == "sdxl" else "sd"
    values = dict(con2=3.0, bri=-2.0, col1=4.0, col2=1.5, col3=-5.0)
    base, _ = sample(unet, arch)
    before = snapshot(unet)
    shifted, applied = sample(unet, arch, settings=settings(**values))
    assert applied.messages == []
    assert_restored(unet, before)
    expected = -K_SHIFT * torch.tensor(table(family, **values)).view(1, 4, 1, 1)
    torch.testing.assert_close(shifted - base, expected.expand_as(base), rtol=1e-4, atol=1e-4)


def test_latent_shift_output_correction_eps_and_v(make_unet):
    """At the last step F gets s/c_out: x0 = c_skip*x + c_out*F moves by exactly -shift, for
    eps (x0 = x - sigma*eps) and for v (x0 = alpha*x_t - sigma_t*v in VP form)."""
    unet = make_unet("sd15")
    x = inputs(unet, t=400.0)
    sigma = float(sigma_of_timesteps(torch.tensor([400.0])))
    shift = torch.tensor(latent_shift(dict(con2=2.0, bri=1.0, col1=-3.0, col2=0.0, col3=2.0), "sd1")).view(1, 4, 1, 1)
    clock = StepClock()
    clock.start(3)
    clock.begin_step(1)
    base = unet(**x)
    for prediction in ("eps", "v"):
        applied = apply_mods(unet, settings(con2=2.0, bri=1.0, col1=-3.0, col3=2.0), clock, prediction=prediction)
        clock.begin_step(1)
        assert torch.equal(unet(**x), base)  # only the last step
        clock.begin_step(2)
        out = unet(**x)
        applied.restore()
        noisy = x["x"] * (sigma ** 2 + 1) ** 0.5  # the sampler's x; the UNet sees c_in * x
        if prediction == "eps":
            x0, x0_base = noisy - sigma * out, noisy - sigma * base
        else:
            alpha, sigma_t = (sigma ** 2 + 1) ** -0.5, sigma * (sigma ** 2 + 1) ** -0.5
            x0, x0_base = alpha * x["x"] - sigma_t * out, alpha * x["x"] - sigma_t * base
        torch.testing.assert_close(x0 - x0_base, (-shift).expand_as(x0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        denoiser_scalings(torch.tensor([1.0]), "x0")


def test_latent_shift_waits_for_the_hires_pass_and_works_under_a_foreign_forward(make_unet):
    unet = make_unet("sd15")
    clock = StepClock()
    clock.start(4)
    assert apply_mods(unet, settings(bri=3.0), clock, hires_planned=True).patcher is None
    unet.forward = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), unet)  # ControlNet-like
    x = inputs(unet)
    base = unet(**x)
    clock.start(4, hires=True)
    applied = apply_mods(unet, settings(bri=3.0), clock)
    clock.begin_step(3)
    assert not torch.equal(unet(**x), base) and applied.messages == []
    applied.restore()


def test_sigma_of_timesteps_inverts_the_schedule():
    sigmas = sd_sigmas(10)[:-1]
    t = torch.tensor([sigma_to_t(float(s)) for s in sigmas])
    torch.testing.assert_close(sigma_of_timesteps(t).float(), sigmas, rtol=1e-6, atol=0)
    mid = float(sigma_of_timesteps(torch.tensor([100.5])))
    lo, hi = sigma_of_timesteps(torch.tensor([100.0, 101.0])).tolist()
    assert mid == pytest.approx((lo * hi) ** 0.5)  # log-linear between steps


# --- colour map ----------------------------------------------------------------------------

def test_colour_map_regions_and_vectors():
    h = region_boxes(16, 16, parse_cells("1,1"), "horizontal")
    assert h == [(slice(0, 8), slice(0, 16)), (slice(8, 16), slice(0, 16))]
    v = region_boxes(16, 16, parse_cells("1,1"), "vertical")
    assert v == [(slice(0, 16), slice(0, 8)), (slice(0, 16), slice(8, 16))]
    assert region_boxes(12, 20, parse_cells("1,3,1|2,1"), "vertical") == [
        (slice(0, 4), slice(0, 15)), (slice(0, 4), slice(15, 20)), (slice(4, 12), slice(0, 20))]
    with pytest.raises(ValueError):
        parse_cells("0,0")
    # red = 5,-5,-5: bri = -5/3; SD rows give ch1..3 = 0.02 * (-bri+c1+c3, bri/3+c1-c2, 2bri/3-c2+c3)
    assert colour_vector([5, -5, -5], "sd1") == pytest.approx([0.02 * 5 / 3, 0.02 * (-5 / 9 + 10), 0.02 * (-10 / 9)])
    assert colour_vector([1, 5, -5, -5], "sdxl") == pytest.approx([0.02 * 15, 0.02 * 0, 0.02 * 1])
    r = colour_map_ratio([0.1, -0.2, 0.05], 0, 1.0, 2, False)
    assert r == pytest.approx((5 + 10 + 2.5) / 10 / 1.1 * 0.5 * 0.85)
    assert colour_map_ratio([0.1, -0.2, 0.05], 1, 2.0, 6, True) == pytest.approx(17.5 / 10 / (1 + 2 ** 1.5 / 10) * 1.0 * 0.25 * 0.4)
    assert colour_map_ratio([0.4, -0.4, 0.4], 0, 2.0, 2, False) == 1.0  # capped: above 1 the push inverts and overflows


def test_colour_map_push_by_hand():
    x = torch.arange(1.0, 5.0).view(1, 4, 1, 1).repeat(2, 1, 2, 2)  # channel c holds c + 1
    box = [(slice(0, 1), slice(0, 2))]  # top row only
    out = colour_map_push(x, [False, True], box, [[0.1, -0.2, 0.3]], [0.5])
    for ch, v in zip((1, 2, 3), (0.1, -0.2, 0.3)):
        push = v * 6 * (ch + 1) * 0.5
        assert torch.allclose(out[0, ch, 0], torch.tensor(0.5 * (ch + 1) - push))
        assert torch.allclose(out[1, ch, 0], torch.tensor(0.5 * (ch + 1) + push))
        assert torch.equal(out[:, ch, 1], x[:, ch, 1])
    assert torch.equal(out[:, 0], x[:, 0])


def reference_colour_map_sample(unet, noise, cond, uncond, steps, values, family, cfg_scale=7.0):
    """The reference's sampler-level colour map: push the denoiser input x_in = [x; x] (cond
    rows first), then x0 = x_in - sigma * eps(c_in * x_in), CFG, Euler step on the sampler's x."""
    sigmas = sd_sigmas(steps)
    x = noise * sigmas[0]
    vectors = [colour_vector(c, family) for c in cdtuner.parse_colours(values["cm_colors"])]
    for i in range(steps):
        sigma = float(sigmas[i])
        x_in = torch.cat([x, x])
        if i < values["cm_stop"]:
            boxes = region_boxes(x.shape[-2], x.shape[-1], parse_cells(values["cm_ratios"]), values["cm_mode"])
            ratios = [colour_map_ratio(v, i, values["cm_strength"], values["cm_stop"], False) for v in vectors]
            x_in = colour_map_push(x_in, [False] * x.shape[0] + [True] * x.shape[0], boxes, vectors, ratios)
        t = torch.full((2 * x.shape[0],), sigma_to_t(sigma))
        eps = unet(x_in / (sigma ** 2 + 1) ** 0.5, t, context=torch.cat([cond, uncond]))
        d_c, d_u = (x_in - sigma * eps).chunk(2)
        denoised = d_u + cfg_scale * (d_c - d_u)
        x = x + (x - denoised) / sigma * (float(sigmas[i + 1]) - sigma)
    return x


def test_colour_map_hooks_equal_the_sampler_level_reference(make_unet):
    unet = make_unet("sd15")
    values = {**SPEC.defaults(), "enabled": True, "cm_colors": "5,-5,-5|0,0,5", "cm_ratios": "1,1", "cm_mode": "vertical",
              "cm_stop": 2}
    g = torch.Generator().manual_seed(5)
    cond, uncond, noise = torch.randn(1, 8, 64, generator=g), torch.randn(1, 8, 64, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    expected = reference_colour_map_sample(unet, noise, cond, uncond, 3, values, "sd1")
    before = snapshot(unet)
    clock = StepClock()
    clock.start(3)
    applied = apply_mods(unet, Settings({"cdtuner": values}), clock)
    got = euler_sample(unet, noise, cond, uncond, 3, clock)
    applied.restore()
    assert_restored(unet, before)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    plain = euler_sample(unet, noise, cond, uncond, 3, StepClock())
    assert (got - plain).abs().max() > 1e-2  # the map did something


def test_colour_map_too_strong_stops_with_a_message_instead_of_overflowing(make_unet):
    """Colours this strong grow the latent by ~40x per push: the reference's sample ends in
    inf/NaN; ours stops pushing at the first push past GROWTH_LIMIT, says so, and stays finite."""
    unet = make_unet("sd15")
    values = {**SPEC.defaults(), "enabled": True, "cm_colors": "400,-400,400", "cm_stop": 30, "cm_strength": 2.0}
    g = torch.Generator().manual_seed(5)
    cond, uncond, noise = torch.randn(1, 8, 64, generator=g), torch.randn(1, 8, 64, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    assert not torch.isfinite(reference_colour_map_sample(unet, noise, cond, uncond, 30, values, "sd1")).all()
    clock = StepClock()
    clock.start(30)
    applied = apply_mods(unet, Settings({"cdtuner": values}), clock)
    got = euler_sample(unet, noise, cond, uncond, 30, clock)
    applied.restore()
    assert torch.isfinite(got).all()
    assert [m for m in applied.messages if "colour map stopped at step" in m]
    assert (got - euler_sample(unet, noise, cond, uncond, 30, StepClock())).abs().max() > 1e-2  # it pushed before stopping


def test_push_is_sane_bounds():
    first = 2.0
    assert cdtuner.push_is_sane(first, torch.full((2, 4), cdtuner.GROWTH_LIMIT * first))
    assert not cdtuner.push_is_sane(first, torch.full((2, 4), cdtuner.GROWTH_LIMIT * first * 1.01))
    assert not cdtuner.push_is_sane(first, torch.tensor([0.0, float("nan")]))
    assert not cdtuner.push_is_sane(first, torch.tensor([0.0, float("inf")]))


def test_colour_map_needs_the_rows(make_unet):
    unet = make_unet("sd15")
    x = inputs(unet)
    base = unet(**x)
    clock = StepClock()
    clock.start(3)
    applied = apply_mods(unet, settings(cm_colors="5,-5,-5"), clock)
    assert torch.equal(unet(**x), base)
    assert any("uncond is unknown; colour map skipped" in m for m in applied.messages)
    applied.restore()


# --- saturation (VAE decoder) --------------------------------------------------------------

def test_saturation_hooks_equal_decoder_weight_edits():
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8)
    base = vae.decode(z)
    before = snapshot(vae)
    unet = build_unet("sd15", "tiny", seed=1)
    applied = apply_mods(unet, settings(sat=4.0, sat2=-5.0), StepClock(), vae=vae)
    hooked = vae.decode(z)
    applied.restore()
    assert_restored(vae, before)
    assert torch.equal(vae.decode(z), base)
    edits = Patcher(vae)
    modules = dict(vae.decoder.named_modules())
    for keys, f in ((cdtuner.SAT_KEYS, 1 + 0.075 * 4), (cdtuner.SAT2_KEYS, 1 - 0.02 * 5)):
        for key in keys:
            replace_parameter(edits, modules[key], "weight", modules[key].weight * f)
    edited = vae.decode(z)
    edits.restore()
    assert_restored(vae, before)
    assert not torch.allclose(hooked, base, atol=1e-3)
    torch.testing.assert_close(hooked, edited, rtol=1e-4, atol=1e-5)

    applied = apply_mods(unet, settings(sat=4.0), StepClock())
    assert applied.patcher is None and any("VAE decoder" in m for m in applied.messages)


# --- restore after success, interrupt and exception -----------------------------------------

EVERYTHING = dict(d1=3.0, d2=-2.0, con1=4.0, con2=2.0, bri=1.0, col1=-3.0, sat=3.0, sat2=4.0, cm_colors="5,-5,-5|0,0,5")


@pytest.mark.parametrize("failure", [None, KeyboardInterrupt, RuntimeError])
def test_restore_is_exact_after_success_interrupt_and_exception(make_unet, failure):
    unet, vae = make_unet("sd15"), tiny_vae()
    z = torch.randn(1, 4, 8, 8)
    x = inputs(unet)
    expected, decoded = unet(**x), vae.decode(z)
    before, vae_before = snapshot(unet), snapshot(vae)
    calls = []

    def interrupt(module, args):
        calls.append(1)
        if failure is not None and len(calls) == 2:
            raise failure("stop")

    handle = unet.register_forward_pre_hook(interrupt)
    try:
        if failure is None:
            sample(unet, "sd15", settings=settings(**EVERYTHING), vae=vae)
        else:
            with pytest.raises(failure):
                sample(unet, "sd15", settings=settings(**EVERYTHING), vae=vae)
    finally:
        handle.remove()
    assert_restored(unet, before)
    assert_restored(vae, vae_before)
    assert torch.equal(unet(**x), expected) and torch.equal(vae.decode(z), decoded)


def test_a_failing_apply_rolls_back(make_unet, monkeypatch):
    unet, vae = make_unet("sd15"), tiny_vae()
    before, vae_before = snapshot(unet), snapshot(vae)

    def boom(ctx, values):
        raise RuntimeError("boom")

    monkeypatch.setattr(cdtuner, "_apply_saturation", boom)
    with pytest.raises(RuntimeError):
        apply_mods(unet, settings(**EVERYTHING), StepClock(), vae=vae)
    assert_restored(unet, before)
    assert_restored(vae, vae_before)


# --- the text parameters ------------------------------------------------------------------

def test_text_parameters():
    colours, ratios = SPEC.param("cm_colors"), SPEC.param("cm_ratios")
    assert colours.coerce(" 5, -5, -5 | 0,0,5 ") == "5,-5,-5|0,0,5"
    assert colours.coerce("") == ""
    assert ratios.coerce("1,2,1|2,1") == "1,2,1|2,1"
    for bad in ("5;5;5", "5 5 5", "5,5", "a,b,c", "x=1"):
        with pytest.raises(ParamError, match="cdtuner.cm_colors"):
            colours.coerce(bad, "cdtuner.cm_colors")
    with pytest.raises(ParamError):
        ratios.coerce("-1,1")
    s = Settings.from_text("cdtuner d1=2 cm_colors=5,-5,-5|0,0,5 cm_mode=vertical", strict=True)
    assert Settings.from_text(s.to_text(), strict=True) == s
    assert Settings.from_infotext(s.infotext()) == s
