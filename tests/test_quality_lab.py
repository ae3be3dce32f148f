"""The quality lab in CI: the shipped proxy weights, the scorer, and what the table in the README
shows, on the first 16 of its seeds, with margins from the confidence intervals.

These fail when a technique still runs but stops helping (a high-resolution technique that no
longer keeps one object at 2x, a speed technique that drifts further from the unpatched image),
which no parity test can see. MEASURED holds the 64-seed figures of `python -m
lib_unetmods.quality --steps 10` (README, "Quality lab"); a 16-seed share must keep that figure
inside its 95 % interval, a 16-seed distance must stay below the figure plus twice its interval
(a quarter of the seeds: twice the half-width).
"""
from __future__ import annotations

import torch

from lib_unetmods.clock import StepClock
from lib_unetmods.lab import proxy_model
from lib_unetmods.lab.quality import Lab, Row, seed_classes, seed_noise, wilson
from lib_unetmods.lab.random_unets import sdpa_attention
from lib_unetmods.lab.sampler import euler_sample
from lib_unetmods.lab.score import score_batch
from lib_unetmods.lab.shapes import make_batch
from lib_unetmods.unet_map import map_unet

import pytest

STEPS = 10
SEEDS = range(16)
# (scale, settings) -> 64-seed figure: the share of images with exactly one object, or the distance
ONE_OBJECT = {
    (2, "none"): 40 / 64,
    (2, "deepshrink block=1"): 63 / 64,
    (2, "hidiffusion"): 60 / 64,
    (2, "scalecrafter"): 57 / 64,
}
DISTANCE = {  # (figure, its 95 % half-width)
    (1, "tome"): (0.00195, 0.00067),
    (1, "deepcache"): (0.00691, 0.00166),
}


@pytest.fixture(scope="module")
def lab():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with torch.no_grad(), sdpa_attention():
        yield Lab(proxy_model.load(), steps=STEPS)


def one_object_count(lab: Lab, scale: int, mods: str) -> int:
    images = lab.sample(Row(mods, mods, scale), SEEDS, set())
    return sum(s.count == 1 for s in score_batch(images))


@pytest.mark.parametrize("size", [32, 64, 96])
def test_scorer_is_exact_on_the_generators_images(size):
    batch = make_batch(300, size, torch.Generator().manual_seed(size))
    scores = score_batch(batch.images)
    assert [s.count for s in scores] == [1] * 300
    assert [s.colour for s in scores] == batch.colour.tolist()
    assert [s.shape for s in scores] == batch.shape.tolist()


def test_shipped_weights_are_the_proxy_family_in_fp16():
    from safetensors.torch import load_file

    state = load_file(proxy_model.WEIGHTS)
    assert {v.dtype for v in state.values()} == {torch.float16}
    model = proxy_model.load()  # raises on a checksum mismatch
    assert map_unet(model.unet).family == "proxy"
    assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_everything_off_is_bit_identical(lab):
    seeds = range(4)
    shape, colour = seed_classes(seeds)
    noise = seed_noise(seeds, lab.channels, 2 * lab.train_side)
    clock = StepClock()
    clock.start(STEPS)
    direct = euler_sample(lab.model.unet, noise, lab.model.cond(shape, colour), lab.model.cond.null(4), STEPS, clock,
                          cfg_scale=lab.cfg, prediction="v")
    assert torch.equal(lab.sample(Row("off", "none", 2), seeds, set()), proxy_model.to_image(direct, lab.config))
    off = "deepshrink enabled=off; hidiffusion enabled=off; tome enabled=off"
    assert torch.equal(lab.sample(Row("off", off, 2), seeds, set()), proxy_model.to_image(direct, lab.config))


def test_plain_2x_duplicates_and_the_high_resolution_techniques_keep_one_object(lab):
    n = len(SEEDS)
    plain = one_object_count(lab, 2, "none")
    assert wilson(plain, n)[0] <= ONE_OBJECT[(2, "none")]
    for mods in ("deepshrink block=1", "hidiffusion", "scalecrafter"):
        k = one_object_count(lab, 2, mods)
        assert wilson(k, n)[1] >= ONE_OBJECT[(2, mods)], f"{mods} at 2x: {k}/{n} one object"
        assert k >= plain, f"{mods} at 2x: {k}/{n} one object, plain {plain}/{n}"


@pytest.mark.parametrize("mods", ["tome", "deepcache"])
def test_speed_techniques_stay_as_close_to_the_unpatched_image(lab, mods):
    plain = lab.sample(Row("plain", "none", 1), SEEDS, set())
    patched = lab.sample(Row(mods, mods, 1), SEEDS, set())
    distance = ((patched - plain) ** 2).flatten(1).mean(1).mean().item()
    figure, half_width = DISTANCE[(1, mods)]
    assert 0 < distance <= figure + 2 * half_width
