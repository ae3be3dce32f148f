"""The code that makes the quality table's numbers, tested on its own: the scores a record counts,
the Wilson interval, distances to the right reference, the interleaved run, the hires path's
clock and denoise, --combine and the README's table block, and the row declarations.

Each test here fails under one of the mutations an independent review left alive in the first
lab (one object counted as "count >= 1", distance taken to plain instead of the row's reference,
colour compared with shape, the hires clock's step index, the hires denoise ignored, Wilson's
z^2/4n), named in the test's docstring."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lib_unetmods.clock import StepClock
from lib_unetmods.families import PROXY, PROXY_XL
from lib_unetmods.lab.model_state import assert_restored, snapshot
from lib_unetmods.lab.quality import output, rows, run, sampling, stats
from lib_unetmods.lab.quality.models import Proxy, ProxyConfig
from lib_unetmods.lab.quality.rows import PLAIN, ROWS, Row
from lib_unetmods.lab.quality.score import Score
from lib_unetmods.lab.random_unets import randomize
from lib_unetmods.lab.sampler import sd_sigmas
from lib_unetmods.settings import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("k, n, expected", [
    (0, 10, (0.0, 0.27754)), (5, 10, (0.23659, 0.76341)), (10, 10, (0.72246, 1.0)), (62, 64, (0.89303, 0.99139)),
])
def test_wilson_matches_known_intervals(k, n, expected):
    """Known values of the 95 % Wilson score interval (a z^2/4n term in place of z^2/4n^2 fails)."""
    assert stats.wilson(k, n) == pytest.approx(expected, abs=1e-5)


def test_scored_counts_exactly_one_object_and_compares_each_class_with_its_own():
    """Two objects are not "one object" (count >= 1 fails); colour is compared with the asked
    colour, shape with the asked shape, position with the asked position (the classes differ here,
    so comparing colour with shape fails)."""
    scores = [Score(1, 2, 0, 4), Score(2, 2, 0, 4), Score(0, None, None, None), Score(1, 0, 2, 1)]
    shape, colour, position = torch.tensor([0, 0, 0, 2]), torch.tensor([2, 2, 2, 0]), torch.tensor([4, 4, 4, 1])
    out = stats.scored(scores, (shape, colour, position))
    assert out["one_object"] == 0.5
    assert out["colour_ok"] == out["shape_ok"] == out["position_ok"] == 0.75
    assert out["mean_count"] == 1.0
    assert stats.scored(scores, (colour, shape, position))["colour_ok"] == 0.0


def test_seed_classes_cover_every_combination():
    shape, colour, position = sampling.seed_classes(range(90))
    assert len(set(zip(shape.tolist(), colour.tolist(), position.tolist()))) == 90


class FakeLab:
    """Stands in for sampling.Lab: an image per seed whose value is the row's, and a log of calls."""

    family = PROXY
    steps = 10
    cfg = 3.0

    def __init__(self, values: dict[str, float]) -> None:
        self.values, self.calls = values, []

    def steps_of(self, row: Row) -> int:
        return 5 if row.half_steps else 10

    def sample(self, row: Row, seeds: range, messages: set[str]) -> torch.Tensor:
        self.calls.append((row.label, seeds.start))
        return torch.full((len(seeds), 3, 4, 4), self.values[row.label])


def test_distance_is_to_the_rows_reference_and_rows_run_interleaved():
    """A row's distance is measured to its reference row, not to plain (the first lab's mutation);
    the scale's rows run chunk by chunk, plain first, each reference once."""
    reference = Row("ref", "hidiffusion", 2)
    row = Row("row", "stack=fast", 2, reference=reference)
    other = Row("other", "tome", 2)
    lab = FakeLab({"plain": 0.0, "ref": 0.5, "row": 0.75, "other": 0.5})
    records = run.run([lab], [row, other], seeds=40)
    assert [c[0] for c in lab.calls[:4]] == ["plain", "ref", "row", "other"]
    assert [c[1] for c in lab.calls] == [0] * 4 + [16] * 4 + [32] * 4
    by = {r["label"]: r for r in records}
    assert set(by) == {"row", "other"}, "a reference row is run, not reported"
    assert by["row"]["distance"] == pytest.approx(0.0625) and by["row"]["reference"] == "ref"
    assert by["other"]["distance"] == pytest.approx(0.25) and by["other"]["reference"] == "plain"
    assert by["row"]["seeds"] == 40 and by["row"]["model"] == PROXY


def test_speedup_is_the_median_ratio_of_cpu_time_per_chunk():
    assert stats.speedup([2.0, 2.0, 9.0], [1.0, 2.0, 3.0]) == (2.0, (1.0, 3.0))
    result, plain = run.Result(PLAIN[1], cpu_seconds=[1.0, 1.0]), run.Result(PLAIN[1], cpu_seconds=[2.0, 4.0])
    result.images, plain.images = [torch.zeros(2, 3, 4, 4)] * 2, [torch.zeros(2, 3, 4, 4)] * 2
    record = run.record(FakeLab({}), result, plain, plain, seeds=4)
    assert record["speedup"] == 3.0 and record["speedup_range"] == (2.0, 4.0)


@pytest.fixture(scope="module")
def tiny_lab():
    model = Proxy(ProxyConfig.of(PROXY))
    randomize(model.unet, seed=3)
    return sampling.Lab(model.eval().requires_grad_(False), steps=6)


