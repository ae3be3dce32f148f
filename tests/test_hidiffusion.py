"""HiDiffusion: the §3.4 schedule, RAD/RAU/pool operators, MSW-MSA windows, the step clock, restore,
composition rules and parity with the hidiffusion package."""
import math
import random
import warnings

import pytest
import torch

from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.composition import resolve_conflicts
from lib_unetmods.lab.random_unets import sdpa_attention
from lib_unetmods.techniques import hidiffusion as hd
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot
from tiny_unet_calls import attn1_patch_of_another_extension

ALL_OFF = "hidiffusion auto=false t1=0 t2=0 msw_end=0"
ALL_ON = "hidiffusion auto=false t1=1 t2=1"


def run(unet, text, inputs, steps=10, step=0, seed=0, hires=False, latent_shape=None):
    """One UNet call at `step` of a pass of `steps`, patched with `text`; returns (output, messages)."""
    clock = StepClock()
    clock.start(steps, hires)
    applied = apply_mods(unet, Settings.from_text(text, strict=True), clock, seed=seed, latent_shape=latent_shape)
    clock.begin_step(step)
    try:
        return unet(**inputs), applied.messages
    finally:
        applied.restore()


def values(text=""):
    return Settings.from_text(f"hidiffusion {text}", strict=True)["hidiffusion"]


# --- schedule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family, hw, inpainting, rad, pool", [
    ("sd1", (128, 128), False, (0, 20), (0, 0)),    # SD1.5 1024²: RAD/RAU steps 0-19
    ("sd1", (256, 256), False, (0, 35), (0, 15)),   # SD1.5 2048²: RAD/RAU 0-34, pool pair 0-14
    ("sd1", (128, 384), False, (0, 20), (0, 0)),    # one side below 2048 px: the 1024 row
    ("sd2", (256, 320), False, (0, 35), (0, 15)),
    ("sdxl", (256, 256), False, (0, 8), (8, 20)),   # SDXL 2048², aggressive: RAD/RAU 0-7, then pool 8-19
    ("sdxl", (512, 512), False, (0, 15), (0, 35)),  # SDXL 4096²: pool 0-34, RAD/RAU 0-14
    ("sdxl", (256, 256), True, (0, 0), (0, 20)),    # inpainting is never aggressive
    ("sd1", (64, 64), False, (0, 0), (0, 0)),       # auto: nothing at the native size
    ("sdxl", (128, 128), False, (0, 0), (0, 0)),
])
def test_auto_schedule_matches_the_reference_table(family, hw, inpainting, rad, pool):
    assert hd.schedule(family, values(), *hw, 50, inpainting) == hd.Schedule(rad, pool)


def test_manual_and_custom_schedules():
    assert hd.schedule("sd1", values("auto=false t1=0.6 t2=0.4"), 16, 16, 5) == hd.Schedule((0, 3), (0, 2))
    assert hd.schedule("sdxl", values("auto=false t1=0.6 t2=0.4"), 16, 16, 5) == hd.Schedule((0, 2), (0, 3))
    assert hd.schedule("sd1", values("auto=false t1=0.4 aggressive=true"), 99, 99, 25) == hd.Schedule((0, 4), (4, 10))
    custom = values("custom_windows=true start=0.1 end=0.5 pool_start=0.2 pool_end=0.3")
    assert hd.schedule("sd1", custom, 8, 8, 20) == hd.Schedule((2, 10), (4, 6))


# --- operators --------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(16, 16), (17, 23), (9, 30)])
def test_rad_is_downsample_of_the_subsampled_map_and_upsample_to_is_x2(make_unet, hw):
    unet = make_unet("sd15")
    conv = unet.input_blocks[3][0].op
    x = torch.randn(2, conv.in_channels, *hw, generator=torch.Generator().manual_seed(0))
    out = hd.rad(conv, x)
    assert torch.equal(out, conv(x[..., ::2, ::2]))
    assert out.shape[-2:] == (math.ceil(hw[0] / 4), math.ceil(hw[1] / 4))
    assert (conv.stride, conv.padding, conv.dilation) == ((2, 2), (1, 1), (1, 1))
    up = unet.output_blocks[8][-1]
    y = torch.randn(1, up.channels, *hw)
    assert torch.equal(hd.upsample_to(up, y, (2 * hw[0], 2 * hw[1])), up(y))
    assert hd.upsample_to(up, y, (4 * hw[0] + 1, 3)).shape[-2:] == (4 * hw[0] + 1, 3)


