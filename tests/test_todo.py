"""Token Downsampling: the downsampling against the references' (F.interpolate on the token grid),
the UNet against direct implementations of both references on the same weights (the A1111
extension's attn1 pre-hook, the paper code's to_k/to_v pre-hooks), windows, hires, restore,
composition with ToMe, HyperTile and MSW-MSA, the preview and bad values."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib_unetmods import Settings, SettingsError, StepClock, apply_mods
from lib_unetmods.acts import PassInfo
from lib_unetmods.composition import resolve_conflicts
from lib_unetmods.lab.random_unets import example_inputs, sdpa_attention
from lib_unetmods.preview import Image, compute
from lib_unetmods.techniques import todo
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot
from tiny_unet_calls import announce, call, rel, unet_of


def with_ours(unet, inputs, text, step=0, steps=1, hires=False):
    clock = StepClock()
    clock.start(steps, hires=hires)
    clock.begin_step(step)
    announce(clock, inputs["x"].shape[0] // 2)
    with sdpa_attention():  # the host's attention kernel is chosen before the mods are applied
        applied = apply_mods(unet, Settings.from_text(text, strict=True), clock, seed=3)
        try:
            return call(unet, inputs), applied
        finally:
            applied.restore()


# --- the references, written directly from reading them ------------------------------------

def reference_resample(item, cur_w, cur_h, new_w, new_h, method):
    """Both references' up_or_downsample: tokens to a (B, C, h, w) grid, F.interpolate, back."""
    b = item.shape[0]
    item = item.reshape(b, cur_h, cur_w, -1).permute(0, 3, 1, 2)
    item = F.interpolate(item, size=(new_h, new_w), mode=method).permute(0, 2, 3, 1)
    return item.reshape(b, new_h * new_w, -1)