def test_the_hires_path_runs_half_the_steps_on_its_own_clock(tiny_lab, monkeypatch):
    """The hires pass runs round(steps * 0.5) steps counted from 0 on a hires clock, from the
    sigma of its first step (the hires clock's step index, the denoise ignored: both fail here)."""
    seen: list[tuple[bool, int, float]] = []
    original = StepClock.begin_step

    def spy(self, step, sigma=None):
        seen.append((self.hires, step, sigma))
        return original(self, step, sigma)

    monkeypatch.setattr(StepClock, "begin_step", spy)
    with torch.no_grad():
        images = tiny_lab.sample(Row("hires", "none", "hires"), range(2), set())
    assert images.shape == (2, 3, 64, 64)
    steps = [s for s in seen if s[2] is not None]  # end_step() begins no sampled step
    first, second = [s for s in steps if not s[0]], [s for s in steps if s[0]]
    assert [s[1] for s in first] == list(range(6))
    assert [s[1] for s in second] == [0, 1, 2]
    assert second[0][2] == pytest.approx(float(sd_sigmas(6)[3]))


def test_the_deep_path_probe_changes_the_picture_and_restores_the_unet(tiny_lab):
    before = snapshot(tiny_lab.model.unet)
    with torch.no_grad():
        plain = tiny_lab.sample(PLAIN[1], range(2), set())
        probed = tiny_lab.sample(Row("probe", probe="no middle block"), range(2), set())
        again = tiny_lab.sample(PLAIN[1], range(2), set())
    assert not torch.equal(plain, probed)
    assert torch.equal(plain, again)
    assert_restored(tiny_lab.model.unet, before)


def test_rows_are_declared_consistently():
    """Labels are unique per scale; references sit at their row's scale; every row's settings
    parse for both lab models (a typo in a settings text fails here, not after an hour's run)."""
    keys = [(str(r.scale), r.label) for r in ROWS]
    assert len(keys) == len(set(keys))
    for r in ROWS:
        assert rows.reference_of(r).scale == r.scale, r.label
        for family in (PROXY, PROXY_XL):
            text = r.mods_for(family)
            if text != "none":
                Settings.from_text(text, strict=True, family=family)
        assert r.probe is None or r.probe in sampling.PROBES
    assert all(r.group == rows.DEFAULT for r in PLAIN.values())


def test_select_filters_by_group_scale_and_text():
    default = rows.select(ROWS)
    assert default and all(r.group == rows.DEFAULT for r in default)
    assert len(rows.select(ROWS, (rows.DEFAULT, rows.ALL))) == len(ROWS)
    assert all(r.group == rows.ALL for r in rows.select(ROWS, (rows.ALL,)))
    two = rows.select(ROWS, scales={2}, only="Deep Shrink", exclude="auto")
    assert two and all(r.scale == 2 and "Deep Shrink" in r.label and "auto" not in r.label for r in two)


def _record(model: str, label: str, scale, one: float, distance=None, reference="plain"):
    return {"model": model, "label": label, "mods": label.lower(), "scale": scale, "steps": 10, "run_steps": 10, "cfg": 3.0,
            "seeds": 64, "one_object": one, "one_object_ci": [one - 0.1, min(1.0, one + 0.05)], "mean_count": 1.0,
            "position_ok": one, "position_ok_ci": [0, 1], "colour_ok": 1.0, "colour_ok_ci": [0, 1], "shape_ok": 0.5,
            "shape_ok_ci": [0, 1], "reference": reference, "distance": distance, "distance_ci": None,
            "speedup": None, "speedup_range": None, "cpu_seconds": 1.0, "messages": [], "decides": ""}


def test_combine_puts_the_models_side_by_side_and_a_later_run_wins(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, recs in ((a, [_record(PROXY, "plain", 2, 0.5), _record(PROXY, "HiDiffusion", 2, 0.9, 0.03)]),
                    (b, [_record(PROXY_XL, "HiDiffusion", 2, 0.8, 0.02), _record(PROXY, "HiDiffusion", 2, 0.95, 0.04)])):
        d.mkdir()
        (d / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = output.load_records([str(a), str(b)])
    text = output.table(records)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 2x | plain |")
    hid = lines[3]
    assert "95 % (85-100) / 80 % (70-85)" in hid, "SD1-layout model first, the later run's record wins"
    assert "0.0400 / 0.0200" in hid
    assert "| 50 % (40-55) / - |" in lines[2], "a model that did not run the row shows a dash"


def test_the_readme_table_is_the_commands_output(tmp_path):
    """README.md's quality table is exactly what --combine writes from the committed results
    (docs/quality/quality.jsonl): no hand-edited line."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start, end = readme.index(output.README_START), readme.index(output.README_END)
    block = readme[start:end + len(output.README_END)]
    records = output.load_records([os.path.join(ROOT, "docs", "quality")])
    assert block == output.readme_block(output.table(records))
    assert {r["model"] for r in records} == {PROXY, PROXY_XL}

    copy = tmp_path / "README.md"
    copy.write_text("intro\n" + output.readme_block("old") + "\noutro\n")
    output.replace_readme_table(str(copy), "new table")
    assert copy.read_text() == "intro\n" + output.readme_block("new table") + "\noutro\n"
