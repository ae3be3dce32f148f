"""One-click stacks (lib_unetmods/stacks.py): valid settings, no composition rule fires, they run
on every family's UNet and come off exactly."""
import pytest
import torch

from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.composition import resolve_conflicts
from lib_unetmods.lab.random_unets import example_inputs
from lib_unetmods.lab.sampler import euler_sample
from lib_unetmods.stacks import STACKS, stack_settings
from lib_unetmods.techniques import SPECS
from lib_unetmods.families import native_side
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot

CASES = [(name, family) for name, families in STACKS.items() for family in families]
ARCH = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}


def stack(name, family):
    settings = Settings().update_from_dict(stack_settings(name, family))
    assert settings.errors == []
    return settings


def test_every_family_has_a_fast_stack():
    assert set(STACKS["fast"]) == set(ARCH)


@pytest.mark.parametrize("name, family", CASES)
def test_stack_values_are_declared_and_in_range(name, family):
    for tid, params in STACKS[name][family].items():
        spec = SPECS[tid]
        for key, value in params.items():
            assert spec.param(key).coerce(value, f"{tid}.{key}") == value
    assert sorted(stack(name, family).enabled_ids()) == sorted(STACKS[name][family])


@pytest.mark.parametrize("name, family", CASES)
def test_no_composition_rule_fires(make_unet, name, family):
    settings = stack(name, family)
    resolved, notes = resolve_conflicts(settings, map_unet(make_unet(ARCH[family])))
    assert notes == [] and resolved == settings


@pytest.mark.parametrize("name, family", CASES)
def test_stack_runs_and_restores_exactly(make_unet, name, family):
    """Three Euler steps above the native size: a full step with RAU-Net, then two DeepCache cheap
    steps (the middle block runs once); no message but DeepCache's few-steps advice, the model
    bit-identical afterwards."""
    unet = make_unet(ARCH[family])
    side = native_side(family) + 8
    inputs = example_inputs(unet, batch=2, height=side, width=side)
    noise, cond, uncond, y = inputs["x"][:1], inputs["context"][:1], inputs["context"][1:], inputs["y"]
    y = None if y is None else y[:1]
    plain = euler_sample(unet, noise, cond, uncond, 3, StepClock(), y=y)
    plain_call = unet(**inputs)
    before = snapshot(unet)
    middle_calls = []
    # a child of the middle block: its wrapper runs on cheap steps too
    handle = unet.middle_block[0].register_forward_pre_hook(lambda m, a: middle_calls.append(1))
    clock = StepClock()
    clock.start(3)
    applied = apply_mods(unet, stack(name, family), clock, seed=3, latent_shape=tuple(noise.shape))
    try:
        assert [m for m in applied.messages if not m.startswith("DeepCache: only 3 steps")] == []
        assert sorted(applied.applied) == sorted(STACKS[name][family])
        out = euler_sample(unet, noise, cond, uncond, 3, clock, y=y)
    finally:
        applied.restore()
        handle.remove()
    assert len(middle_calls) == 1
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-3)
    assert_restored(unet, before)
    assert torch.equal(unet(**inputs), plain_call)


def test_stack_text():
    assert Settings.from_text("stack=fast", strict=True, family="sdxl") == stack("fast", "sdxl")
    later = Settings.from_text("stack=fast; deepcache interval=5", family="sd1")
    assert later["deepcache"]["interval"] == 5 and later["hidiffusion"]["enabled"]
    assert "the model family is needed" in Settings.from_text("stack=fast").errors[0]
    assert Settings.from_text("stack=slow", family="sd1").errors == ["unknown stack 'slow' (known: fast)"]
    with pytest.raises(ValueError, match="no settings for the sd3 family"):
        stack_settings("fast", "sd3")
