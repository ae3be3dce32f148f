"""ScaleCrafter: re-dilation operator, settings tables and SDXL mapping, progressive schedule,
dispersion matrix, NDCFG, LoRA-style class forwards, restore, composition."""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.apply import ApplyContext
from lib_unetmods.composition import RULES, PassInfo
from lib_unetmods.patcher import Patcher
from lib_unetmods.lab.random_unets import build_unet
from lib_unetmods.lab.sampler import euler_sample
from lib_unetmods.techniques import scalecrafter as sc
from lib_unetmods.techniques.scalecrafter_disperse import dispersion_system, load_or_solve, solve_dispersion
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = next((p for p in (os.path.join(ROOT, "..", "shared", "data"), os.path.join(ROOT, "..", "..", "shared", "data"))
             if os.path.isdir(p)), None)


def shared(name):
    if DATA is None:
        pytest.skip("shared/data (reference files) is not beside the checkout")
    return os.path.join(DATA, name)


def conv3(cin=6, cout=5, stride=1, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1).double()


def x_of(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the conv operator ------------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("d", [2, 3])
def test_integer_dilation_is_a_plain_dilated_conv(stride, d):
    conv = conv3(stride=stride)
    for h, w in [(16, 16), (13, 10), (7, 9)]:
        x = x_of(2, 6, h, w)
        out = sc.redilate(conv, x, float(d))
        assert torch.equal(out, F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=d, dilation=d))
        assert out.shape == conv(x).shape
    assert conv.dilation == (1, 1) and conv.padding == (1, 1)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_receptive_field_identity_conv(d):
    conv, x = conv3(), x_of(1, 6, 9, 7)
    up = lambda t: F.interpolate(t, scale_factor=d, mode="nearest")
    assert torch.allclose(sc.redilate(conv, up(x), float(d)), up(conv(x)), atol=1e-12)


def test_receptive_field_identity_resblock():
    """GroupNorm, SiLU, the emb add and 1x1 convs commute with nearest duplication, so a whole
    ResBlock with both convs dilated by d satisfies ResBlock_d(up_d(x)) = up_d(ResBlock(x))."""
    unet = build_unet("sd15", "tiny", seed=3)  # float32: ldm's GroupNorm32 computes in float32
    block = unet.input_blocks[4][0]  # 32 -> 64 channels: has a 1x1 skip conv too
    x, emb = x_of(2, 32, 6, 5).float(), x_of(2, unet.model_channels * 4, seed=2).float()
    d = 3
    expected = F.interpolate(block(x, emb), scale_factor=d, mode="nearest")
    patcher = Patcher(block)
    for conv in (block.in_layers[2], block.out_layers[3]):
        patcher.set_attr(conv, "forward", lambda t, c=conv: sc.redilate(c, t, float(d)))
    got = block(F.interpolate(x, scale_factor=d, mode="nearest"), emb)
    patcher.restore()
    assert torch.allclose(got, expected, atol=1e-5)
    assert "forward" not in block.in_layers[2].__dict__


@pytest.mark.parametrize("stride", [1, 2])
def test_fractional_dilation_sizes_and_value(stride):
    conv, s = conv3(stride=stride), 1.5
    for h, w in [(16, 16), (15, 11)]:
        x = x_of(1, 6, h, w)
        mid = (round(h * 2 / s), round(w * 2 / s))
        inner = F.conv2d(F.interpolate(x, size=mid, mode="bilinear", align_corners=False), conv.weight, conv.bias,
                         stride=stride, padding=2, dilation=2)
        expected = F.interpolate(inner, size=conv(x).shape[-2:], mode="bilinear", align_corners=False)
        out = sc.redilate(conv, x, s)
        assert out.shape == conv(x).shape
        assert torch.allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("d", [1, 2])
def test_dispersed_conv_equals_the_5x5_kernel(stride, d):
    conv, x = conv3(stride=stride), x_of(2, 6, 11, 12)
    r = torch.from_numpy(solve_dispersion())
    w5 = torch.einsum("tj,ocj->oct", r, conv.weight.flatten(2)).reshape(5, 6, 5, 5)
    expected = F.conv2d(x, w5, conv.bias, stride=stride, padding=2 * d, dilation=d)
    assert torch.allclose(sc.redilate(conv, x, float(d), r), expected, atol=1e-12)


