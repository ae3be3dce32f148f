"""The quality lab in CI: the shipped weights of both lab models, the scorer, and what the README's
table shows, with margins from the confidence intervals.

The figures are read from the committed results (docs/quality/quality.jsonl, written by
`python -m lib_unetmods.quality` and `--combine`; the README's table is made from the same file),
never typed here. These tests fail when a technique still runs but stops helping (a
high-resolution technique that no longer keeps one object at 2x, a speed technique that drifts
further from the unpatched image, a model whose deep path stopped mattering), which no parity
test can see. The high-resolution techniques are judged, per model, on the first 16 seeds where
plain 2x did not give exactly one object: a technique's count there must stay inside the 95 %
interval around its count on those seeds in the table's run, and well above plain's.
"""
from __future__ import annotations

import os

import pytest
import torch

from lib_unetmods.clock import StepClock
from lib_unetmods.families import PROXY, PROXY_XL
from lib_unetmods.lab.quality import models
from lib_unetmods.lab.quality.output import load_records
from lib_unetmods.lab.quality.rows import DEEP_PATH, ROWS, Row
from lib_unetmods.lab.quality.sampling import Lab, seed_classes, seed_noise
from lib_unetmods.lab.quality.score import score_batch
from lib_unetmods.lab.quality.shapes import make_batch
from lib_unetmods.lab.quality.stats import distances, wilson
from lib_unetmods.lab.random_unets import sdpa_attention
from lib_unetmods.lab.sampler import euler_sample
from lib_unetmods.unet_map import map_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = load_records([os.path.join(ROOT, "docs", "quality")])
LAB_MODELS = (PROXY, PROXY_XL)
DUPLICATED = 16  # seeds where plain 2x duplicated, per model
HIGH_RES_AT_DEFAULTS = ("HiDiffusion", "ScaleCrafter", "Deep Shrink")
SPEED_AT_1X = ("ToMe", "DeepCache")
FLOOR = 0.01  # the deep-path row's floor (FreeU's effect on the first lab model was 0.0096)


def result(model: str, scale, label: str) -> dict:
    return next(r for r in RESULTS if r["model"] == model and str(r["scale"]) == str(scale) and r["label"] == label)


def row(scale, label: str) -> Row:
    return next(r for r in ROWS if r.scale == scale and r.label == label)


@pytest.fixture(scope="module", params=LAB_MODELS)
def lab(request):
    with torch.no_grad(), sdpa_attention():
        yield Lab(models.load(models.WEIGHTS[request.param]))


@pytest.mark.parametrize("size", [32, 64, 96])
def test_scorer_is_exact_on_the_generators_images(size):
    batch = make_batch(300, size, torch.Generator().manual_seed(size))
    scores = score_batch(batch.images)
    assert [s.count for s in scores] == [1] * 300
    assert [s.colour for s in scores] == batch.colour.tolist()
    assert [s.shape for s in scores] == batch.shape.tolist()
    assert [s.position for s in scores] == batch.position.tolist()


def test_shipped_weights_are_the_lab_families_in_fp16_within_their_budget():
    from safetensors.torch import load_file

    sizes = {}
    for family in LAB_MODELS:
        path = models.WEIGHTS[family]
        assert {v.dtype for v in load_file(path).values()} == {torch.float16}
        model = models.load(path)  # raises on a checksum mismatch
        assert model.config.family == family and map_unet(model.unet).family == family
        sizes[family] = os.path.getsize(path)
    assert sizes[PROXY_XL] <= 10_000_000
    assert sum(sizes.values()) <= 30_000_000, "every user clones the lab's weights with the extension"


def test_everything_off_is_bit_identical(lab):
    seeds = range(4)
    noise = seed_noise(seeds, lab.channels, 2 * lab.train_side)
    cond, uncond = lab.model.cond(*seed_classes(seeds)), lab.model.cond.null(4)
    clock = StepClock()
    clock.start(lab.steps)
    direct = euler_sample(lab.model.unet, noise, cond, uncond, lab.steps, clock, cfg_scale=lab.cfg, prediction="v",
                          y=lab.model.y(cond), y_uncond=lab.model.y(uncond))
    expected = models.to_image(direct, lab.config)
    assert torch.equal(lab.sample(Row("off", "none", 2), seeds, set()), expected)
    off = "deepshrink enabled=off; hidiffusion enabled=off; tome enabled=off; pag enabled=off"
    assert torch.equal(lab.sample(Row("off", off, 2), seeds, set()), expected)


def test_the_model_uses_its_deep_path(lab):
    """Shrinking the deepest level's features moves the picture by at least the floor, on the
    first 16 seeds (so the deep-path techniques are judged on a model where that path matters)."""
    seeds = range(16)
    plain = lab.sample(row(1, "plain"), seeds, set())
    probed = lab.sample(row(1, DEEP_PATH), seeds, set())
    distance = sum(distances(probed, plain)) / len(seeds)
    recorded = result(lab.family, 1, DEEP_PATH)
    assert recorded["distance"] >= FLOOR and distance >= FLOOR, (distance, recorded["distance"])


def test_plain_2x_duplicates_and_the_high_resolution_techniques_keep_one_object(lab):
    counts = result(lab.family, 2, "plain")["counts"]
    seeds = [s for s, c in enumerate(counts) if c != 1][:DUPLICATED]
    n = len(seeds)
    assert n == DUPLICATED, f"plain 2x duplicated on only {n} seeds of the table's run"
    plain = sum(s.count == 1 for s in score_batch(lab.sample(row(2, "plain"), seeds, set())))
    assert plain <= 2, f"plain 2x: {plain}/{n} one object on the seeds where it duplicated"
    for label in HIGH_RES_AT_DEFAULTS:
        measured = sum(result(lab.family, 2, label)["counts"][s] == 1 for s in seeds)
        k = sum(s.count == 1 for s in score_batch(lab.sample(row(2, label), seeds, set())))
        assert wilson(k, n)[1] >= wilson(measured, n)[0], f"{label} at 2x: {k}/{n} one object (the table's run: {measured})"
        assert k >= plain + n // 2, f"{label} at 2x: {k}/{n} one object, plain {plain}/{n}"


@pytest.mark.parametrize("label", SPEED_AT_1X)
def test_speed_techniques_stay_as_close_to_the_unpatched_image(lab, label):
    """On seeds 0-15 (a quarter of the table's), the distance stays below the table's figure plus
    twice its 95 % half-width."""
    seeds = range(16)
    plain = lab.sample(row(1, "plain"), seeds, set())
    distance = sum(distances(lab.sample(row(1, label), seeds, set()), plain)) / len(seeds)
    recorded = result(lab.family, 1, label)
    figure, (low, high) = recorded["distance"], recorded["distance_ci"]
    assert 0 < distance <= figure + 2 * (high - figure), (distance, figure)