@pytest.mark.parametrize("hw", [(8, 8), (6, 10), (7, 9), (5, 5), (2, 3)])
def test_window_partition_and_reverse(hw):
    h, w = hw
    x = torch.randn(2, h * w, 3)
    wh, ww = hd.window_size(h, w)
    for k in range(4):
        shift = hd.shift_of(k, h, w)
        assert shift == (k * (wh // 4), k * (ww // 4))
        windows = hd.partition(x, h, w, shift)
        assert [t.shape[1] for t in windows] == [wh * ww, wh * (w - ww), (h - wh) * ww, (h - wh) * (w - ww)]
        assert torch.equal(hd.reverse(windows, h, w, shift), x)
    grid = torch.arange(h * w).view(1, h * w, 1)
    assert hd.partition(grid, h, w, (0, 0))[0].flatten().tolist() == [r * w + c for r in range(wh) for c in range(ww)]


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_window_attention_is_local_to_its_quadrant(make_unet, hw):
    h, w = hw
    attn = make_unet("sd15").input_blocks[1][1].transformer_blocks[0].attn1
    x = torch.randn(1, h * w, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    out = hd.window_attention(attn, x, h, w, (0, 0))
    per_window = hd.reverse([attn(t) for t in hd.partition(x, h, w, (0, 0))], h, w, (0, 0))
    assert torch.allclose(out, per_window, atol=1e-6)  # the batched call keeps the window order
    wh, ww = hd.window_size(h, w)
    x2 = x.clone()
    x2[0, 1 * w + 2] += 1.0  # a token of the top-left quadrant
    changed = (hd.window_attention(attn, x2, h, w, (0, 0)) - out).abs().amax(-1)[0].view(h, w) > 0
    assert changed[:wh, :ww].any() and not changed[wh:].any() and not changed[:, ww:].any()
    assert not torch.allclose(out, attn(x), atol=1e-4)


# --- the patched UNet ---------------------------------------------------------------------------

def test_inactive_is_bit_identical(tiny_unet, make_inputs):
    inputs = make_inputs(tiny_unet, batch=2, height=16, width=24)
    expected = tiny_unet(**inputs)
    assert torch.equal(run(tiny_unet, ALL_OFF, inputs)[0], expected)
    # past the T1 window with MSW-MSA off: the Upsample-to-skip wrappers are a plain x2
    assert torch.equal(run(tiny_unet, "hidiffusion auto=false t1=0.4 msw_msa=false", inputs, step=4)[0], expected)
    assert not torch.allclose(run(tiny_unet, "hidiffusion auto=false t1=0.4 msw_msa=false", inputs, step=3)[0], expected)


@pytest.mark.parametrize("hw", [(17, 23), (13, 30), (24, 9)])
def test_output_shape_equals_input_shape_for_any_size(tiny_unet, make_inputs, hw):
    inputs = make_inputs(tiny_unet, batch=2, height=hw[0], width=hw[1])
    umap = map_unet(tiny_unet)
    rad_in, pool_in = hd.rau_pair(umap, "auto")[0], hd.pool_pair(umap, "auto")[0]
    seen = []
    handle = tiny_unet.input_blocks[rad_in].register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape[-2:])))
    try:
        out, messages = run(tiny_unet, ALL_ON, inputs)
        off, _ = run(tiny_unet, ALL_OFF, inputs)
    finally:
        handle.remove()
    size = [hw[0], hw[1]]
    for _ in range(umap.inputs[rad_in].level_in + (pool_in < rad_in)):  # SDXL pools before its RAD
        size = [math.ceil(s / 2) for s in size]
    assert seen[0] == (math.ceil(size[0] / 4), math.ceil(size[1] / 4))  # RAD ran
    assert out.shape == off.shape == inputs["x"].shape and torch.isfinite(out).all() and messages == []
    assert not torch.allclose(out, off, atol=1e-4)