def test_class_level_conv_forward_still_runs(monkeypatch):
    """The WebUI's Lora extension merges its weights inside a class-level Conv2d.forward."""
    conv, x = conv3(), x_of(1, 6, 10, 10)
    delta = 0.1 * torch.ones_like(conv.weight)
    merged = conv3()
    with torch.no_grad():
        merged.weight += delta
    r = torch.from_numpy(solve_dispersion())
    expected = sc.redilate(merged, x, 2.0), sc.redilate(merged, x, 1.5), sc.redilate(merged, x, 2.0, r)
    original = nn.Conv2d.forward
    monkeypatch.setattr(nn.Conv2d, "forward", lambda self, t: self._conv_forward(t, self.weight + delta, self.bias)
                        if self is conv else original(self, t))
    got = sc.redilate(conv, x, 2.0), sc.redilate(conv, x, 1.5), sc.redilate(conv, x, 2.0, r)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-12)


# --- schedule and settings -----------------------------------------------------------------

@pytest.mark.parametrize("tau,d,expected", [
    (35, 4, [4] * 9 + [3] * 9 + [2] * 17),
    (35, 3, [3] * 12 + [2] * 23),
    (37, 4, [4] * 10 + [3] * 9 + [2] * 18),
    (37, 3, [3] * 13 + [2] * 24),
])
def test_progressive_schedule(tau, d, expected):
    assert [sc.progressive_dilation(d, tau, i) for i in range(tau)] == expected


def test_step_factors_window_progressive_and_dispersion():
    plan = sc.Plan({"a": 4.0, "b": 2.5, "c": 1.0}, stop=0.7, progressive=True, disperse=frozenset({"a"}), disperse_stop=0.2)
    assert sc.step_factors(plan, 0, 50) == {"a": (2.0, True), "b": (3.0, False)}
    assert sc.step_factors(plan, 10, 50) == {"a": (3.0, False), "b": (2.0, False)}
    assert sc.step_factors(plan, 35, 50) == {}
    plain = sc.Plan({"b": 2.5}, stop=0.6)
    assert sc.step_factors(plain, 11, 20) == {"b": (2.5, False)} and sc.step_factors(plain, 12, 20) == {}


def _keys(arch):
    with open(shared(f"diffusers_keys_{arch}.txt")) as f:
        return {k.strip() for k in f if k.strip().endswith(("conv1", "conv2", "samplers.0.conv"))}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_diffusers_names_cover_exactly_the_reference_convs(arch):
    umap = map_unet(build_unet(arch, "tiny"))
    names = [sc.diffusers_name(n) for n, _, _ in umap.convs3x3]
    assert None not in names and len(set(names)) == len(names)
    assert set(names) == _keys(arch)


def test_every_table_entry_reaches_a_conv_and_sdxl_entries_are_remapped():
    for family, arch in (("sd1", "sd15"), ("sd2", "sd21"), ("sdxl", "sdxl")):
        names = {sc.diffusers_name(n) for n, _, _ in map_unet(build_unet(arch, "tiny")).convs3x3}
        for config in sc.REFERENCE[family]:
            for prefix in [*config.dilate, *config.ndcfg, *sc.DISPERSE[family]]:
                target = sc.sdxl_name(prefix) if family == "sdxl" else prefix
                assert any(n.startswith(target + ".") for n in names), (family, prefix)
    assert sc.sdxl_name("down_blocks.3.resnets.0.conv1") == "down_blocks.2.resnets.0.conv1"
    assert sc.sdxl_name("down_blocks.0.resnets.0.conv1") is None


def _plan(arch, pixels, **values):
    umap = map_unet(build_unet(arch, "tiny"))
    convs = {n: sc.diffusers_name(n) for n, _, _ in umap.convs3x3}
    v = sc.SPEC.defaults() | values
    return sc.make_plan(umap.family, umap.num_levels, convs, pixels / sc.native_size(umap.family, v) ** 2, v)


