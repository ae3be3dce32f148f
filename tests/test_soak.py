"""A short soak in CI (lib_unetmods/lab/soak_runner.py; the long one is `python -m lib_unetmods.soak`), and
checks that the soak's own checks catch a leak and a swallowed error."""
import dataclasses
import os
import random
import re
import sys
import types

import pytest

from lib_unetmods.lab import soak_runner
from lib_unetmods import Settings
from lib_unetmods.lab import soak
from lib_unetmods.params import ParamError
from lib_unetmods.patcher import ACTIVE
from lib_unetmods.lab.random_unets import ARCHS
from lib_unetmods.techniques import SPECS, TECHNIQUES

SEED = int(os.environ.get("UNETMODS_SOAK_SEED", "0"))
RUNS_PER_TECHNIQUE = 4


@pytest.fixture(scope="module")
def harness():
    """One WebUI process: the script loaded once, one tiny UNet per family, for every run."""
    h = soak_runner.Soak()
    yield h
    assert not h.finish()


@pytest.mark.parametrize("tid", list(SPECS))
def test_short_soak(harness, tid):
    """Random generations that always include `tid`: every model bit-identical to its snapshot
    after each, every outcome an image (or the injected error), every message declared."""
    applied = 0
    for k in range(RUNS_PER_TECHNIQUE):
        case = soak_runner.draw_case(SEED, 100 * list(SPECS).index(tid) + k, large=False, include=tid)
        result = harness.run(case)
        assert not result.problems and not result.leaks, f"{case.describe()}\n" + "\n".join(result.problems + result.leaks)
        applied += tid in result.applied
    assert applied, f"{tid} was not applied in any of the {RUNS_PER_TECHNIQUE} runs: the soak does not exercise it"


def test_draws_cover_every_declared_edge():
    """Over many draws every number hits both ends of its declared range, every choice and
    both booleans occur, and every drawn value is one its declaration accepts."""
    rng = random.Random(0)
    for spec in SPECS.values():
        for param in spec.params[1:]:
            values = [soak_runner.draw_value(param, rng) for _ in range(200)]
            for value in values:
                assert param.coerce(value) == value, (spec.id, param.name, value)
            if param.kind in ("int", "float"):
                assert param.minimum in values and param.maximum in values, (spec.id, param.name)
                assert any(param.minimum < v < param.maximum for v in values), (spec.id, param.name)
            elif param.kind == "choice":
                assert set(values) == set(param.choices), (spec.id, param.name)
            elif param.kind == "bool":
                assert set(values) == {False, True}, (spec.id, param.name)
            else:
                assert len(set(values)) > 5, (spec.id, param.name)


def test_sample_regex_matches_and_refuses_what_it_cannot_draw():
    rng = random.Random(1)
    for pattern in (r"\d+(\.\d*)?(,\d+)*", r"[a-c]{2,4}|x", r"(ab|c)?-?"):
        for _ in range(50):
            assert re.fullmatch(pattern, soak_runner.sample_regex(pattern, rng))
    with pytest.raises(ValueError, match="not supported"):
        soak_runner.sample_regex(r"\w", rng)


def _freeu_case(**changes):
    case = soak_runner.draw_case(SEED, 0, ("sd15",), large=False)
    plain = dict(settings=Settings.from_text("freeu"), inject=None, hires=False, img2img=False, n_iter=1, steps=2,
                 latent=(8, 8), batch_size=1, prompt_weights=None)
    return dataclasses.replace(case, **{**plain, **changes})


def test_soak_reports_a_patch_that_is_not_undone(monkeypatch):
    freeu = next(t for t in TECHNIQUES if t.SPEC.id == "freeu")
    original = freeu.apply

    def leaky_apply(ctx, values):
        ctx.unet.middle_block.__dict__["leaked"] = True  # not through the patcher: nothing undoes it
        original(ctx, values)

    monkeypatch.setattr(freeu, "apply", leaky_apply)
    h = soak_runner.Soak(("sd15",))
    result = h.run(_freeu_case())
    assert result.outcome == "image" and any("middle_block" in leak for leak in result.leaks)


def test_soak_reports_an_error_the_webui_would_swallow(monkeypatch):
    freeu = next(t for t in TECHNIQUES if t.SPEC.id == "freeu")

    def broken_apply(ctx, values):
        raise ParamError("a bug")

    monkeypatch.setattr(freeu, "apply", broken_apply)
    result = soak_runner.Soak(("sd15",)).run(_freeu_case())
    assert result.outcome == "failure" and any("swallowed" in p for p in result.problems)


def test_soak_checks_a_raised_run_after_the_next_one():
    h = soak_runner.Soak(("sd15",))
    raised = h.run(_freeu_case(inject=("raise", 1, "middle_block")))
    assert raised.outcome == "raised" and not raised.problems and not raised.leaks
    assert ACTIVE, "the raised run's patch stays until the next generation starts (no postprocess ran)"
    after = h.run(_freeu_case(settings=Settings()))
    assert after.outcome == "image" and not after.leaks and not ACTIVE


def test_cli_summary_line(capsys):
    assert soak.main(["--runs", "2", "--seed", str(SEED), "--arch", "sd15", "--no-large"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "runs=2 failures=0 leaks=0"


def test_cli_refuses_beside_a_real_webuis_modules(monkeypatch, tmp_path):
    real = types.ModuleType("modules")
    real.__file__ = str(tmp_path / "modules" / "__init__.py")
    monkeypatch.setitem(sys.modules, "modules", real)
    with pytest.raises(SystemExit, match="WebUI `modules` package is already imported"):
        soak.load_runner()


def test_every_family_is_soaked():
    assert {soak_runner.draw_case(SEED, i).arch for i in range(30)} == set(ARCHS)