def with_a1111_extension(unet, inputs, factor=2.0, max_depth=1, only=None):
    """feffy380/sd-webui-token-downsampling: a UNet pre-hook keeps the latent size, a pre-hook on every
    attn1 replaces its context by the hidden states downsampled with nearest-exact where
    ceil(sqrt(HW // N)) <= 2**(max_depth - 1); grid H // downsample, new side int(side / factor).
    `only`: act at this downsampling alone (where another technique owns the others)."""
    size = {}
    handles = [unet.register_forward_pre_hook(lambda m, args: size.__setitem__("hw", tuple(args[0].shape[2:])))]

    def hook(module, args, kwargs):
        x = args[0]
        h0, w0 = size["hw"]
        downsample = int(math.ceil(math.sqrt(h0 * w0 // x.shape[1])))
        if downsample <= 2 ** (max_depth - 1) and only in (None, downsample):
            h, w = h0 // downsample, w0 // downsample
            kwargs["context"] = reference_resample(x, w, h, int(w / factor), int(h / factor), "nearest-exact")
        return args, kwargs

    for name, m in unet.named_modules():
        if type(m).__name__ == "BasicTransformerBlock":
            handles.append(m.attn1.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return call(unet, inputs)
    finally:
        for h in handles:
            h.remove()


def with_paper_code(unet, inputs, factor=2, factor_level_2=1):
    """ethansmith2000/ImprovedTokenMerge: pre-hooks on attn1.to_k and attn1.to_v downsample their input
    (nearest, integer sizes h // factor) at downsampling 1 (factor) and 2 (factor_level_2)."""
    size = {}
    handles = [unet.register_forward_pre_hook(lambda m, args: size.__setitem__("hw", tuple(args[0].shape[2:])))]

    def hook(module, args):
        x = args[0]
        h0, w0 = size["hw"]
        downsample = int(math.ceil(math.sqrt(h0 * w0 // x.shape[1])))
        f = {1: factor, 2: factor_level_2}.get(downsample, 1)
        if downsample <= 2 and f > 1:
            h, w = h0 // downsample, w0 // downsample
            return (reference_resample(x, w, h, w // f, h // f, "nearest"),)
        return None

    for name, m in unet.named_modules():
        if type(m).__name__ == "BasicTransformerBlock":
            handles += [m.attn1.to_k.register_forward_pre_hook(hook), m.attn1.to_v.register_forward_pre_hook(hook)]
    try:
        return call(unet, inputs)
    finally:
        for h in handles:
            h.remove()


# --- the math ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", todo.METHODS)
@pytest.mark.parametrize("h, w, factor", [(16, 24, 2), (13, 19, 2), (13, 19, 3), (32, 32, 2.5), (9, 7, 4.9), (2, 3, 5)])
def test_downsampling_equals_the_references_interpolation(method, h, w, factor):
    x = torch.randn(2, h * w, 12)
    size = todo.kv_size(h, w, factor)
    assert size == (max(1, int(h / factor)), max(1, int(w / factor)))
    ours = todo.downsample_tokens(x, h, w, size, method)
    expected = reference_resample(x, w, h, size[1], size[0], method)
    if method.startswith("nearest"):
        assert torch.equal(ours, expected)  # a gather of the very tokens interpolate picks
    else:
        torch.testing.assert_close(ours, expected)


def test_nearest_exact_keeps_the_centre_token_of_each_cell():
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid numbered row by row
    assert todo.downsample_tokens(x, 4, 4, (2, 2), "nearest-exact").view(-1).tolist() == [5, 7, 13, 15]
    assert todo.downsample_tokens(x, 4, 4, (2, 2), "nearest").view(-1).tolist() == [0, 2, 8, 10]


def test_layer_downsample_is_the_references_rule():
    assert [todo.layer_downsample(64, 64, n) for n in (4096, 1024, 256, 64)] == [1, 2, 4, 8]
    assert [todo.layer_downsample(13, 19, 7 * 10), todo.layer_downsample(13, 19, 13 * 19)] == [2, 1]


# --- the UNet: parity with both references ---------------------------------------------------

@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_parity_with_the_a1111_extension_sd15(factor):
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    base = call(unet, inputs)
    ref = with_a1111_extension(unet, inputs, factor=factor)
    ours, applied = with_ours(unet, inputs, f"todo factor={factor}")
    assert applied.applied == ["todo"] and rel(ref, base) > 1e-2  # ToDo really changes the output
    assert torch.equal(ours, ref)


def test_parity_with_the_a1111_extension_sdxl_depth_2():
    """SDXL-shaped: no attention at full resolution, so auto = depth 2 (the extension clamps SDXL to 2-3)."""
    unet = unet_of("sdxl")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    ref = with_a1111_extension(unet, inputs, max_depth=2)
    ours, applied = with_ours(unet, inputs, "todo")
    assert applied.applied == ["todo"] and rel(ref, call(unet, inputs)) > 1e-2
    assert torch.equal(ours, ref)
    deeper, _ = with_ours(unet, inputs, "todo max_depth=3")
    assert torch.equal(deeper, with_a1111_extension(unet, inputs, max_depth=3)) and not torch.equal(deeper, ours)


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_parity_with_the_paper_code(arch):
    """Keys and values from the downsampled tokens (ours: the context; the paper's code: to_k/to_v's
    input): the same tokens go through the same projections, equal to float rounding."""
    unet = unet_of(arch)
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    ref = with_paper_code(unet, inputs, factor=2)
    ours, _ = with_ours(unet, inputs, "todo method=nearest")
    assert rel(ref, call(unet, inputs)) > 1e-2
    assert rel(ours, ref) < 1e-5
    ref2 = with_paper_code(unet, inputs, factor=2, factor_level_2=2)
    ours2, _ = with_ours(unet, inputs, "todo method=nearest max_depth=2")
    assert rel(ours2, ref2) < 1e-5 and rel(ours2, ours) > 1e-3


def test_odd_latent_sides_use_the_convs_grid_where_the_references_fail():
    """13x19 latent (104x152 px): level 1 is 7x10 (ceil). The references take 13 // 2 = 6 rows and
    cannot reshape 70 tokens; ours equals the same direct rule on the true grid."""
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=13, width=19)
    with pytest.raises(RuntimeError):
        with_a1111_extension(unet, inputs, max_depth=2)
    ours, applied = with_ours(unet, inputs, "todo max_depth=2")
    size = {}
    handles = [unet.register_forward_pre_hook(lambda m, args: size.__setitem__("hw", tuple(args[0].shape[2:])))]

    def hook(module, args, kwargs):
        x = args[0]
        h0, w0 = size["hw"]
        k = int(math.ceil(math.sqrt(h0 * w0 // x.shape[1])))
        if k <= 2:
            h, w = -(-h0 // k), -(-w0 // k)
            kwargs["context"] = reference_resample(x, w, h, int(w / 2), int(h / 2), "nearest-exact")
        return args, kwargs

    handles += [m.attn1.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules()
                if type(m).__name__ == "BasicTransformerBlock"]
    try:
        direct = call(unet, inputs)
    finally:
        for h in handles:
            h.remove()
    assert applied.applied == ["todo"] and torch.equal(ours, direct)


# --- off, windows, hires, restore ------------------------------------------------------------

def test_factor_1_installs_nothing_and_the_window_is_bit_identical():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    base = call(unet, inputs)
    before = snapshot(unet)
    out, applied = with_ours(unet, inputs, "todo factor=1")
    assert applied.patcher is None and torch.equal(out, base) and any("nothing to do" in m for m in applied.messages)
    assert_restored(unet, before)
    after, applied = with_ours(unet, inputs, "todo end=0.5", step=2, steps=4)  # disabled after 50 %
    inside, _ = with_ours(unet, inputs, "todo end=0.5", step=1, steps=4)
    assert applied.applied == ["todo"] and torch.equal(after, base) and rel(inside, base) > 1e-2
    late, _ = with_ours(unet, inputs, "todo start=0.5", step=1, steps=4)
    assert torch.equal(late, base)
    assert_restored(unet, before)
    assert torch.equal(call(unet, inputs), base)


def test_hires_factor_and_box():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    first, _ = with_ours(unet, inputs, "todo factor=2 hr_factor=3")
    hires, _ = with_ours(unet, inputs, "todo factor=2 hr_factor=3", hires=True)
    same, _ = with_ours(unet, inputs, "todo factor=2", hires=True)
    assert torch.equal(same, first) and torch.equal(hires, with_a1111_extension(unet, inputs, factor=3.0))
    off, applied = with_ours(unet, inputs, "todo hires=false", hires=True)
    assert applied.patcher is None and torch.equal(off, call(unet, inputs))
    left, applied = with_ours(unet, inputs, "todo hr_factor=1", hires=True)
    assert applied.patcher is None and any("nothing to do" in m for m in applied.messages)


def test_max_depth_chooses_the_layers(monkeypatch):
    seen = []
    downsample = todo.downsample_tokens
    monkeypatch.setattr(todo, "downsample_tokens", lambda x, *a: seen.append(x.shape[1]) or downsample(x, *a))
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    with_ours(unet, inputs, "todo")
    assert seen == [16 * 24] * 5  # SD1: the 5 full-resolution transformer blocks
    seen.clear()
    with_ours(unet, inputs, "todo max_depth=2")
    assert sorted(set(seen)) == [8 * 12, 16 * 24] and len(seen) == 10
    sdxl = unet_of("sdxl")
    seen.clear()
    out, applied = with_ours(sdxl, example_inputs(sdxl, batch=2, height=16, width=24), "todo max_depth=1")
    assert applied.patcher is None and any("SDXL has none at full resolution" in m for m in applied.messages) and not seen


def test_bad_values_are_refused_with_the_parameter_named():
    for bad in ("todo factor=0.5", "todo factor=6", "todo max_depth=5", "todo method=linear", "todo end=2"):
        with pytest.raises(SettingsError, match="todo"):
            Settings.from_text(bad, strict=True)


# --- composition -------------------------------------------------------------------------------

def test_tome_yields_its_attention_merging_to_todo():
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=16, width=24)
    both, applied = with_ours(unet, inputs, "todo; tome ratio=0.5")
    alone, _ = with_ours(unet, inputs, "todo")
    assert torch.equal(both, alone) and applied.settings["tome"]["merge_attn"] is False
    assert any(m.startswith("ToDo + ToMe") for m in applied.messages)
    mlp, applied = with_ours(unet, inputs, "todo; tome ratio=0.5 merge_mlp=true")
    assert applied.applied == ["tome", "todo"] and rel(mlp, alone) > 1e-3  # ToMe's MLP merging still applies


def test_hypertile_tiles_first_and_todo_takes_the_calls_left_whole():
    unet = unet_of("sd15")
    # 128x192 px: HyperTile's smallest tile (128 px) does not split 16x24: ToDo acts alone
    small = example_inputs(unet, batch=2, height=16, width=24)
    both, applied = with_ours(unet, small, "todo; hypertile tile_size=128 swap_size=1")
    alone, _ = with_ours(unet, small, "todo")
    assert applied.applied == ["todo", "hypertile"] and torch.equal(both, alone)
    assert any(m.startswith("ToDo + HyperTile") for m in applied.messages)
    # 256x256 px: every full-resolution call is split in 2x2 tiles, each attending in full: HyperTile
    # alone, and ToDo changed nothing: no key, and it says why
    large = example_inputs(unet, batch=2, height=32, width=32)
    both, applied = with_ours(unet, large, "todo; hypertile tile_size=128 swap_size=1 max_depth=0")
    tiles, _ = with_ours(unet, large, "hypertile tile_size=128 swap_size=1 max_depth=0")
    assert torch.equal(both, tiles) and rel(both, with_ours(unet, large, "todo")[0]) > 1e-3
    assert applied.idle_after_pass() == {"todo": "Token Downsampling (ToDo): every self-attention call it would downsample "
                                                 "was cut into tiles or windows (HyperTile, MSW-MSA); nothing to do"}
    assert with_ours(unet, large, "todo")[1].idle_after_pass() == {}


def test_at_depth_2_todo_leaves_hypertiles_tiles_whole():
    """ToDo at max_depth 2 would take a quarter tile for a layer at half resolution: the tiles
    HyperTile cut at full resolution keep full attention, ToDo downsamples the half-resolution layers."""
    unet = unet_of("sd15")
    large = example_inputs(unet, batch=2, height=32, width=32)
    hypertile = "hypertile tile_size=128 swap_size=1 max_depth=0"
    both, applied = with_ours(unet, large, f"todo max_depth=2; {hypertile}")
    clock = StepClock()
    clock.start(1)
    tiles = apply_mods(unet, Settings.from_text(hypertile, strict=True), clock, seed=3)
    try:
        with sdpa_attention():
            expected = with_a1111_extension(unet, large, max_depth=2, only=2)
    finally:
        tiles.restore()
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)
    assert applied.idle_after_pass() == {} and rel(both, with_ours(unet, large, hypertile)[0]) > 1e-3


@pytest.mark.parametrize("resizer", ["deepshrink block=3 end=1", "hidiffusion auto=false t1=1 msw_msa=false"])
def test_the_depth_of_a_layer_follows_its_tokens_where_features_are_resized(resizer):
    """Deep Shrink and RAU-Net run the deep blocks on smaller features: a layer is as deep as its
    token count says (the references' rule), so ToDo at max_depth 2 leaves a shrunk half-resolution
    layer whole and downsamples it again once it has its size back."""
    unet = unet_of("sd15")
    inputs = example_inputs(unet, batch=2, height=32, width=32)
    both, _ = with_ours(unet, inputs, f"todo max_depth=2; {resizer}")
    clock = StepClock()
    clock.start(1)
    resized = apply_mods(unet, Settings.from_text(resizer, strict=True), clock, seed=3, latent_shape=tuple(inputs["x"].shape))
    try:
        with sdpa_attention():
            expected = with_a1111_extension(unet, inputs, max_depth=2)
    finally:
        resized.restore()
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)


def test_idle_without_a_clock_counts_either_pass():
    """Without a pass (the preview, the rules before sampling) ToDo acts if either pass's factor does."""
    umap, where = map_unet(unet_of("sd15")), PassInfo()
    values = {**todo.SPEC.defaults(), "enabled": True, "factor": 1.0, "hr_factor": 3.0}
    assert todo.idle(values, umap, where) is None
    assert todo.idle({**values, "hr_factor": 1.0}, umap, where) == "factor 1 downsamples nothing"
    assert todo.idle({**values, "factor": 2.0, "end": 0.0}, umap, where) is None  # the window needs the pass's steps


def test_msw_msa_yields_to_todo():
    umap = map_unet(unet_of("sd15"))
    resolved, notes = resolve_conflicts(Settings.from_text("todo; hidiffusion", strict=True), umap)
    assert resolved["hidiffusion"]["msw_msa"] is False and resolved["todo"]["enabled"]
    assert any(n.startswith("ToDo + HiDiffusion MSW-MSA") for n in notes)
    deeper_only, notes = resolve_conflicts(Settings.from_text("todo max_depth=1; hidiffusion", strict=True),
                                           map_unet(unet_of("sdxl")))
    assert deeper_only["hidiffusion"]["msw_msa"] is True and not notes  # SDXL depth 1 has no layer: ToDo does not act
    nothing = resolve_conflicts(Settings.from_text("todo factor=1; hidiffusion", strict=True), umap)[0]
    assert nothing["hidiffusion"]["msw_msa"] is True


def test_preview_shows_the_window_and_depth():
    preview = compute(Settings.from_text("todo end=0.5 hr_factor=3", strict=True),
                      Image(steps=10, hires=True, hr_steps=4), "sdxl")
    first, hires = preview.passes
    row = next(r for r in first.rows if r.technique == "todo")
    assert [c.kind for c in row.cells] == ["on"] * 5 + ["off"] * 5 and "depth <= 2" in row.note
    assert "factor 3" in next(r for r in hires.rows if r.technique == "todo").note
