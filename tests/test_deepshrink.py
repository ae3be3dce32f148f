"""Deep Shrink: window, sizes, skip geometry, methods, bislerp, presets, restore, Comfy parity."""
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import ldm.modules.diffusionmodules.openaimodel as openaimodel
from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.lab.random_unets import sdpa_attention
from lib_unetmods.lab.sampler import sd_sigmas, sigma_to_t
from lib_unetmods.techniques import deepshrink as ds
from lib_unetmods.lab.model_state import assert_restored, snapshot

pytestmark = pytest.mark.usefixtures("sdpa_one_thread")


@pytest.fixture
def sdpa_one_thread():
    """SDPA attention (as the WebUI) and one thread: tiny convs on two threads of a loaded
    2-core machine run tens of times slower than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sdpa_attention():
            yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def strict_cat(record=None):
    """The ldm `th` with a cat that refuses size mismatches (no host nearest fix) and records
    the (h, skip) sizes of every decoder concat."""

    class StrictTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        def cat(self, tensors, dim=0):
            h, skip = tensors
            assert h.shape[2:] == skip.shape[2:], f"concat of {tuple(h.shape)} and {tuple(skip.shape)}"
            if record is not None:
                record.append(tuple(skip.shape[2:]))
            return torch.cat(tensors, dim=dim)

    original = openaimodel.th
    openaimodel.th = StrictTorch()
    try:
        yield
    finally:
        openaimodel.th = original


def run(unet, inputs, text, steps=20, step=0, hires=False, record=None):
    """One UNet call at `step` of a `steps`-step pass with the technique applied, then restore."""
    clock = StepClock()
    clock.start(steps, hires)
    clock.begin_step(step)
    applied = apply_mods(unet, Settings.from_text(text, strict=True), clock)
    try:
        with strict_cat(record):
            return unet(**inputs), applied.messages
    finally:
        applied.restore()


def skip_sizes(unet, inputs, text, **kw):
    """Spatial size of every input block's skip (index = input block), as the concats saw them."""
    record = []
    run(unet, inputs, text, record=record, **kw)
    return record[::-1]


# --- bit-identity, restore ------------------------------------------------------------------

@pytest.mark.parametrize("method", ds.METHODS)
def test_factor_one_and_outside_window_are_bit_identical(tiny_unet, make_inputs, method):
    inputs = make_inputs(tiny_unet, batch=2, height=16, width=24)
    with strict_cat():
        expected = tiny_unet(**inputs)
    before = snapshot(tiny_unet)
    shrink = f"deepshrink downscale_method={method} upscale_method={method}"
    assert torch.equal(run(tiny_unet, inputs, f"{shrink} factor=1")[0], expected)
    assert torch.equal(run(tiny_unet, inputs, shrink, step=7)[0], expected)  # 7/20 = end 0.35: outside
    shrunk, _ = run(tiny_unet, inputs, shrink, step=6)
    assert shrunk.shape == expected.shape and not torch.allclose(shrunk, expected, atol=1e-3)
    assert_restored(tiny_unet, before)
    with strict_cat():
        assert torch.equal(tiny_unet(**inputs), expected)


# --- geometry -------------------------------------------------------------------------------

@pytest.mark.parametrize("after_skip", [True, False])
def test_odd_latent_every_concat_matches_for_every_block(tiny_unet, make_inputs, after_skip):
    """33x49, every block: no concat relies on a host resize, the output keeps the input's shape."""
    inputs = make_inputs(tiny_unet, batch=1, height=33, width=49)
    last = len(tiny_unet.input_blocks) - 1
    for block in range(1, last + 1):
        factor = {1: 3.0, 3: 1.5, last: 2.5}.get(block, 2.0)
        out, messages = run(tiny_unet, inputs, f"deepshrink block={block} factor={factor} after_skip={after_skip}")
        assert out.shape == inputs["x"].shape and torch.isfinite(out).all()
        assert messages == []