def test_reference_sizes_give_the_reference_settings():
    sd1 = _plan("sd15", 1024 * 1024)
    assert sd1.stop == 0.6 and sd1.ndcfg is None and not sd1.progressive
    assert {n for n, d in sd1.dilate.items() if d == 2} == {n for n in sd1.dilate if not n.startswith(
        ("input_blocks.1.", "input_blocks.2.", "input_blocks.3.", "output_blocks.9.", "output_blocks.10.", "output_blocks.11."))}
    assert set(sd1.dilate.values()) == {1.0, 2.0}
    big = _plan("sd15", 2048 * 2048)
    assert big.progressive and big.stop == big.ndcfg_stop == 0.7
    assert big.dilate["middle_block.0.in_layers.2"] == 4 and big.dilate["input_blocks.4.0.in_layers.2"] == 2
    assert big.ndcfg["input_blocks.4.0.in_layers.2"] == 1 and big.ndcfg["input_blocks.9.0.op"] == 3
    xl = _plan("sdxl", 2048 * 2048)  # down_blocks.3 of the SDXL file -> SDXL's deepest encoder level
    assert {n for n, d in xl.dilate.items() if d == 2} >= {"input_blocks.7.0.in_layers.2", "input_blocks.8.0.out_layers.3",
                                                            "middle_block.2.in_layers.2", "output_blocks.2.2.conv"}
    assert xl.dilate["input_blocks.6.0.op"] == 1 and xl.dilate["output_blocks.3.0.in_layers.2"] == 1


def test_any_size_scales_by_the_linear_ratio_and_overrides_win():
    assert set(_plan("sd15", 768 * 768).dilate.values()) == {1.0, 1.5}  # sqrt(2.25)
    assert set(_plan("sd15", 1024 * 1024, scale=1.5).dilate.values()) == {1.0, 3.0}
    assert not _plan("sd15", 512 * 512).active
    assert not _plan("sd21", 768 * 768).active and _plan("sd21", 768 * 768, native="512").active
    p = _plan("sd15", 1024 * 1024, level0=2.5, level3=1, stop=0.3)
    assert p.dilate["input_blocks.1.0.in_layers.2"] == 2.5 and p.dilate["middle_block.0.in_layers.2"] == 1
    assert p.dilate["output_blocks.2.1.conv"] == 1 and p.dilate["output_blocks.5.2.conv"] == 2 and p.stop == 0.3
    assert _plan("sd15", 2048 * 2048, ndcfg="off").ndcfg is None and _plan("sd15", 1024 * 1024, ndcfg="on").ndcfg == {
        n: 1.0 for n in p.dilate}


def test_bad_values_are_reported():
    s = Settings.from_text("scalecrafter native=640 scale=0 progressive=maybe")
    assert len(s.errors) == 3 and all(e.startswith("scalecrafter.") for e in s.errors)


# --- dispersion -------------------------------------------------------------------------

def test_dispersion_matrix_matches_the_shipped_one_and_its_properties(tmp_path):
    from scipy.io import loadmat

    r = solve_dispersion()
    assert r.shape == (25, 9)
    assert np.abs(r - loadmat(shared("R20to1_new.mat"))["R"]).max() < 1e-12
    delta3, delta5 = np.eye(9)[4], np.eye(25)[12]
    assert np.abs(r @ delta3 - delta5).max() < 1e-12
    k = np.random.default_rng(0).standard_normal((3, 3))
    for op in (np.transpose, np.fliplr):
        assert np.array_equal(op((r @ op(k).ravel()).reshape(5, 5)), (r @ k.ravel()).reshape(5, 5)) or \
            np.abs(op((r @ op(k).ravel()).reshape(5, 5)) - (r @ k.ravel()).reshape(5, 5)).max() < 1e-14
    lhs, rhs = dispersion_system()
    for _ in range(20):
        k = np.random.default_rng(_).standard_normal(9)
        loss = lambda b: np.sum((lhs @ b - rhs @ k) ** 2)
        zero_inserted = np.zeros((5, 5))
        zero_inserted[::2, ::2] = k.reshape(3, 3)
        centred = np.pad(k.reshape(3, 3), 1).ravel()
        assert loss(r @ k) <= min(loss(zero_inserted.ravel()), loss(centred))
    path = tmp_path / "R.safetensors"
    first = load_or_solve(path)
    assert path.exists() and torch.equal(load_or_solve(path), first)
    path.write_bytes(b"garbage")
    assert torch.equal(load_or_solve(path), first)


# --- in the UNet ------------------------------------------------------------------------

def _inputs(unet, batch=2, size=16):
    g = torch.Generator().manual_seed(5)
    ctx_dim = next(m for n, m in unet.named_modules() if n.endswith("attn2")).to_k.in_features
    return (torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 77, ctx_dim, generator=g),
            torch.randn(batch, 77, ctx_dim, generator=g))


