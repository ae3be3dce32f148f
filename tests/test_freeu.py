"""FreeU against the reference formulas (design doc A1.2-A1.4), on tensors and on the UNet."""
import pytest
import torch

import ldm.modules.diffusionmodules.openaimodel as openaimodel
from lib_unetmods import Settings, StepClock, apply_mods
from lib_unetmods.techniques.freeu import (backbone_scale, channel_region, fourier_filter, schedule_ratio,
                                           scale_backbone, stage_of)
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot


def reference_fourier(x, threshold, scale):
    """FreeU-orig's Fourier_filter (A1.2), device-agnostic."""
    x_freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    B, C, H, W = x_freq.shape
    mask = torch.ones((B, C, H, W))
    crow, ccol = H // 2, W // 2
    mask[..., crow - threshold:crow + threshold, ccol - threshold:ccol + threshold] = scale
    return torch.fft.ifftn(torch.fft.ifftshift(x_freq * mask, dim=(-2, -1)), dim=(-2, -1)).real.to(x.dtype)


def reference_freeu_forward(unet, x, timesteps, context, y, b1, b2, s1, s2, version):
    """The ldm forward with FreeU applied in place before each concat (FreeU README / Forge:
    stage by h channels 4x and 2x model_channels, first C//2 channels, threshold 1)."""
    hs = []
    emb = unet.time_embed(openaimodel.timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
    if y is not None:
        emb = emb + unet.label_emb(y)
    h = x
    for module in unet.input_blocks:
        h = module(h, emb, context)
        hs.append(h)
    h = unet.middle_block(h, emb, context)
    factors = {4 * unet.model_channels: (b1, s1), 2 * unet.model_channels: (b2, s2)}
    for module in unet.output_blocks:
        skip = hs.pop()
        if h.shape[1] in factors:
            b, s = factors[h.shape[1]]
            half = h.shape[1] // 2
            if version == "v2":
                mean = h.mean(1).unsqueeze(1)
                B = mean.shape[0]
                mx = mean.view(B, -1).max(-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
                mn = mean.view(B, -1).min(-1, keepdim=True)[0].unsqueeze(2).unsqueeze(3)
                mean = (mean - mn) / (mx - mn)
                h[:, :half] = h[:, :half] * ((b - 1) * mean + 1)
            else:
                h[:, :half] = h[:, :half] * b
            skip = reference_fourier(skip, 1, s)
        h = module(torch.cat([h, skip], dim=1), emb, context)
    return unet.out(h)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 9, 12), (2, 1, 7, 5)])
def test_filter_matches_reference_and_scales_the_mean(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for s in (0.2, 0.9, 1.5):
        out = fourier_filter(x, 0.0, s)
        assert torch.equal(out, reference_fourier(x, 1, s))  # the same products, in place
        assert torch.allclose(out.mean(dim=(-2, -1)), s * x.mean(dim=(-2, -1)), atol=1e-5)
    assert fourier_filter(x, 0.3, 1.0, 1.0) is x  # identity factors skip the FFT


def test_filter_spectrum_cutoff_high_end_and_dtype():
    x = torch.randn(1, 2, 16, 12, generator=torch.Generator().manual_seed(1))
    out = fourier_filter(x, 0.5, 0.3, 1.7)
    spec_in = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1))
    mask = torch.full((16, 12), 1.7)
    mask[8 - 4:8 + 4, 6 - 3:6 + 3] = 0.3  # t = floor((H//2) * cutoff) rows, likewise columns
    expected = torch.fft.ifftn(torch.fft.ifftshift(spec_in * mask, dim=(-2, -1)), dim=(-2, -1)).real
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, fourier_filter(x, 0.0, 0.3, 1.7), atol=1e-3)  # the cutoff matters
    assert fourier_filter(x.half(), 0.0, 0.5).dtype == torch.float16


def test_channel_region_and_v1_locality():
    assert channel_region(8, 0.0, 0.5).tolist() == [True] * 4 + [False] * 4
    assert channel_region(8, 0.75, 0.5).tolist() == [True] * 2 + [False] * 4 + [True] * 2
    h = torch.randn(2, 8, 4, 4)
    out = scale_backbone(h, 1.3, "v1", 0.25, 0.5)
    region = channel_region(8, 0.25, 0.5)
    assert torch.equal(out[:, ~region], h[:, ~region])
    assert torch.equal(out[:, region], h[:, region] * 1.3)