def test_65x97_latent_sizes(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=65, width=97)
    record = []
    out, _ = run(unet, inputs, "deepshrink preset=comfy upscale_method=bislerp", record=record)
    sizes = record[::-1]
    # input 3 (downsample) makes 33x49; its skip stays full size, then round(16.5)=16, round(24.5)=24
    assert sizes[3] == (33, 49) and sizes[4] == (16, 24)
    assert sizes[6] == (8, 12) and sizes[9] == (4, 6)
    assert out.shape == inputs["x"].shape


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_after_skip_decides_the_size_of_the_blocks_skip(make_unet, make_inputs, arch):
    """Spec 2.7(4): after skip, block b's skip is full size; before skip, it is shrunk."""
    unet = make_unet(arch)
    inputs = make_inputs(unet, batch=1, height=32, width=48)
    plain = skip_sizes(unet, inputs, "deepshrink factor=1")
    after = skip_sizes(unet, inputs, "deepshrink block=4 after_skip=true")
    before = skip_sizes(unet, inputs, "deepshrink block=4 after_skip=false")
    assert plain[4] == after[4] == (16, 24)
    assert before[4] == after[5] == (8, 12)
    assert after[:4] == before[:4] == plain[:4]


def test_shrunk_size_rule():
    assert ds.shrunk_size((2, 4, 33, 49), 2.0) == (16, 24)  # half to even, as Comfy's round()
    assert ds.shrunk_size((35, 49), 2.0) == (18, 24)
    assert ds.shrunk_size((65, 97), 3.0) == (22, 32)
    assert ds.shrunk_size((64, 96), 1.5) == (43, 64)
    assert ds.shrunk_size((64, 96), 0.5) == (128, 192)
    assert ds.shrunk_size((3, 5), 9.0) == (1, 1)


def test_cond_and_uncond_rows_get_the_same_geometry(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=17, width=25)
    whole, _ = run(unet, inputs, "deepshrink factor=1.7")
    rows = [run(unet, {k: v[i:i + 1] for k, v in inputs.items() if v is not None}, "deepshrink factor=1.7")[0]
            for i in range(2)]
    torch.testing.assert_close(torch.cat(rows), whole, rtol=1e-5, atol=1e-5)


# --- parity with ComfyUI's algorithm, written out here block by block -----------------------

def comfy_reference(unet, inputs, block, factor, after_skip, down, up):
    """PatchModelAddDownscale as Comfy/Forge run it: input block, input_block_patch, push skip,
    input_block_patch_after_skip; pop skip, output_block_patch (resize h to the skip), concat."""
    x, t, context, y = inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"]
    emb = unet.time_embed(openaimodel.timestep_embedding(t, unet.model_channels))
    if y is not None:
        emb = emb + unet.label_emb(y)

    def shrink(h):
        size = (round(h.shape[-2] * (1.0 / factor)), round(h.shape[-1] * (1.0 / factor)))
        return F.interpolate(h, size=size, mode=down)

    h, hs = x, []
    for i, module in enumerate(unet.input_blocks):
        h = module(h, emb, context)
        h = shrink(h) if i == block and not after_skip else h
        hs.append(h)
        h = shrink(h) if i == block and after_skip else h
    h = unet.middle_block(h, emb, context)
    for module in unet.output_blocks:
        skip = hs.pop()
        if h.shape[-2:] != skip.shape[-2:]:
            h = F.interpolate(h, size=skip.shape[-2:], mode=up)
        h = module(torch.cat([h, skip], dim=1), emb, context)
    return unet.out(h)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("block,factor,after_skip,down,up", [
    (3, 2.0, True, "bicubic", "bicubic"),
    (4, 1.5, False, "area", "bilinear"),
    (2, 3.0, True, "nearest-exact", "bicubic"),
])
def test_matches_comfy_algorithm(make_unet, make_inputs, arch, block, factor, after_skip, down, up):
    unet = make_unet(arch)
    inputs = make_inputs(unet, batch=2, height=24, width=40)
    text = (f"deepshrink block={block} factor={factor} after_skip={after_skip} "
            f"downscale_method={down} upscale_method={up}")
    out, _ = run(unet, inputs, text)
    torch.testing.assert_close(out, comfy_reference(unet, inputs, block, factor, after_skip, down, up), rtol=0, atol=0)


# --- window ---------------------------------------------------------------------------------

def test_end_035_window_boundary_matches_the_comfy_sigma_window(make_unet, make_inputs):
    """20 steps, end 0.35: steps 0-6 shrink. Comfy's window (sigma >= sigma(t = 0.65 * 999) =
    t >= 649.35, kohya's 650) selects the same steps of an evenly spaced 20-step schedule."""
    unet = make_unet("sdxl")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    shrunk = [skip_sizes(unet, inputs, "deepshrink preset=comfy", step=i)[4] != (8, 8) for i in range(20)]
    assert shrunk == [True] * 7 + [False] * 13
    timesteps = [sigma_to_t(float(s)) for s in sd_sigmas(20)[:-1]]
    assert [t >= (1 - 0.35) * 999 for t in timesteps] == shrunk


