"""The clock follows the sampler's per-step callback; without one the user is told."""
from types import SimpleNamespace

import pytest

from lib_unetmods import Settings
from lib_unetmods.host import LOG_PREFIX, Generation, begin_pass

FREEU = "freeu version=v1 b1=1.3 s1=0.7 b2=1.2 s2=0.5"


class Sampler:
    def callback_state(self, d):
        pass


def processing(unet, sampler):
    comments = []
    p = SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=unet)), steps=4, seeds=[1],
                        sampler=sampler, comment=comments.append)
    return p, comments


@pytest.mark.parametrize("sampler", [SimpleNamespace(), None, SimpleNamespace(callback_state=None)])
def test_a_sampler_without_per_step_callback_is_reported(make_unet, capsys, sampler):
    unet = make_unet("sd15")
    p, comments = processing(unet, sampler)
    generation = Generation(Settings.from_text(FREEU))
    begin_pass(p, generation, (1, 4, 8, 8))
    try:
        assert generation.applied.patcher is not None
        [comment] = [c for c in comments if "per-step callback" in c]
        assert comment.startswith(f"{LOG_PREFIX} the sampler (") and "step 0" in comment
        assert comment in capsys.readouterr().out
    finally:
        generation.restore()


def test_a_sampler_with_a_callback_is_followed_silently(make_unet):
    unet = make_unet("sd15")
    p, comments = processing(unet, Sampler())
    generation = Generation(Settings.from_text(FREEU))
    begin_pass(p, generation, (1, 4, 8, 8))
    try:
        assert comments == []
        p.sampler.callback_state({"i": 2})
        assert generation.clock.step == 3
    finally:
        generation.restore()
    assert "callback_state" not in p.sampler.__dict__


def test_nothing_applied_nothing_reported(make_unet):
    p, comments = processing(make_unet("sd15"), SimpleNamespace())
    begin_pass(p, Generation(Settings()), (1, 4, 8, 8))
    assert comments == []
