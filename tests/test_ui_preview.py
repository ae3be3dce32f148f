"""The schedule preview against what the techniques really do: each technique is applied to a
tiny UNet, the UNet is run step by step on the step clock, and what happened at each step
(full or cached, shrunk, dilated, RAD) is recorded from the modules; the preview of the same
settings must show exactly those steps. Plus the summary line and the rendered HTML."""
from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.preview import Image, compute, render, summary
from lib_unetmods.lab.random_unets import example_inputs
from lib_unetmods.unet_map import map_unet

STEPS = 10


@torch.no_grad()
def run_steps(unet, settings, size, record, steps=STEPS):
    """Apply `settings` for one pass of `steps`, call the UNet once per step (timesteps falling),
    `record(step)` after each call; everything is restored afterwards."""
    clock = StepClock()
    clock.start(steps)
    inputs = example_inputs(unet, batch=1, height=size, width=size, seed=0, tokens=8)
    applied = apply_mods(unet, settings, clock, latent_shape=tuple(inputs["x"].shape))
    try:
        for step in range(steps):
            clock.begin_step(step)
            inputs["timesteps"] = torch.full((1,), 999.0 * (1 - step / steps))
            unet(inputs["x"], inputs["timesteps"], context=inputs["context"], y=inputs["y"])
            record(step)
    finally:
        applied.restore()
    return applied


def preview_rows(settings, umap, size, steps=STEPS):
    (first,) = compute(settings, Image(steps=steps, width=size * 8, height=size * 8), None, umap).passes
    return {row.label: [cell.kind for cell in row.cells] for row in first.rows}