def test_restore_is_exact(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=16, width=16)
    expected = unet(**inputs)
    before = snapshot(unet)
    clock = StepClock()
    clock.start(10)
    applied = apply_mods(unet, Settings.from_text(ALL_ON), clock, seed=5)
    assert not torch.allclose(unet(**inputs), expected, atol=1e-4)
    applied.restore()
    assert_restored(unet, before)
    assert torch.equal(unet(**inputs), expected)


def test_a_forward_that_raises_leaves_no_call_state_behind(make_unet, make_inputs):
    """An exception inside the UNet (an interrupt, another extension) must not leave the Upsample
    wrappers bound to the dead call: they would resize to its skip sizes and keep its tensors."""
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=16, width=24)
    upsample = unet.output_blocks[2][-1]
    y = torch.randn(1, upsample.channels, 3, 3)
    plain_up = upsample(y)
    clock = StepClock()
    clock.start(10)
    applied = apply_mods(unet, Settings.from_text(ALL_ON), clock, seed=2)
    try:
        expected = unet(**inputs)

        def fail(module, args, out):
            raise RuntimeError("boom")

        handle = unet.output_blocks[5].register_forward_hook(fail)  # after output 2's Upsample ran
        with pytest.raises(RuntimeError, match="boom"):
            unet(**inputs)
        handle.remove()
        assert torch.equal(upsample(y), plain_up)  # outside a UNet call: the plain x2, not the dead call's sizes
        assert torch.equal(unet(**inputs), expected)
    finally:
        applied.restore()


