"""Every pair of techniques runs together on one UNet: it works, or the composition table turns
something off with a message. Plus the DeepCache-vs-resizer rules."""
import itertools

import pytest
import torch

from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.composition import PassInfo, resolve_conflicts
from lib_unetmods.lab.random_unets import webui_cat_fix
from lib_unetmods.techniques import SPECS
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot
from tiny_unet_calls import announce

# each technique at settings that make it act on a small latent within a short schedule
ACTIVE = {
    "tome": "tome ratio=0.5",
    "hypertile": "hypertile tile_size=128",
    "deepcache": "deepcache interval=2",
    "scalecrafter": "scalecrafter level1=2 level2=2 stop=1",
    "deepshrink": "deepshrink",
    "hidiffusion": "hidiffusion auto=false",
    "freeu": "freeu",
    "cdtuner": "cdtuner d1=2 d2=2 con1=1",
    "todo": "todo",
    "pag": "pag",
}


@pytest.mark.parametrize("pair", list(itertools.combinations(SPECS, 2)), ids="+".join)
def test_every_pair_runs_or_is_resolved_with_a_message(pair, make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=32, width=40)
    before = snapshot(unet)
    settings = Settings.from_text("; ".join(ACTIVE[t] for t in pair), strict=True)
    clock = StepClock()
    clock.start(4)
    resolved, notes = resolve_conflicts(settings, map_unet(unet), PassInfo(clock, tuple(inputs["x"].shape)))
    applied = apply_mods(unet, settings, clock, latent_shape=tuple(inputs["x"].shape))
    try:
        assert applied.messages[:len(notes)] == notes
        with webui_cat_fix():
            for step in range(3):
                clock.begin_step(step)
                announce(clock)
                out = unet(**inputs)
                assert out.shape == inputs["x"].shape and torch.isfinite(out).all()
    finally:
        applied.restore()
    assert_restored(unet, before)
    for tid in pair:  # a technique that is still on is installed, one that is off says why
        title = SPECS[tid].title
        said_why = any(m.startswith(f"{title} skipped") or (m.startswith(f"{title}:") and m.endswith("nothing to do"))
                       for m in applied.messages)
        assert (tid in applied.applied) != (said_why or not resolved[tid]["enabled"]), (tid, applied.messages)


@pytest.mark.parametrize("other,level,expected", [
    ("deepshrink block=3", 5, 2), ("deepshrink block=3", 2, 2),
    ("deepshrink block=6 block2=2 end2=0.6", 4, 1),
    ("hidiffusion", 5, 2), ("hidiffusion rau_net=false", 5, 5),
])
def test_deepcache_level_stays_above_resized_blocks(other, level, expected, make_unet):
    settings = Settings.from_text(f"deepcache level={level}; {other}", strict=True)
    resolved, notes = resolve_conflicts(settings, map_unet(make_unet("sd15")))
    assert resolved["deepcache"]["level"] == expected
    assert bool(notes) == (expected != level)


def test_deepcache_rule_with_hidiffusion_blocks_that_do_not_fit_the_model(make_unet):
    """Found by the soak: RAU-Net blocks outside the model's range made the DeepCache rule raise
    (the image was then generated with no mods and no message). RAU-Net is skipped with its own
    message instead, and DeepCache keeps its level."""
    unet = make_unet("sd21")
    settings = Settings.from_text("deepcache level=11; hidiffusion pool_blocks=7/1 auto=false", strict=True)
    resolved, _ = resolve_conflicts(settings, map_unet(unet))
    assert resolved["deepcache"]["level"] == 11
    clock = StepClock()
    clock.start(20)
    applied = apply_mods(unet, settings, clock, latent_shape=(1, 4, 9, 35))
    try:
        assert any(m.startswith("HiDiffusion") and "skipped" in m for m in applied.messages), applied.messages
    finally:
        applied.restore()


@pytest.mark.parametrize("hires", [False, True])
def test_rules_follow_each_techniques_own_pass_switches(hires, make_unet):
    """HyperTile only in the hires pass: in the first pass it does not take MSW-MSA's layers; in
    the hires pass it does (HiDiffusion runs there too, its hires box ticked)."""
    settings = Settings.from_text("hypertile first_pass=false hires=true; hidiffusion hires=true", strict=True)
    clock = StepClock()
    clock.start(20, hires=hires)
    resolved, notes = resolve_conflicts(settings, map_unet(make_unet("sd15")), PassInfo(clock, (1, 4, 128, 128)))
    assert resolved["hidiffusion"]["msw_msa"] is not hires
    assert bool(notes) is hires
