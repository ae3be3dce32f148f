"""DeepCache: schedules, cheap-step semantics, cache safety (per call, batch shape, sigma, pass),
bit-identity when neutral, exact restore (hosts and ControlNet: test_hosts.py)."""
import ast
import os
import types
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.lab.sampler import euler_sample
from lib_unetmods.techniques.deepcache import full_steps, quad_center_steps
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot
from tiny_unet_calls import announce

import ldm.modules.diffusionmodules.openaimodel as openaimodel


def dc(text: str = "") -> Settings:
    return Settings.from_text(f"deepcache {text}", strict=True)


def call(unet, inputs, clock, step):
    clock.begin_step(step)
    return unet(inputs["x"], inputs["timesteps"], context=inputs["context"], y=inputs["y"])


def inputs_at(unet, t, seed, batch=2, size=8):
    from lib_unetmods.lab.random_unets import example_inputs

    inputs = example_inputs(unet, batch=batch, height=size, width=size, seed=seed, tokens=8)
    inputs["timesteps"] = torch.full((batch,), float(t))
    return inputs


@contextmanager
def entering(unet, index):
    """Record h entering output_blocks[index] before its concat (the first h_channels channels)."""
    h_channels = map_unet(unet).h_channels[index]
    seen = []
    handle = unet.output_blocks[index].register_forward_pre_hook(lambda m, args: seen.append(args[0][:, :h_channels].clone()))
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def counting(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


@torch.no_grad()
def cheap_reference(unet, inputs, k, h):
    """The cheap step written out from the design doc: input_blocks[0..k] fresh, then
    output_blocks[L-k..L] on cat([h, skip]) starting from the cached h, then out."""
    emb = unet.time_embed(openaimodel.timestep_embedding(inputs["timesteps"], unet.model_channels, repeat_only=False))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(inputs["y"])
    hs, x = [], inputs["x"]
    for block in unet.input_blocks[:k + 1]:
        x = block(x, emb, inputs["context"])
        hs.append(x)
    for block in unet.output_blocks[len(unet.output_blocks) - 1 - k:]:
        h = block(torch.cat([h, hs.pop()], dim=1), emb, inputs["context"])
    return unet.out(h)


def unpatched(unet, inputs):
    """The class forward, bypassing the patch (calling the patched UNet would be a call of the step)."""
    with torch.no_grad():
        return type(unet).forward(unet, inputs["x"], inputs["timesteps"], context=inputs["context"], y=inputs["y"])


# --- schedules ---------------------------------------------------------------------------

def test_schedule_vectors():
    assert quad_center_steps(50, 10, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert quad_center_steps(50, 17, 15, 1.4) == [0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46]
    assert full_steps(50, 5, "nonuniform", 0.3, 1.4) == {0, 5, 9, 13, 17, 21, 26, 31, 37, 43}
    assert full_steps(50, 3, "nonuniform", 0.3, 1.4) == set(quad_center_steps(50, 17, 15, 1.4))
    assert full_steps(10, 3, "uniform") == {0, 3, 6, 9}
    assert full_steps(7, 1, "nonuniform") == set(range(7))
    with pytest.raises(ValueError):
        quad_center_steps(10, 10, 9, 1.1)


def _reference_quad_center():
    import DeepCache

    path = os.path.join(os.path.dirname(DeepCache.__file__), "sd", "pipeline_stable_diffusion.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    namespace = {"np": np}
    exec(compile(ast.Module([fn], []), path, "exec"), namespace)  # the reference function as shipped
    return namespace["sample_from_quad_center"]


def test_nonuniform_matches_the_reference_function():
    pytest.importorskip("DeepCache")
    reference = _reference_quad_center()
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's ComplexWarning in the reference
        for total in range(8, 61, 4):
            for interval in (2, 3, 4, 5):
                for ratio in (0.2, 0.3, 0.5):
                    center = int(ratio * total)
                    n_full = -(-total // interval)
                    try:
                        expected = [int(v) for v in reference(total, n_full, center, 1.4)[0]]
                    except ValueError:
                        with pytest.raises(ValueError):
                            quad_center_steps(total, n_full, center, 1.4)
                        continue
                    assert quad_center_steps(total, n_full, center, 1.4) == expected, (total, interval, ratio)
                    checked += 1
    assert checked > 100


@pytest.mark.parametrize("text", ["interval=3", "interval=4 schedule=nonuniform start=0.3 end=0.8"])
def test_full_steps_follow_schedule_and_window(make_unet, text):
    unet = make_unet("sd15")
    values = dc(text)["deepcache"]
    total = 20
    clock = StepClock()
    clock.start(total)
    applied = apply_mods(unet, dc(text), clock)
    full = []
    unet.middle_block[0].register_forward_hook(lambda *a: full.append(clock.step))
    for step in range(total):
        call(unet, inputs_at(unet, 999 - 40 * step, seed=step, batch=1), clock, step)
    applied.restore()
    unet.middle_block[0]._forward_hooks.clear()
    plan = full_steps(total, values["interval"], values["schedule"], values["center"], values["pow"])
    expected = [s for s in range(total) if s in plan or not clock.step_of(values["start"]) <= s < clock.step_of(values["end"])]
    assert full == expected and len(full) < total


# --- bit-identity and restore --------------------------------------------------------------

def test_interval_1_is_bit_identical_and_restores(tiny_unet):
    g = torch.Generator().manual_seed(0)
    ctx_dim = map_unet(tiny_unet).attention[1].module.to_k.in_features
    noise, cond, uncond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, ctx_dim, generator=g), torch.randn(1, 8, ctx_dim, generator=g)
    y = torch.randn(1, 2816, generator=g) if tiny_unet.num_classes is not None else None
    clock = StepClock()
    clock.start(4)
    expected = euler_sample(tiny_unet, noise, cond, uncond, 4, clock, y=y)
    before = snapshot(tiny_unet)
    clock.start(4)
    applied = apply_mods(tiny_unet, dc("interval=1 level=2 schedule=nonuniform"), clock)
    assert applied.applied == [] and applied.patcher is None  # no cheap step: nothing installed, no infotext key
    assert applied.messages[-1].endswith("nothing to do")
    assert torch.equal(euler_sample(tiny_unet, noise, cond, uncond, 4, clock, y=y), expected)
    clock.start(4)
    applied = apply_mods(tiny_unet, dc("interval=2"), clock)
    assert not torch.equal(euler_sample(tiny_unet, noise, cond, uncond, 4, clock, y=y), expected)
    applied.restore()
    assert_restored(tiny_unet, before)


# --- cheap steps ---------------------------------------------------------------------------

@pytest.mark.parametrize("arch,k", [("sd15", 0), ("sd15", 4), ("sd15", 11), ("sd21", 2), ("sdxl", 0), ("sdxl", 5), ("sdxl", 8)])
def test_cheap_step_uses_the_cache_and_ignores_skipped_blocks(make_unet, arch, k):
    unet = make_unet(arch)
    L = len(unet.output_blocks) - 1
    clock = StepClock()
    clock.start(10)
    applied = apply_mods(unet, dc(f"interval=5 level={k}"), clock)
    with entering(unet, L - k) as seen:
        call(unet, inputs_at(unet, 900, seed=1), clock, 0)
        cached = seen[0]
        later = inputs_at(unet, 800, seed=2)
        with counting(unet.middle_block[0]) as middle:
            cheap = call(unet, later, clock, 1)
        assert middle == []
        assert len(seen) == 2 and torch.equal(seen[1], cached)  # the same h enters output_blocks[L-k]
    expected_shape = (2, map_unet(unet).h_channels[L - k], *(cached.shape[2:]))
    assert cached.shape == expected_shape
    torch.testing.assert_close(cheap, cheap_reference(unet, later, k, cached), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cheap, unpatched(unet, later), rtol=1e-3, atol=1e-4)

    skipped = [*unet.input_blocks[k + 1:], unet.middle_block, *unet.output_blocks[:L - k]]
    with torch.no_grad():
        for block in skipped:
            for p in block.parameters():
                p.add_(torch.randn_like(p))
    assert torch.equal(call(unet, later, clock, 2), cheap)
    applied.restore()


def test_parity_with_deepcache_helper(make_unet):
    """DeepCacheSDHelper on the same weights converted to diffusers, uniform schedule, DDIM timesteps."""
    pytest.importorskip("diffusers")
    from DeepCache import DeepCacheSDHelper
    from diffusers import DDIMScheduler
    from lib_unetmods.lab.bench_compare import diffusers_unet

    unet = make_unet("sd15")
    reference = diffusers_unet(unet, "sd15", "tiny")
    scheduler = DDIMScheduler()
    steps = 7
    scheduler.set_timesteps(steps)
    for k in (0, 1, 3):
        helper = DeepCacheSDHelper(pipe=types.SimpleNamespace(unet=reference, scheduler=scheduler))
        helper.set_params(cache_interval=3, cache_branch_id=k)
        helper.enable()
        clock = StepClock()
        clock.start(steps)
        applied = apply_mods(unet, dc(f"interval=3 level={k}"), clock)
        try:
            for i, t in enumerate(scheduler.timesteps):
                inputs = inputs_at(unet, t, seed=10 + i)
                with torch.no_grad():
                    expected = reference(inputs["x"], t, inputs["context"]).sample
                ours = call(unet, inputs, clock, i)
                torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5, msg=f"k={k} step {i}")
                assert (i % 3 == 0) == torch.allclose(ours, unpatched(unet, inputs), rtol=1e-4, atol=1e-5)
        finally:
            applied.restore()
            helper.disable()


@pytest.mark.parametrize("mode", ["second_order", "split_cond_uncond"])
def test_each_call_of_a_step_reads_its_own_cache(make_unet, mode):
    """Heun-like steps (two calls at different noise levels) and split cond/uncond (two calls with
    their own rows): the whole step is cheap, and call j reads what call j cached."""
    unet = make_unet("sd15")
    clock = StepClock()
    clock.start(10)
    applied = apply_mods(unet, dc("interval=3"), clock)
    split = mode == "split_cond_uncond"  # one evaluation of two images: their cond rows, then their uncond rows
    levels = [(900, 880), (860, 840)] if mode == "second_order" else [(900, 900), (860, 860)]
    caches = []
    with entering(unet, 11) as seen:
        for j in range(2):
            if j == 0 or not split:
                announce(clock, 2 if split else 1, split)
            call(unet, inputs_at(unet, levels[0][j], seed=20 + j), clock, 0)
        caches = list(seen)
    assert not torch.equal(caches[0], caches[1])
    with counting(unet.middle_block[0]) as middle:
        for j in range(2):
            later = inputs_at(unet, levels[1][j], seed=30 + j)
            if j == 0 or not split:
                announce(clock, 2 if split else 1, split)
            out = call(unet, later, clock, 1)
            torch.testing.assert_close(out, cheap_reference(unet, later, 0, caches[j]), rtol=1e-5, atol=1e-6)
    assert middle == []
    applied.restore()


# --- invalidation --------------------------------------------------------------------------

def test_batch_shape_change_forces_full_steps(make_unet):
    unet = make_unet("sd15")
    clock = StepClock()
    clock.start(10)
    applied = apply_mods(unet, dc("interval=5"), clock)
    announce(clock)
    call(unet, inputs_at(unet, 900, seed=0), clock, 0)
    half = inputs_at(unet, 850, seed=1, batch=1)  # NGMS drops the uncond rows
    both = inputs_at(unet, 800, seed=2)  # back to 2 rows: the old 2-row cache was dropped
    with counting(unet.middle_block[0]) as middle:
        announce(clock, skip=True)
        outs = [call(unet, half, clock, 1)]
        announce(clock)
        outs.append(call(unet, both, clock, 2))
        assert middle == [1, 1]
        announce(clock)
        call(unet, inputs_at(unet, 750, seed=3), clock, 3)
        assert middle == [1, 1]  # cheap again, from step 2's cache
    applied.restore()
    assert torch.equal(outs[0], unpatched(unet, half)) and torch.equal(outs[1], unpatched(unet, both))


def test_upward_sigma_jump_and_missing_cache_force_full_steps(make_unet):
    unet = make_unet("sd15")
    clock = StepClock()
    clock.start(10)
    applied = apply_mods(unet, dc("interval=5"), clock)
    first, restart, again = (inputs_at(unet, t, seed=s) for t, s in ((800, 0), (900, 2), (800, 4)))
    with counting(unet.middle_block[0]) as middle:
        outs = [call(unet, first, clock, 1)]  # cheap-scheduled, but there is no cache yet
        call(unet, inputs_at(unet, 700, seed=1), clock, 2)
        assert middle == [1]
        outs.append(call(unet, restart, clock, 3))  # a restart-type sampler raises sigma
        assert middle == [1, 1]
        call(unet, inputs_at(unet, 850, seed=3), clock, 4)
        assert middle == [1, 1]
        clock.start(10)  # a new pass on the same patch: nothing carries over
        outs.append(call(unet, again, clock, 1))
        assert middle == [1, 1, 1]
    applied.restore()
    for out, inputs in zip(outs, (first, restart, again)):
        assert torch.equal(out, unpatched(unet, inputs))


# --- passes, refusal, messages, input ----------------------------------------------------------

def test_hires_pass_only_when_asked(make_unet):
    unet = make_unet("sd15")
    clock = StepClock()
    clock.start(20, hires=True)
    assert apply_mods(unet, dc(""), clock).patcher is None
    applied = apply_mods(unet, dc("hires=true"), clock)
    assert applied.applied == ["deepcache"] and applied.patcher is not None
    applied.restore()


def test_warnings_and_bad_input(make_unet):
    clock = StepClock()
    clock.start(8)
    sdxl = make_unet("sdxl")
    applied = apply_mods(sdxl, dc("level=11 interval=2 schedule=nonuniform center=0.7 pow=1.1"), clock)
    text = " | ".join(applied.messages)
    assert "only 8 steps" in text and "level 11" in text and "using 8" in text and "uniform schedule" in text
    applied.restore()
    clock.start(30)
    applied = apply_mods(sdxl, dc("interval=3"), clock)
    assert applied.messages == []
    applied.restore()
    for bad in ("interval=0", "level=12", "schedule=cubic", "pow=1.0", "start=2"):
        settings = Settings.from_text(f"deepcache {bad}")
        assert settings.errors and settings.errors[0].startswith(f"deepcache.{bad.split('=')[0]}")
    assert Settings.from_text(Settings.from_text("deepcache interval=5 level=2 schedule=nonuniform end=0.9").to_text()) == \
        Settings.from_text("deepcache interval=5 level=2 schedule=nonuniform end=0.9")


def test_the_cache_is_a_copy_not_a_view_of_the_hosts_concat():
    """Later before_concat hooks (FreeU) write their parts into the host's concat: a cached view
    would take FreeU's scaling into the cache and apply it twice on cheap steps."""
    from types import SimpleNamespace

    from lib_unetmods.techniques.deepcache import DeepCacheState

    state = DeepCacheState(0, 11, lambda clock: False)
    x = torch.randn(1, 8, 4, 4)
    h = x[:, :4]  # the h part of the host's concat
    before = h.clone()
    call = SimpleNamespace(state={"deepcache_key": "k"}, shapes={})  # what capture reads of the UNet call
    state.capture(11, h, x[:, 4:], call)
    x.mul_(2)  # FreeU's new h written into the concat
    assert torch.equal(state.entries["k"][0], before)
