"""Token Merging: the math against tomesd 0.1.3 and the properties of design section 1(b), and the
UNet-level wiring (parity with tomesd on the same weights, windows, randomness, restore)."""
import weakref

import pytest
import torch

import tomesd.merge
from lib_unetmods import Settings, SettingsError, StepClock, apply_mods
from lib_unetmods.lab import bench_compare
from lib_unetmods.lab.random_unets import example_inputs, sdpa_attention, webui_cat_fix
from lib_unetmods.techniques import tome
from lib_unetmods.techniques.tome import bipartite_soft_matching, dst_partition, token_grid
from lib_unetmods.lab.model_state import assert_restored, snapshot
from tiny_unet_calls import call, rel, unet_of

REL = 1e-5


def with_tomesd(unet, inputs, **options):
    with torch.no_grad(), webui_cat_fix(), sdpa_attention():
        return bench_compare.with_tomesd(unet, inputs, **options)


def with_ours(unet, inputs, text, seed=0, step=0, steps=1, hires=False):
    """Applied before call() switches the attention kernel to SDPA: the wrappers must follow it."""
    clock = StepClock()
    clock.start(steps, hires=hires)
    clock.begin_step(step)
    applied = apply_mods(unet, Settings.from_text(text, strict=True), clock, seed=seed)
    try:
        return call(unet, inputs), applied
    finally:
        applied.restore()


# --- the math ----------------------------------------------------------------------------

def test_top_left_destinations_on_a_4x4_grid():
    dst, src = dst_partition(4, 4, 2, 2, torch.device("cpu"))
    assert dst.tolist() == [0, 2, 8, 10]
    assert src.tolist() == [i for i in range(16) if i not in (0, 2, 8, 10)]