@contextmanager
def shapes_entering(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("text", ["interval=3", "interval=3 start=0.2 end=0.8", "interval=4 schedule=nonuniform center=0.5"])
def test_deepcache_preview_is_the_run(make_unet, text):
    unet = make_unet("sd15")
    settings = Settings.from_text(f"deepcache {text}", strict=True)
    ran_middle = []
    with shapes_entering(unet.middle_block[0]) as seen:  # a child: the block's hook wrapper runs on cheap steps too
        run_steps(unet, settings, 8, lambda step: ran_middle.append(len(seen)))
    full = [n > prev for prev, n in zip([0] + ran_middle, ran_middle)]  # the middle block runs only on full steps
    assert not all(full), "nothing was cached: the test would not see a difference"
    preview = preview_rows(settings, map_unet(unet), 8)["DeepCache"]
    assert preview == ["full" if f else "cheap" for f in full]


@pytest.mark.parametrize("text", ["", "start=0.2 end=0.6", "block=1 end=0.3 block2=2 end2=0.6"])
def test_deepshrink_preview_is_the_run(make_unet, text):
    unet = make_unet("sd15")
    settings = Settings.from_text(f"deepshrink {text}", strict=True)
    block = settings["deepshrink"]["block"]
    blocks = {block, settings["deepshrink"]["block2"]} if settings["deepshrink"]["end2"] else {block}
    records = {b: [] for b in blocks}
    # the first layer of the next block: the shrink happens inside that block's hook wrapper
    handles = [unet.input_blocks[b + 1][0].register_forward_pre_hook(
        lambda m, args, b=b: records[b].append(tuple(args[0].shape[-2:]))) for b in blocks]
    try:
        run_steps(unet, settings, 16, lambda step: None)
    finally:
        for h in handles:
            h.remove()
    normal = {b: max(records[b]) for b in blocks}
    shrunk = [any(records[b][s] != normal[b] for b in blocks) for s in range(STEPS)]
    assert any(shrunk) and not all(shrunk)
    preview = preview_rows(settings, map_unet(unet), 16)["Deep Shrink"]
    assert preview == ["shrink" if s else "off" for s in shrunk]


def test_scalecrafter_preview_is_the_run(make_unet, monkeypatch):
    unet = make_unet("sd15")
    settings = Settings.from_text("scalecrafter level1=2 level2=3 stop=0.5 progressive=on ndcfg=off", strict=True)
    umap = map_unet(unet)
    level = {id(conv): lvl for _, conv, lvl in umap.convs3x3}
    seen: dict[int, float] = {}
    original = nn.Conv2d._conv_forward

    def recording(self, x, weight, bias):
        if id(self) in level:
            seen[level[id(self)]] = max(seen.get(level[id(self)], 1), self.dilation[0])
        return original(self, x, weight, bias)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", recording)
    per_step = []
    run_steps(unet, settings, 8, lambda step: (per_step.append(dict(seen)), seen.clear()))
    monkeypatch.undo()
    rows = preview_rows(settings, umap, 8)
    for lvl in range(umap.num_levels):
        ran = [s.get(lvl, 1) for s in per_step]
        label = f"ScaleCrafter L{lvl}"
        if all(d == 1 for d in ran):
            assert label not in rows
            continue
        assert rows[label] == ["dilate" if d > 1 else "off" for d in ran], label
    assert {"ScaleCrafter L1", "ScaleCrafter L2"} <= set(rows)
    (first,) = compute(settings, Image(steps=STEPS, width=64, height=64), None, umap).passes
    texts = [c.text for row in first.rows if row.label == "ScaleCrafter L2" for c in row.cells]
    assert texts[0] == "3" and texts[STEPS // 2 - 1] == "2", "progressive: 3 stepping down to 2"


def test_hidiffusion_rad_preview_is_the_run(make_unet):
    unet = make_unet("sd15")
    settings = Settings.from_text("hidiffusion msw_msa=false custom_windows=true end=0.4", strict=True)
    with shapes_entering(unet.middle_block[0]) as seen:  # a child: the block's hook wrapper runs on cheap steps too
        run_steps(unet, settings, 16, lambda step: None)
    rad = [shape != max(seen) for shape in seen]
    assert any(rad) and not all(rad)
    assert preview_rows(settings, map_unet(unet), 16)["RAU-Net RAD/RAU"] == ["on" if r else "off" for r in rad]


def test_hires_pass_and_img2img_steps():
    settings = Settings.from_text("deepcache hires=true; freeu hr_start=0.5; tome")
    preview = compute(settings, Image(steps=20, width=512, height=768, hires=True, hr_scale=1.5, hr_steps=10), "sd1")
    first, hires = preview.passes
    assert (first.steps, hires.steps, hires.width, hires.height) == (20, 10, 768, 1152)
    assert all(len(row.cells) == 10 for row in hires.rows)
    freeu = next(r for r in hires.rows if r.technique == "freeu")
    assert [c.kind for c in freeu.cells] == ["off"] * 5 + ["on"] * 5
    assert compute(settings, Image(steps=20, img2img=True, denoising=0.5), "sd1").passes[0].steps == 11
    assert compute(settings, Image(hr_resize_x=1024, hires=True), "sd1").passes[1].width == 1024


def test_rendered_html_has_one_cell_per_step_and_the_rules():
    settings = Settings.from_text("tome; hypertile; deepcache")
    preview = compute(settings, Image(steps=13), "sd1")
    html = render(preview)
    for row in re.findall(r'<span class="um-steps">(.*?)</span>', html):
        assert row.count("<i ") == 13
    assert 'data-technique="deepcache"' in html and "no model loaded" not in html
    assert "no model loaded" in render(compute(settings, Image(), None))
    assert "No technique acts" in render(compute(Settings(), Image(), "sd1"))


def test_composition_rules_show_in_the_preview(make_unet):
    settings = Settings.from_text("scalecrafter; deepshrink")
    preview = compute(settings, Image(width=1024, height=1024), None, map_unet(make_unet("sd15")))
    labels = [row.label for row in preview.passes[0].rows]
    assert "Deep Shrink" not in labels and any(label.startswith("ScaleCrafter") for label in labels)
    assert any("Deep Shrink" in note for note in preview.notes)


def test_summary_names_the_techniques_that_are_on():
    assert summary(Settings()) == "All techniques off"
    assert summary(Settings.from_text("freeu; tome")) == "On: Token Merging (ToMe), FreeU"