def _sample(unet, settings, steps=2, plan=None, size=16):
    noise, cond, uncond = _inputs(unet, 1, size)
    y = torch.randn(1, unet.label_emb[0][0].in_features, generator=torch.Generator().manual_seed(6)) if unet.num_classes else None
    clock = StepClock()
    clock.start(steps)
    if plan is None:
        applied = apply_mods(unet, Settings.from_text(settings), clock, latent_shape=noise.shape)
    else:  # a hand-made plan, installed as apply() would
        umap, patcher = map_unet(unet), Patcher(unet)
        ctx = ApplyContext(umap, patcher, clock, latent_shape=noise.shape, technique="scalecrafter")
        values = sc.SPEC.defaults() | {"enabled": True, "ndcfg": "on"}
        rt = sc.Runtime(ctx, values, {n: sc.diffusers_name(n) for n, _, _ in umap.convs3x3})
        rt.plans[tuple(noise.shape[-2:])] = plan(umap)
        sc.install(ctx, rt)
        ctx.calls.install(unet, patcher)  # as apply_mods does after the techniques
        applied = type("A", (), {"restore": patcher.restore, "messages": ctx.messages})()
    out = euler_sample(unet, noise, cond, uncond, steps, clock, cfg_scale=6.0, y=y)
    applied.restore()
    return out


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_unet_window_identity_and_restore(arch):
    unet = build_unet(arch, "tiny", seed=1)
    before = snapshot(unet)
    base = _sample(unet, "", steps=3)
    assert torch.equal(_sample(unet, "scalecrafter level0=1 level1=1 level2=1 level3=1", steps=3), base)  # s = 1
    assert torch.equal(_sample(unet, "scalecrafter level1=2 stop=0.01", steps=3), base)  # empty window
    assert not torch.allclose(_sample(unet, "scalecrafter level1=2 level2=1.5 stop=0.5", steps=3), base, atol=1e-3)
    assert not torch.allclose(_sample(unet, "scalecrafter level1=4 disperse=true", steps=3), base, atol=1e-3)
    assert_restored(unet, before)


def test_ndcfg_reduces_to_cfg_and_combines_as_the_reference():
    unet = build_unet("sd15", "tiny", seed=2)
    dil = lambda umap: {n: (2.0 if lvl >= 1 else 1.0) for n, _, lvl in umap.convs3x3}
    base = _sample(unet, "")
    # empty dilation and empty NDCFG settings: plain CFG
    none = _sample(unet, "", plan=lambda umap: sc.Plan({n: 1.0 for n, _, _ in umap.convs3x3}, 1.0, ndcfg={}, ndcfg_stop=1.0))
    assert torch.allclose(none, base, rtol=1e-4, atol=1e-4), (none - base).abs().max()
    # NDCFG settings equal to the main ones: plain CFG on the dilated model
    dilated = _sample(unet, "", plan=lambda umap: sc.Plan(dil(umap), 1.0))
    same = _sample(unet, "", plan=lambda umap: sc.Plan(dil(umap), 1.0, ndcfg=dil(umap), ndcfg_stop=1.0))
    assert torch.allclose(same, dilated, rtol=1e-4, atol=1e-4) and not torch.allclose(dilated, base, atol=1e-3)
    damped = _sample(unet, "", plan=lambda umap: sc.Plan(dil(umap), 1.0, ndcfg={}, ndcfg_stop=1.0))
    assert not torch.allclose(damped, dilated, atol=1e-3)
    # outside its window NDCFG changes nothing
    late = _sample(unet, "", plan=lambda umap: sc.Plan(dil(umap), 1.0, ndcfg={}, ndcfg_stop=0.01))
    assert torch.equal(late, dilated)


def test_ndcfg_runs_one_extra_pass_over_the_uncond_rows():
    unet = build_unet("sd15", "tiny", seed=2)
    rows = []
    handle = unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    _sample(unet, "", steps=2, plan=lambda umap: sc.Plan({n: 2.0 for n, _, _ in umap.convs3x3}, 1.0, ndcfg={}, ndcfg_stop=0.5))
    handle.remove()
    assert rows == [2, 1, 2]  # step 0: batch + uncond rows; step 1: outside the NDCFG window


def test_composition_rules_turn_off_the_other_resizer():
    settings = Settings.from_text("scalecrafter")
    settings.values["deepshrink"] = {"enabled": True}
    settings.values["hidiffusion"] = {"enabled": True, "rau_net": True, "msw_msa": True}
    for rule in RULES:
        if rule.techniques[0] == "scalecrafter" and rule.applies(settings, None, PassInfo()):
            rule.resolve(settings, None)
    assert settings["deepshrink"]["enabled"] is False
    assert settings["hidiffusion"] == {"enabled": True, "rau_net": False, "msw_msa": True}