def test_random_destinations_one_per_full_cell_and_edges_are_sources():
    h, w, sx, sy = 7, 9, 2, 3
    dst, src = dst_partition(h, w, sx, sy, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert dst.tolist() == sorted(dst.tolist()) and len(dst) == (h // sy) * (w // sx)
    cells = [((i // w) // sy, (i % w) // sx) for i in dst.tolist()]
    assert len(set(cells)) == len(cells)
    assert all(i // w < (h // sy) * sy and i % w < (w // sx) * sx for i in dst.tolist())
    assert sorted(dst.tolist() + src.tolist()) == list(range(h * w))
    assert len({(i // w) % sy * sx + (i % w) % sx for i in dst.tolist()}) > 1  # really random


@pytest.mark.parametrize("size, expected", [
    ((64, 64), [(1, 64, 64), (2, 32, 32), (4, 16, 16), (8, 8, 8)]),
    ((65, 97), [(1, 65, 97), (2, 33, 49), (4, 17, 25), (8, 9, 13)]),  # 520x776
    ((125, 125), [(1, 125, 125), (2, 63, 63), (4, 32, 32), (8, 16, 16)]),  # 1000x1000
])
def test_token_grid_follows_the_stride_2_convs(size, expected):
    H, W = size
    assert [token_grid(H, W, h * w) for _, h, w in expected] == expected


def test_token_grid_of_a_resized_map():
    assert token_grid(64, 64, 21 * 21) == (3, 21, 21)  # Deep Shrink 1.5x at level 1
    assert token_grid(64, 64, 97) is None  # no grid: the block is left alone


@pytest.mark.parametrize("h, w", [(8, 8), (7, 9)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.74])
def test_merge_length(h, w, ratio):
    x = torch.randn(2, h * w, 16)
    m = bipartite_soft_matching(x, h, w, 2, 2, int(h * w * ratio))
    assert m.merge(x).shape == (2, h * w - min(int(h * w * ratio), h * w - (h // 2) * (w // 2)), 16)


def test_ratio_above_the_cap_acts_like_the_cap():
    x = torch.randn(2, 64, 16)
    capped = bipartite_soft_matching(x, 8, 8, 2, 2, int(64 * 0.75))
    above = bipartite_soft_matching(x, 8, 8, 2, 2, int(64 * 0.9))
    assert above.merged == 16 and torch.equal(above.merge(x), capped.merge(x))
    assert tome.merge_cap(2, 2) == 0.75 and tome.merge_cap(4, 4) == 0.9375


def test_nothing_to_merge_is_none():
    x = torch.randn(1, 64, 8)
    assert bipartite_soft_matching(x, 8, 8, 2, 2, 0) is None
    assert bipartite_soft_matching(x, 8, 8, 1, 1, 10) is None  # 1x1 cells: every token is a destination


def test_unmerge_merge_algebra():
    """unmerge(merge(x)): unmerged tokens come back exactly; each destination and the sources merged
    into it all get the group's mean (computed here with a dense one-hot matrix)."""
    x = torch.randn(2, 7 * 9, 12, dtype=torch.float64)
    m = bipartite_soft_matching(x, 7, 9, 2, 2, 30)
    back = m.unmerge(m.merge(x))
    onehot = torch.nn.functional.one_hot(m.slot, 2 * m.merged).double()  # (B*N, B*M)
    count = onehot.sum(0)
    expected = onehot @ ((onehot.T @ x.reshape(-1, 12)) / count[:, None])
    torch.testing.assert_close(back.reshape(-1, 12), expected)
    alone = count[m.slot] == 1
    assert torch.equal(back.reshape(-1, 12)[alone], x.reshape(-1, 12)[alone])
    assert 0 < int(alone.sum()) < 2 * 63 - 2 * 30  # every merged source and its destination are not alone
    f = lambda t: torch.tanh(t) * 3 + t ** 2  # noqa: E731 - any token-wise function
    torch.testing.assert_close(m.unmerge(f(m.merge(x))), f(back))
    assert m.merged == 63 - 30


@pytest.mark.parametrize("h, w, seed", [(8, 8, None), (7, 9, None), (8, 12, 5), (9, 7, 6)])
def test_same_merge_as_tomesd(h, w, seed):
    """Same sets and means as tomesd.merge (its row order may differ: compare through unmerge)."""
    x = torch.randn(2, h * w, 16)
    r = int(h * w * 0.5)
    gen = lambda: None if seed is None else torch.Generator().manual_seed(seed)  # noqa: E731
    ref_m, ref_u = tomesd.merge.bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=seed is None, generator=gen())
    ours = bipartite_soft_matching(x, h, w, 2, 2, r, generator=gen())
    f = lambda t: t * t.sum(-1, keepdim=True).sigmoid()  # noqa: E731
    assert ours.merged == ref_m(x).shape[1]
    torch.testing.assert_close(ours.unmerge(f(ours.merge(x))), ref_u(f(ref_m(x))), rtol=1e-5, atol=1e-6)


class ScoreBuffers(torch.overrides.TorchFunctionMode):
    """Records each chunk product (a matmul with out=) and a weakref to the buffer under it."""

    def __init__(self):
        super().__init__()
        self.chunks, self.buffers = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.matmul and kwargs.get("out") is not None:
            out = kwargs["out"]
            self.chunks.append(tuple(out.shape))
            self.buffers.append(weakref.ref(out._base if out._base is not None else out))
        return func(*args, **kwargs)

    def alive(self):
        return [ref() for ref in self.buffers if ref() is not None]


def whole_product(x, src, dst):
    """tomesd's scores: the whole (B, Na, Nb) cosine product at once, and its max per source."""
    x = x / x.norm(dim=-1, keepdim=True)
    return (x[:, src] @ x[:, dst].transpose(-1, -2)).max(dim=-1)


@pytest.mark.parametrize("rows", [1, 7, 32, 1000])
def test_similarities_in_chunks_equal_the_whole(monkeypatch, rows):
    """Chunks of `rows` source rows (the last one partial, or a single chunk) give the same best
    destinations and similarities as the whole (B, Na, Nb) product, in one buffer freed on return."""
    x = torch.randn(2, 9 * 10, 24)
    dst, src = dst_partition(9, 10, 2, 2, torch.device("cpu"))
    monkeypatch.setattr(tome, "SCORE_CHUNK_BYTES", 2 * rows * len(dst) * 4)
    whole = whole_product(x, src, dst)
    with ScoreBuffers() as seen:
        chunked = tome.best_destinations(x, src, dst)
    assert torch.equal(chunked[1], whole[1]) and whole[0].shape == (2, len(src))
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-7)
    assert len(seen.chunks) == -(-len(src) // rows) and seen.chunks[0] == (2, min(rows, len(src)), len(dst))
    assert not seen.alive()


def test_similarities_keep_the_autocast_dtype():
    """Under autocast the product is computed in its dtype, as tomesd's a @ b.T is (out= would not)."""
    x = torch.randn(2, 8 * 8, 16)
    dst, src = dst_partition(8, 8, 2, 2, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = whole_product(x, src, dst)
        chunked = tome.best_destinations(x, src, dst)
    assert whole[0].dtype == chunked[0].dtype == torch.bfloat16
    assert torch.equal(chunked[1], whole[1]) and torch.equal(chunked[0], whole[0])


def test_identical_tokens_leave_self_attention_unchanged():
    attn = next(m for n, m in unet_of("sd15").named_modules() if n.endswith("attn1"))
    x = torch.randn(2, 1, attn.to_q.in_features).expand(2, 96, -1).contiguous()
    m = bipartite_soft_matching(x, 8, 12, 2, 2, 48)
    with torch.no_grad():
        torch.testing.assert_close(m.unmerge(attn(m.merge(x))), attn(x), rtol=1e-5, atol=1e-6)


# --- the UNet ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(16, 24), (13, 19)], ids=["128x192px", "104x152px"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_parity_with_tomesd(size, ratio):
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=size[0], width=size[1])
    ref = with_tomesd(unet, inputs, ratio=ratio, use_rand=False)
    ours, applied = with_ours(unet, inputs, f"tome ratio={ratio}")
    base = call(unet, inputs)
    assert applied.applied == ["tome"] and rel(ref, base) > 1e-2  # ToMe really changes the output
    assert rel(ours, ref) < REL


def test_parity_with_tomesd_with_the_similarities_in_chunks(monkeypatch):
    """A chunk budget of a few source rows: several chunks per block. No block's similarity buffer
    outlives its matching: by the time any self-attention runs, every one is freed, so ToMe adds
    nothing to the UNet's peak memory."""
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=13, width=19)
    monkeypatch.setattr(tome, "SCORE_CHUNK_BYTES", 2 * 10 * (6 * 9) * 4)  # 10 source rows of 2 x 54 scores
    attns = [m for n, m in unet.named_modules() if n.endswith("attn1")]
    alive_at_attention = []
    with ScoreBuffers() as seen:
        handles = [m.register_forward_pre_hook(lambda *_: alive_at_attention.append(len(seen.alive()))) for m in attns]
        try:
            ours, _ = with_ours(unet, inputs, "tome ratio=0.5")
        finally:
            for handle in handles:
                handle.remove()
    assert rel(ours, with_tomesd(unet, inputs, ratio=0.5, use_rand=False)) < REL
    # 13 x 19 tokens: 54 destinations, 193 sources = 19 chunks of 10 and one of 3, in each of 5 blocks
    assert seen.chunks.count((2, 10, 54)) == 19 * 5 and seen.chunks.count((2, 3, 54)) == 5 and len(seen.chunks) == 100
    assert alive_at_attention and not any(alive_at_attention)


def test_parity_with_tomesd_sdxl_every_site_and_random_cells():
    """SDXL-shaped, max_downsample 2 (our auto), all three sites, use_rand with the same generator
    state: tomesd forks the global RNG, so seeding it with our seed gives the same cells."""
    unet = unet_of("sdxl")
    inputs = example_inputs(unet, batch=2, height=13, width=19)
    options = dict(ratio=0.5, max_downsample=2, use_rand=True, merge_crossattn=True, merge_mlp=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        ref = with_tomesd(unet, inputs, **options)
    ours, _ = with_ours(unet, inputs, "tome ratio=0.5 use_rand=true merge_crossattn=true merge_mlp=true", seed=1234)
    fixed, _ = with_ours(unet, inputs, "tome ratio=0.5 merge_crossattn=true merge_mlp=true", seed=1234)
    assert rel(ours, ref) < REL and rel(fixed, ref) > 1e-4


def test_ratio_zero_installs_nothing_and_window_is_bit_identical():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    base = call(unet, inputs)
    before = snapshot(unet)
    out, applied = with_ours(unet, inputs, "tome ratio=0")
    assert applied.patcher is None and torch.equal(out, base)
    assert_restored(unet, before)
    outside, applied = with_ours(unet, inputs, "tome ratio=0.5 start=0.5", step=1, steps=4)
    inside, _ = with_ours(unet, inputs, "tome ratio=0.5 start=0.5", step=2, steps=4)
    assert applied.applied == ["tome"] and torch.equal(outside, base) and rel(inside, base) > 1e-2


def test_hires_ratio():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    first, _ = with_ours(unet, inputs, "tome ratio=0.3 hr_ratio=0.6")
    hires, _ = with_ours(unet, inputs, "tome ratio=0.3 hr_ratio=0.6", hires=True)
    same, _ = with_ours(unet, inputs, "tome ratio=0.3", hires=True)
    only_hires, applied = with_ours(unet, inputs, "tome ratio=0 hr_ratio=0.6")
    assert torch.equal(same, first) and not torch.equal(hires, first)
    assert applied.patcher is None and torch.equal(only_hires, call(unet, inputs))


def test_max_downsample_chooses_the_blocks(monkeypatch):
    seen = []
    plan = tome.MergeState.plan
    monkeypatch.setattr(tome.MergeState, "plan", lambda self, x: seen.append(x.shape[1]) or plan(self, x))
    sd15 = unet_of("sd15")
    with_ours(sd15, example_inputs(sd15, batch=2, height=16, width=24), "tome ratio=0.5")
    assert seen == [16 * 24] * 5  # SD1: the 5 full-resolution blocks
    seen.clear()
    with_ours(sd15, example_inputs(sd15, batch=2, height=16, width=24), "tome ratio=0.5 max_downsample=2")
    assert sorted(set(seen)) == [8 * 12, 16 * 24] and len(seen) == 10  # and the 5 at /2

    sdxl = unet_of("sdxl")
    inputs = example_inputs(sdxl, batch=2, height=16, width=24)
    seen.clear()
    out, applied = with_ours(sdxl, inputs, "tome ratio=0.5 max_downsample=1")
    assert applied.patcher is None and any("SDXL has none at full resolution" in m for m in applied.messages)
    assert torch.equal(out, call(sdxl, inputs)) and seen == []
    auto, _ = with_ours(sdxl, inputs, "tome ratio=0.5")
    assert set(seen) == {8 * 12} and rel(auto, out) > 1e-2


def test_randomness_private_seeded_and_off_for_odd_batches():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=3, height=16, width=24)
    state = torch.get_rng_state()
    fixed, _ = with_ours(unet, inputs, "tome ratio=0.5")
    odd, _ = with_ours(unet, inputs, "tome ratio=0.5 use_rand=true", seed=7)
    assert torch.equal(odd, fixed)
    even = {k: v[:2] for k, v in inputs.items() if v is not None} | {"y": None}
    a, _ = with_ours(unet, even, "tome ratio=0.5 use_rand=true", seed=7)
    b, _ = with_ours(unet, even, "tome ratio=0.5 use_rand=true", seed=7)
    c, _ = with_ours(unet, even, "tome ratio=0.5 use_rand=true", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, fixed[:2])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG never moved


def test_each_sample_is_matched_on_its_own():
    unet = unet_of("sd21")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    both, _ = with_ours(unet, inputs, "tome ratio=0.5")
    for i in range(2):
        one, _ = with_ours(unet, {k: v[i:i + 1] for k, v in inputs.items() if v is not None} | {"y": None}, "tome ratio=0.5")
        assert rel(one[0], both[i]) < REL


def test_restore_is_exact():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    base = call(unet, inputs)
    before = snapshot(unet)
    out, applied = with_ours(unet, inputs, "tome ratio=0.5 merge_crossattn=true merge_mlp=true")
    assert applied.applied == ["tome"] and rel(out, base) > 1e-2
    assert_restored(unet, before)
    assert torch.equal(call(unet, inputs), base)


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_odd_sizes_and_batches(batch):
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=batch, height=13, width=19)
    out, applied = with_ours(unet, inputs, "tome ratio=0.5 use_rand=true")
    assert out.shape == inputs["x"].shape and torch.isfinite(out).all() and applied.applied == ["tome"]
    assert rel(out, call(unet, inputs)) > 1e-3


def test_keyword_latent_and_520x776():
    """x passed by keyword (tomesd would fail there), SDXL at 520x776 (level 1: 33x49 tokens)."""
    unet = unet_of("sdxl")
    inputs = example_inputs(unet, batch=1, height=97, width=65)
    clock = StepClock()
    clock.start(1)
    applied = apply_mods(unet, Settings.from_text("tome ratio=0.5", strict=True), clock)
    try:
        with torch.no_grad(), webui_cat_fix(), sdpa_attention():
            out = unet(x=inputs["x"], timesteps=inputs["timesteps"], context=inputs["context"], y=inputs["y"])
    finally:
        applied.restore()
    assert rel(out, with_tomesd(unet, inputs, ratio=0.5, max_downsample=2, use_rand=False)) < REL


def test_cap_warning_and_bad_values():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=16)
    capped, applied = with_ours(unet, inputs, "tome ratio=0.9")
    assert any("above 1 - 1/(sx*sy) = 0.75" in m for m in applied.messages)
    at_cap, applied = with_ours(unet, inputs, "tome ratio=0.75")
    assert torch.equal(capped, at_cap) and not any("above" in m for m in applied.messages)
    _, applied = with_ours(unet, inputs, "tome ratio=0.9 sx=4 sy=4")
    assert not any("above" in m for m in applied.messages)
    assert "0.75" in tome.SPEC.param("ratio").label
    for bad in ("tome ratio=1.5", "tome max_downsample=3", "tome sx=0", "tome ratio=half"):
        with pytest.raises(SettingsError, match="tome"):
            Settings.from_text(bad, strict=True)


def test_an_outer_tiling_wrapper_on_attn1_composes():
    """A wrapper installed on attn1 after ToMe (HyperTile's place) that moves tiles into the batch
    gets the unmerged sequence: ToMe steps aside on those calls instead of mis-indexing them."""
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)

    def tile(attn):
        inner = attn.__dict__.get("forward") or (lambda *a, **k: type(attn).forward(attn, *a, **k))

        def forward(x, *args, **kwargs):
            b, n, c = x.shape
            return inner(x.reshape(b * 2, n // 2, c), *args, **kwargs).reshape(b, n, c)
        return forward

    def run(text):
        clock = StepClock()
        clock.start(1)
        applied = apply_mods(unet, Settings.from_text(text, strict=True), clock)
        attn = [m for n, m in unet.named_modules() if n.endswith("attn1")]
        saved = [a.__dict__.get("forward") for a in attn]
        for a in attn:
            a.forward = tile(a)
        try:
            return call(unet, inputs)
        finally:
            for a, old in zip(attn, saved):
                a.__dict__.pop("forward") if old is None else a.__dict__.__setitem__("forward", old)
            applied.restore()

    before = snapshot(unet)
    assert torch.equal(run("tome ratio=0.5"), run("tome ratio=0"))
    assert_restored(unet, before)


def test_together_with_freeu():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    before = snapshot(unet)
    both, applied = with_ours(unet, inputs, "tome ratio=0.5; freeu")
    alone, _ = with_ours(unet, inputs, "tome ratio=0.5")
    assert applied.applied == ["tome", "freeu"] and rel(both, alone) > 1e-3
    assert_restored(unet, before)