def test_start_and_second_window(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    text = "deepshrink block=3 start=0.2 end=0.4 block2=6 end2=0.7"
    plain = skip_sizes(unet, inputs, "deepshrink factor=1", steps=10)
    where = []
    for step in range(10):
        sizes = skip_sizes(unet, inputs, text, steps=10, step=step)
        changed = [i for i, (a, b) in enumerate(zip(plain, sizes)) if a != b]
        where.append(changed[0] - 1 if changed else None)  # the block after which h was shrunk
    assert where == [None, None, 3, 3, 6, 6, 6, None, None, None]


def test_smooth_scaling_ramps_back_to_one():
    assert ds.smooth_factor(2.0, 0.0, 0.0, 0.5) == 2.0
    assert ds.smooth_factor(2.0, 0.25, 0.0, 0.5) == pytest.approx(1 / 0.75)
    assert ds.smooth_factor(2.0, 0.5, 0.0, 0.5) == 1.0
    for step in range(10):  # wcde: downscale_t = min(down + (1 - down) * step / (total * stop), 1)
        wcde = min(0.5 + 0.5 * step / (20 * 0.5), 1.0)
        assert 1 / ds.smooth_factor(2.0, step / 20, 0.0, 0.5) == pytest.approx(wcde)


def test_smooth_scaling_in_the_model(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=32, width=32)
    sizes = [skip_sizes(unet, inputs, "deepshrink smooth=true end=0.5", steps=10, step=i)[4] for i in range(6)]
    # level 1 is 16x16: 1/f = 0.5, 0.6, 0.7, 0.8, 0.9 -> round(16 * s); then full size
    assert sizes == [(8, 8), (10, 10), (11, 11), (13, 13), (14, 14), (16, 16)]


def test_hires_pass_only_when_asked(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    with strict_cat():
        expected = unet(**inputs)
    assert torch.equal(run(unet, inputs, "deepshrink", hires=True)[0], expected)
    assert not torch.equal(run(unet, inputs, "deepshrink hires=true", hires=True)[0], expected)


def test_empty_window_warns(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    out, messages = run(unet, inputs, "deepshrink end=0.04")  # int(0.04 * 20) = 0
    assert "covers no step" in messages[0]


# --- validation, presets ----------------------------------------------------------------------

def test_invalid_block_for_the_family_is_refused(make_unet, make_inputs):
    unet = make_unet("sdxl")
    inputs = make_inputs(unet, batch=1, height=16, width=16)
    with strict_cat():
        expected = unet(**inputs)
    for text in ("deepshrink block=9", "deepshrink block2=10 end2=0.5"):
        out, messages = run(unet, inputs, text)
        assert torch.equal(out, expected)
        assert messages and "Deep Shrink skipped" in messages[0] and "SDXL" in messages[0] and "1-8" in messages[0]
    sd15 = make_unet("sd15")
    assert run(sd15, make_inputs(sd15, batch=1, height=16, width=16), "deepshrink block=11")[1] == []
    bad = Settings.from_text("deepshrink block=12 upscale_method=lanczos")
    assert len(bad.errors) == 2 and bad["deepshrink"]["block"] == 3


def test_presets_and_recommended():
    settings = Settings.from_text("deepshrink preset=comfy", strict=True)
    assert settings["deepshrink"] == {**ds.SPEC.defaults(), "enabled": True}  # the defaults are Comfy's
    wcde = Settings.from_text("deepshrink preset=wcde", strict=True)["deepshrink"]
    assert ds.windows_of(wcde) == [ds.Window(1, 0.0, 0.15), ds.Window(2, 0.0, 0.3)]
    assert ds.SPEC.recommended_values("sdxl")["smooth"] is True
    assert ds.SPEC.recommended_values("sd1")["end"] == 0.35


# --- interpolation methods, bislerp ------------------------------------------------------------

def comfy_bislerp(x, size):
    """An independent reading of ComfyUI's `bislerp` (comfy/utils.py), written from its formula with
    per-pixel loops in float64: along the width, then the height, output index j of a side L -> L'
    reads the bilinear source position p = clamp((j + 0.5) * L / L' - 0.5, 0, L - 1) and combines
    the channel vectors a = x[floor(p)] and b = x[min(floor(p) + 1, L - 1)] with r = p - floor(p):
    the unit directions (zero for a zero vector) are slerped and the norms lerped; where the
    directions' cosine is above 1 - 1e-5 Comfy keeps a itself, below -1 + 1e-5 it lerps a and b."""
    def axis(t, n_out, along_w):
        n_in = t.shape[3] if along_w else t.shape[2]
        rows = []
        for j in range(n_out):
            pos = min(max((j + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            lo = int(pos)
            hi, w = min(lo + 1, n_in - 1), pos - lo
            a = t[:, :, :, lo] if along_w else t[:, :, lo, :]
            b = t[:, :, :, hi] if along_w else t[:, :, hi, :]
            rows.append(torch.stack([torch.stack([one(a[n, :, k], b[n, :, k], w) for k in range(a.shape[2])], -1)
                                     for n in range(a.shape[0])]))
        return torch.stack(rows, 3 if along_w else 2)

    def one(a, b, w):
        na, nb = a.norm(), b.norm()
        ua = a / na if na > 0 else torch.zeros_like(a)
        ub = b / nb if nb > 0 else torch.zeros_like(b)
        cos = float((ua * ub).sum())
        if cos > 1 - 1e-5:
            return a
        if cos < 1e-5 - 1:
            return (1 - w) * a + w * b
        om = torch.tensor(cos, dtype=torch.float64).acos()
        return (torch.sin((1 - w) * om) * ua + torch.sin(w * om) * ub) / torch.sin(om) * ((1 - w) * na + w * nb)

    return axis(axis(x.double(), size[1], True), size[0], False).float()


@pytest.mark.parametrize("size", [(7, 3), (2, 9), (4, 5), (8, 10), (1, 1)])
def test_bislerp_matches_comfy(size):
    x = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(0))
    x[0, :, 1, 2] = 0  # a zero vector: direction 0, as Comfy
    torch.testing.assert_close(ds.bislerp(x, size), comfy_bislerp(x, size), rtol=1e-4, atol=1e-5)


def test_bislerp_edge_cases_match_comfy():
    g = torch.Generator().manual_seed(1)
    # neighbours of one direction with different norms: Comfy keeps the first neighbour (not bilinear)
    field = torch.randn(1, 8, 1, 1, generator=g) * (0.5 + torch.rand(1, 1, 5, 7, generator=g))
    torch.testing.assert_close(ds.bislerp(field, (9, 4)), comfy_bislerp(field, (9, 4)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ds.bislerp(field, (9, 4)), F.interpolate(field, size=(9, 4), mode="bilinear"), atol=1e-3)
    # opposite directions: lerped
    signs = torch.tensor([1.0, -1.0, 1.0]).view(1, 1, 1, 3)
    opposite = torch.randn(1, 8, 1, 1, generator=g) * signs * torch.tensor([1.0, 2.0, 0.5]).view(1, 1, 1, 3)
    torch.testing.assert_close(ds.bislerp(opposite, (1, 5)), comfy_bislerp(opposite, (1, 5)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds.bislerp(opposite, (1, 5)), F.interpolate(opposite, size=(1, 5), mode="bilinear"))


def test_bislerp_properties():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 6, 6, generator=g)
    assert torch.equal(ds.resize(x, (6, 6), "bislerp"), x)
    # between unit vectors the norm stays 1 (bilinear would shrink it)
    unit = F.normalize(torch.randn(1, 8, 3, 3, generator=g), dim=1)
    torch.testing.assert_close(ds.bislerp(unit, (7, 5)).norm(dim=1), torch.ones(1, 7, 5))
    assert ds.bislerp(x.half(), (3, 3)).dtype == torch.half
    assert torch.isfinite(ds.bislerp(torch.zeros(1, 4, 3, 3), (5, 5))).all()


@pytest.mark.parametrize("method", [m for m in ds.METHODS if m != "bislerp"])
def test_torch_methods_are_plain_interpolate(method):
    x = torch.randn(1, 3, 9, 13, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ds.resize(x, (5, 7), method), F.interpolate(x, size=(5, 7), mode=method))
    assert ds.resize(x, (9, 13), method) is x
    assert ds.resize(x.bfloat16(), (5, 7), method).dtype == torch.bfloat16