def test_shifts_use_a_private_generator_seeded_by_the_image_seed(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    text = "hidiffusion rau_net=false"
    layers = len(hd.msw_layers(map_unet(unet)))
    ks = {s: [hd.shift_index(s, False, 0, i) for i in range(layers)] for s in range(20)}
    a, b = next((a, b) for a in ks for b in ks if ks[a] != ks[b])
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    out_a = run(unet, text, inputs, seed=a)[0]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert torch.equal(run(unet, text, inputs, seed=a)[0], out_a)
    assert not torch.allclose(run(unet, text, inputs, seed=b)[0], out_a, atol=1e-5)


def test_split_cond_uncond_batches_see_the_same_windows(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=16, width=16)
    clock = StepClock()
    clock.start(10)
    applied = apply_mods(unet, Settings.from_text(ALL_ON), clock, seed=3)
    clock.begin_step(2)
    joint = unet(**inputs)
    rows = [unet(**{k: v[i:i + 1] for k, v in inputs.items() if v is not None}) for i in range(2)]
    applied.restore()
    assert clock.calls_in_step == 3
    assert torch.allclose(torch.cat(rows), joint, atol=1e-5)


@pytest.mark.parametrize("arch, text, steps, rad_steps, pool_steps", [
    ("sd15", "hidiffusion auto=false t1=0.4 t2=0.2", 5, range(0, 2), range(0, 1)),
    ("sdxl", "hidiffusion auto=false t1=0.4 aggressive=true", 13, range(0, 2), range(2, 5)),  # int(8/50*13) = 2
])
def test_switch_timing_counts_sampler_steps(make_unet, make_inputs, arch, text, steps, rad_steps, pool_steps):
    """A second-order sampler calls the UNet twice per step: both calls of a step share the stage."""
    unet = make_unet(arch)
    umap = map_unet(unet)
    (rad_in, _), (pool_in, _) = hd.rau_pair(umap, "auto"), hd.pool_pair(umap, "auto")
    inputs = make_inputs(unet, batch=2, height=16, width=16)
    seen = {}
    hooks = [unet.input_blocks[rad_in].register_forward_hook(lambda m, a, o: seen.__setitem__("rad", o.shape[-1])),
             unet.input_blocks[pool_in + 1].register_forward_pre_hook(lambda m, a: seen.__setitem__("pool", a[0].shape[-1]))]
    clock = StepClock()
    clock.start(steps)
    applied = apply_mods(unet, Settings.from_text(text), clock)
    log = []
    try:
        for step in range(steps):
            clock.begin_step(step)
            for _ in range(2):
                unet(**inputs)
                log.append((step, seen["rad"], seen["pool"]))
    finally:
        applied.restore()
        for h in hooks:
            h.remove()
    assert len(log) == 2 * steps
    for step, rad_w, pool_w in log:
        rad_on, pool_on = step in rad_steps, step in pool_steps
        # each active stage halves the width once more for the blocks after it
        assert rad_w == 16 >> (umap.inputs[rad_in].level_out + rad_on + (pool_on and pool_in < rad_in)), step
        assert pool_w == 16 >> (umap.inputs[pool_in].level_out + pool_on + (rad_on and rad_in < pool_in)), step


def test_hires_pass_is_off_by_default(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    expected = unet(**inputs)
    assert torch.equal(run(unet, ALL_ON, inputs, hires=True)[0], expected)
    assert not torch.allclose(run(unet, ALL_ON + " hires=true", inputs, hires=True)[0], expected, atol=1e-4)


def test_auto_leaves_rau_net_off_at_the_native_size(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    msw_only = run(unet, "hidiffusion rau_net=false", inputs)[0]
    out, messages = run(unet, "hidiffusion", inputs, latent_shape=(1, 4, 16, 16))
    assert torch.equal(out, msw_only)
    assert any("not needed at 128x128" in m for m in messages)


def test_bad_block_choices_are_refused_with_a_message(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    before = snapshot(unet)
    _, messages = run(unet, "hidiffusion rau_blocks=3/5", inputs)
    assert any("RAU-Net skipped: RAD/RAU blocks 3/5 do not fit this sd1 UNet; valid: 3/8, 6/5, 9/2" in m for m in messages)
    clock = StepClock()
    applied = apply_mods(unet, Settings.from_text("hidiffusion msw_msa=false pool_blocks=4/4"), clock)
    assert applied.patcher is None and any(m.startswith("HiDiffusion skipped: pooled pair blocks 4/4") for m in applied.messages)
    assert_restored(unet, before)
    assert "t1" in Settings.from_text("hidiffusion t1=1.5").errors[0]
    sdxl = make_unet("sdxl")
    assert "valid: 3/5, 6/2" in apply_mods(sdxl, Settings.from_text("hidiffusion msw_msa=false rau_blocks=3/8"), clock).messages[0]


def test_msw_msa_leaves_already_wrapped_attention_alone(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    layer = hd.msw_layers(map_unet(unet))[0]
    unet_attn = layer.module
    unet_attn.forward = lambda x, context=None, mask=None, **kw: type(unet_attn).forward(unet_attn, x, context, mask)
    try:
        _, messages = run(unet, "hidiffusion rau_net=false", inputs)
    finally:
        del unet_attn.forward
    assert messages == [f"HiDiffusion: MSW-MSA skipped on {layer.name}: its attention is already wrapped "
                        "(HyperTile, ToMe or another extension)"]


def test_msw_layers_follow_the_reference(make_unet):
    assert [a.name for a in hd.msw_layers(map_unet(make_unet("sd15")))] == [
        f"{b}.1.transformer_blocks.0.attn1" for b in
        ("input_blocks.1", "input_blocks.2", "output_blocks.9", "output_blocks.10", "output_blocks.11")]
    sdxl = map_unet(make_unet("sdxl"))
    assert {a.name.split(".1.transformer")[0] for a in hd.msw_layers(sdxl)} == {
        "input_blocks.4", "input_blocks.5", "output_blocks.3", "output_blocks.4", "output_blocks.5"}


# --- composition --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, other, rau_net, msw_msa", [
    ("sd15", "deepshrink", False, True),
    ("sd15", "hypertile", True, False),
    ("sdxl", "hypertile max_depth=0", True, False),  # SDXL windows level 1, HyperTile's SDXL depth 0 tiles it too
    ("sd15", "tome", True, False),
    ("sdxl", "tome max_downsample=1", True, True),
    ("sdxl", "tome", True, False),  # auto = 2 on SDXL
    ("sd15", "tome merge_attn=false", True, True),
])
def test_composition_rules(make_unet, arch, other, rau_net, msw_msa):
    unet = make_unet(arch)
    resolved, notes = resolve_conflicts(Settings.from_text(f"hidiffusion; {other}", strict=True), map_unet(unet))
    assert (resolved["hidiffusion"]["rau_net"], resolved["hidiffusion"]["msw_msa"]) == (rau_net, msw_msa)
    assert len(notes) == (not (rau_net and msw_msa))
    title = {"deepshrink": "Deep Shrink", "hypertile": "HyperTile", "tome": "ToMe"}[other.split()[0]]
    assert all(n.startswith(("HiDiffusion", title)) and f"{title} wins" in n for n in notes)


def test_deep_shrink_wins_in_apply(make_unet):
    unet = make_unet("sd15")
    clock = StepClock()
    clock.start(10)  # Deep Shrink acts in the first 3 of 10 steps (a 1-step pass gives it nothing to do)
    applied = apply_mods(unet, Settings.from_text("hidiffusion; deepshrink"), clock)
    assert "Deep Shrink wins" in applied.messages[0]
    assert "forward" not in unet.input_blocks[3][0].__dict__  # no RAD
    assert "forward" in hd.msw_layers(map_unet(unet))[0].module.__dict__  # MSW-MSA still on
    applied.restore()


# --- parity with the reference package ----------------------------------------------------------

SDXL_DEPTH = (0, 2, 2)  # two transformer blocks at the windowed level, as the reference's SDXL key list names


def _parity_unet(arch):
    from lib_unetmods.lab.random_unets import build_unet, randomize, set_transformer_depth

    unet = build_unet(arch, "tiny", seed=1)
    if arch == "sdxl":
        for m in unet.modules():
            if hasattr(m, "transformer_blocks"):
                set_transformer_depth(m, SDXL_DEPTH[(m.in_channels // unet.model_channels).bit_length() - 1])
        randomize(unet, 1)
    return unet


def _diffusers_twin(unet, arch):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from lib_unetmods.lab.random_unets import ADM_CHANNELS, _TINY

    params = dict(_TINY[arch], in_channels=4, out_channels=4, num_res_blocks=2, transformer_depth=1)
    if arch == "sdxl":  # context_dim 64 makes the converter map label_emb(y) to class_embedding(class_labels)
        params.update(transformer_depth=list(SDXL_DEPTH), num_classes="sequential", adm_in_channels=ADM_CHANNELS)
    config = {"model": {"params": {"unet_config": {"params": params},
                                   "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = create_unet_diffusers_config_from_ldm(config, checkpoint, image_size=512)
    twin = UNet2DConditionModel(**cfg)
    twin.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, cfg))
    return twin.eval().requires_grad_(False)


# (arch, latent H x W, reference table row and ratios, reference aggressive, MSW-MSA, our settings, steps).
# 18x28 (SD1.5) and 40x56 (SDXL): the windowed maps have window sides 9/14 and 10/14, where k * (w // 4)
# differs from (k * w) // 4, round(k * w / 4) and ceil; the pooled maps (5x7 after SD1.5's RAD, 19x27 on
# SDXL) are odd, where avg_pool2d's ceil_mode changes the size. The reference falls back to a lossy resize
# for odd windowed maps, so MSW-MSA is off where they are odd.
PARITY_CASES = [
    ("sd15", (16, 24), "sd15_1024", (0.6, 0.4), None, True, "auto=false t1=0.6 t2=0.4", 5),
    ("sd15", (18, 28), "sd15_1024", (0.6, 0.4), None, True, "auto=false t1=0.6 t2=0.4", 5),
    ("sd15", (17, 23), "sd15_1024", (0.6, 0.4), None, False, "auto=false t1=0.6 t2=0.4 msw_msa=false", 5),
    # SDXL, aggressive: RAD/RAU (T2 blocks) for step 0 = int(8/50*7), then the pooled pair up to int(0.6*7)
    ("sdxl", (40, 56), "sdxl_2048", (0.6, 0.0), True, True, "auto=false t1=0.6 aggressive=true", 7),
    ("sdxl", (38, 54), "sdxl_2048", (0.6, 0.0), True, False, "auto=false t1=0.6 aggressive=true msw_msa=false", 7),
    # SDXL, not aggressive: T1 drives the pooled pair and T2 the RAD/RAU pair (the swap against SD1.5)
    ("sdxl", (40, 56), "sdxl_2048", (0.6, 0.4), False, True, "auto=false t1=0.6 t2=0.4", 5),
    ("sdxl", (38, 54), "sdxl_2048", (0.6, 0.4), False, False, "auto=false t1=0.6 t2=0.4 msw_msa=false", 5),
]


@pytest.mark.parametrize("arch, hw, row, ratios, aggressive, msw, text, steps", PARITY_CASES)
def test_parity_with_the_hidiffusion_package(make_inputs, monkeypatch, arch, hw, row, ratios, aggressive, msw, text, steps):
    """Per step, with the same pinned shift k = step % 4, against the hidiffusion package on the
    same weights. Needs diffusers (<= 0.40, for hidiffusion 0.1.10's imports) next to the venv."""
    pytest.importorskip("diffusers")
    ref_module = pytest.importorskip("hidiffusion.hidiffusion")
    unet = _parity_unet(arch)
    twin = _diffusers_twin(unet, arch)
    twin.name_or_path = "" if arch == "sd15" else "stabilityai/stable-diffusion-xl-base-1.0"
    twin._num_timesteps = steps
    monkeypatch.setitem(ref_module.switching_threshold_ratio_dict, row, {"T1_ratio": ratios[0], "T2_ratio": ratios[1]})
    if aggressive is not None:
        monkeypatch.setattr(ref_module, "is_aggressive_raunet", aggressive)
    inputs = make_inputs(unet, batch=2, height=hw[0], width=hw[1])
    extra = {"class_labels": inputs["y"]} if inputs["y"] is not None else {}
    plain = twin(inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"], **extra).sample
    ref_module.apply_hidiffusion(twin, apply_window_attn=msw)
    clock = StepClock()
    clock.start(steps)
    rand = torch.rand
    with sdpa_attention():
        applied = apply_mods(unet, Settings.from_text(f"hidiffusion {text}", strict=True), clock)
        assert applied.messages == []
        try:
            for step in range(steps):
                k = step % 4
                monkeypatch.setattr(hd, "shift_index", lambda *a, k=k: k)
                monkeypatch.setattr(torch, "rand", lambda *a, k=k, **kw: torch.full((1,), (k + 0.5) / 4))
                expected = twin(inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"], **extra).sample
                monkeypatch.setattr(torch, "rand", rand)
                clock.begin_step(step)
                out = unet(**inputs)
                assert ((out - expected).norm() / expected.norm()) < 1e-5, step
                first = out if step == 0 else first
        finally:
            applied.restore()
            ref_module.remove_hidiffusion(twin)
        assert not torch.allclose(first, plain, atol=1e-3)  # a RAU-Net stage ran at step 0: not a parity of no-ops


def test_msw_msa_yields_to_another_extensions_attn1_patch_and_says_so(make_unet, make_inputs):
    """Forge's attn1_patch gives self-attention a context: MSW-MSA leaves those calls to it and says so."""
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=32, width=32)
    with attn1_patch_of_another_extension(unet):
        expected = unet(**inputs)
        clock = StepClock()
        clock.start(1)
        applied = apply_mods(unet, Settings.from_text("hidiffusion rau_net=false"), clock, latent_shape=(2, 4, 32, 32))
        got = unet(**inputs)
        applied.restore()
    assert torch.equal(got, expected)
    assert sum("MSW-MSA yields" in m for m in applied.messages) == 1