def test_v2_scale_bounds_and_constant_input():
    h = torch.randn(3, 6, 5, 7, generator=torch.Generator().manual_seed(2))
    for b in (0.6, 1.4):
        scale = backbone_scale(h, b, "v2")
        assert scale.min() >= min(1, b) - 1e-6 and scale.max() <= max(1, b) + 1e-6
        mean = h.mean(1).flatten(1)
        flat = scale.flatten(1)
        assert torch.allclose(flat.gather(1, mean.argmin(1, keepdim=True)), torch.ones(3, 1))
        assert torch.allclose(flat.gather(1, mean.argmax(1, keepdim=True)), torch.full((3, 1), b))
    const = torch.ones(1, 4, 3, 3)
    assert torch.equal(backbone_scale(const, 1.5, "v2"), torch.ones(1, 1, 3, 3))


def test_schedule_vectors():
    flat = [schedule_ratio(i, 2, 6, 0.0) for i in range(8)]
    assert flat == [0, 0, 1, 1, 1, 1, 0, 0]
    smooth = [schedule_ratio(i, 2, 6, 1.0) for i in range(8)]
    assert smooth == [0, 0.5, 1, 0.75, 0.5, 0.25, 0, 0]
    assert schedule_ratio(3, 4, 4, 0.5) == 0.0


def test_stage_joins_per_family(make_unet):
    counts = {}
    for arch in ("sd15", "sdxl"):
        umap = map_unet(make_unet(arch))
        stages = [stage_of(c, umap.model_channels) for c in umap.h_channels]
        counts[arch] = [stages.count(n) for n in (1, 2, 3)]
    assert counts == {"sd15": [7, 3, 2], "sdxl": [4, 3, 2]}
    assert stage_of(1536, 384) == 1 and stage_of(768, 384) == 2  # SDXL refiner channels


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_unet_matches_reference_forward(arch, tiny_unet, make_inputs, version):
    inputs = make_inputs(tiny_unet, batch=2, height=16, width=24)
    b1, b2, s1, s2 = 1.3, 1.4, 0.9, 0.2
    expected = reference_freeu_forward(tiny_unet, inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"],
                                       b1, b2, s1, s2, version)
    before = snapshot(tiny_unet)
    settings = Settings.from_text(f"freeu version={version} b1={b1} b2={b2} s1={s1} s2={s2}", strict=True)
    applied = apply_mods(tiny_unet, settings, StepClock())
    out = tiny_unet(**inputs)
    applied.restore()
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, tiny_unet(**inputs), rtol=1e-3)
    assert_restored(tiny_unet, before)


def test_neutral_settings_and_windows_are_bit_identical(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=16, width=16)
    expected = unet(**inputs)
    clock = StepClock()
    clock.start(10)
    neutral = "freeu b1=1 b2=1 s1=1 s2=1"
    for text, step in ((neutral, 0), ("freeu start=0.5", 4), ("freeu stop=0.3", 3)):
        clock.begin_step(step)
        applied = apply_mods(unet, Settings.from_text(text, strict=True), clock)
        assert torch.equal(unet(**inputs), expected), text
        applied.restore()
    clock.begin_step(5)
    applied = apply_mods(unet, Settings.from_text("freeu start=0.5", strict=True), clock)
    assert not torch.equal(unet(**inputs), expected)
    applied.restore()


def test_hires_pass_has_its_own_schedule(make_unet, make_inputs):
    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=16, width=16)
    expected = unet(**inputs)
    clock = StepClock()
    clock.start(10, hires=True)
    applied = apply_mods(unet, Settings.from_text("freeu hr_start=0.5", strict=True), clock)
    assert torch.equal(unet(**inputs), expected)
    applied.restore()
    applied = apply_mods(unet, Settings.from_text("freeu start=0.5", strict=True), clock)
    assert not torch.equal(unet(**inputs), expected)
    applied.restore()
    before = snapshot(unet)
    applied = apply_mods(unet, Settings.from_text("freeu hires=false", strict=True), clock)
    assert applied.patcher is None
    assert_restored(unet, before)
