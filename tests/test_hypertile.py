"""HyperTile: tile counts as the built-in draws them, spatially correct tiles on every aspect ratio,
tiled attention = block-diagonal attention, exact restore, and the ToMe composition rule."""
import random

import pytest
import torch
import torch.nn.functional as F

from lib_unetmods import Settings, SettingsError, StepClock, apply_mods
from lib_unetmods.composition import resolve_conflicts
from lib_unetmods.patcher import Patcher
from lib_unetmods.lab.random_unets import set_transformer_depth, build_unet, sdpa_attention, webui_cat_fix
from lib_unetmods.techniques.hypertile import (
    depth_layers, largest_tile_size_available, layer_grid, merge_tiles, split_tiles, tile_counts,
)
from lib_unetmods.unet_map import map_unet
from lib_unetmods.lab.model_state import assert_restored, snapshot
from tiny_unet_calls import attn1_patch_of_another_extension


def run(unet, inputs, text=None, seed=0, hires=False):
    """One UNet call, with `text` applied (None = plain); returns (output, messages)."""
    clock = StepClock()
    clock.start(1, hires=hires)
    applied = apply_mods(unet, Settings.from_text(text, strict=True), clock, seed=seed) if text else None
    try:
        return unet(**inputs), (applied.messages if applied else [])
    finally:
        if applied:
            applied.restore()


def tile_ids(h, w, nh, nw):
    rows = torch.arange(h).repeat_interleave(w) // (h // nh)
    cols = torch.arange(w).repeat(h) // (w // nw)
    return rows * nw + cols


def masked_attention(attn, x, ids):
    """Self-attention of an ldm CrossAttention with a block-diagonal mask: token i sees token j
    iff they are in the same tile."""
    b, n, _ = x.shape
    q, k, v = (t.view(b, n, attn.heads, -1).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ids[:, None] == ids[None, :])
    return attn.to_out(out.transpose(1, 2).reshape(b, n, -1))


# --- tile counts: the design doc's test vectors (2(b) 5) ----------------------------------

@pytest.mark.parametrize("value, min_tile, swap, expected", [
    (128, 32, 3, (4, 2, 1)), (256, 32, 3, (8, 4, 2)), (96, 32, 3, (3, 2, 1)),
    (64, 32, 3, (2, 1)), (96, 32, 1, (3,)), (96, 32, 0, (3,)), (16, 32, 3, (1,)), (47, 16, 3, (1,)),
])
def test_tile_counts(value, min_tile, swap, expected):
    assert tile_counts(value, min_tile, swap) == expected


def test_largest_tile_size():
    assert largest_tile_size_available(768, 512) == 256
    assert largest_tile_size_available(1024, 1024) == 1024
    assert largest_tile_size_available(520, 776) == 8


# --- the partition ------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, nh, nw", [(64, 96, 2, 2), (6, 10, 2, 5), (9, 4, 3, 1), (5, 7, 1, 7), (8, 8, 4, 2)])
def test_tiles_are_contiguous_rectangles_and_inverse_is_exact(h, w, nh, nw):
    x = torch.randn(3, h * w, 5)
    x[..., 0] = torch.arange(h * w, dtype=torch.float)  # channel 0 = position in the row-major grid
    tiles = split_tiles(x, h, w, nh, nw)
    th, tw = h // nh, w // nw
    assert tiles.shape == (3 * nh * nw, th * tw, 5)
    for b in range(3):
        for i in range(nh):
            for j in range(nw):
                pos = tiles[b * nh * nw + i * nw + j, :, 0].long()
                rows, cols = pos // w, pos % w
                assert torch.equal(rows, torch.arange(i * th, (i + 1) * th).repeat_interleave(tw))
                assert torch.equal(cols, torch.arange(j * tw, (j + 1) * tw).repeat(th))
                assert torch.equal(tiles[b * nh * nw + i * nw + j, :, 1:], x[b, pos, 1:])  # no batch mixing
    assert torch.equal(merge_tiles(tiles, h, w, nh, nw), x)


def test_design_doc_non_square_vector():
    """768x512 image = latent 64 rows x 96 columns, 2x2 tiles: tile 0 is rows 0-31, columns 0-47
    (the built-in takes interleaved 32-token strips across all 96 columns instead)."""
    tile0 = split_tiles(torch.arange(64 * 96.0).view(1, -1, 1), 64, 96, 2, 2)[0, :, 0].long()
    assert set((tile0 // 96).tolist()) == set(range(32)) and set((tile0 % 96).tolist()) == set(range(48))


def test_layer_grid():
    assert layer_grid(64 * 96, 64, 96) == (64, 96)
    assert layer_grid(32 * 48, 64, 96) == (32, 48)
    assert layer_grid(17 * 24, 33, 47) == (17, 24)  # ceil at each stride-2 level
    assert layer_grid(24 * 36, 64, 96) == (24, 36)  # a Deep-Shrink-like resize by 8/3
    assert layer_grid(1000, 64, 96) is None  # e.g. tokens merged by ToMe: no grid, left whole


def test_tiled_sdpa_equals_block_diagonal_attention():
    unet = build_unet("sd15", "tiny", seed=3)
    attn = unet.input_blocks[1][1].transformer_blocks[0].attn1
    h, w, nh, nw = 12, 20, 3, 4
    x = torch.randn(2, h * w, attn.to_q.in_features)
    with sdpa_attention():
        tiled = merge_tiles(attn(split_tiles(x, h, w, nh, nw)), h, w, nh, nw)
        full = attn(x)
    expected = masked_attention(attn, x, tile_ids(h, w, nh, nw))
    torch.testing.assert_close(tiled, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tiled, full, atol=1e-3)


# --- depth tables ---------------------------------------------------------------------------

def _names(layers):
    table = {}
    for layer, depth in layers:
        table.setdefault(depth, []).append(layer.name)
    return {d: sorted(n) for d, n in table.items()}


def _tb(blocks, indices, attn="attn1"):
    return sorted(f"{b}.1.transformer_blocks.{i}.{attn}" for b in blocks for i in indices)


def test_sd1_sd2_depth_table_matches_the_builtin():
    expected = {
        0: _tb(["input_blocks.1", "input_blocks.2", "output_blocks.9", "output_blocks.10", "output_blocks.11"], [0]),
        1: _tb(["input_blocks.4", "input_blocks.5", "output_blocks.6", "output_blocks.7", "output_blocks.8"], [0]),
        2: _tb(["input_blocks.7", "input_blocks.8", "output_blocks.3", "output_blocks.4", "output_blocks.5"], [0]),
        3: _tb(["middle_block"], [0]),
    }
    for arch in ("sd15", "sd21"):
        umap = map_unet(build_unet(arch, "tiny"))
        assert _names(depth_layers(umap)) == expected
        assert _names(depth_layers(umap, 1)) == {d: expected[d] for d in (0, 1)}


def test_sdxl_depth_table_matches_the_builtin():
    """With SDXL's real transformer depths (2 at /2, 10 at /4) on tiny channels."""
    unet = build_unet("sdxl", "tiny")
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for m in block.modules():
            if type(m).__name__ == "SpatialTransformer":
                set_transformer_depth(m, 2 if m.in_channels == 2 * unet.model_channels else 10)
    umap = map_unet(unet)
    half = ["input_blocks.4", "input_blocks.5", "output_blocks.3", "output_blocks.4", "output_blocks.5"]
    quarter = ["input_blocks.7", "input_blocks.8", "output_blocks.0", "output_blocks.1", "output_blocks.2"]
    expected = {
        0: _tb(half, [0]),
        1: sorted(_tb(half, [1]) + _tb(quarter, range(10))),
        2: _tb(["middle_block"], range(10)),
    }
    assert _names(depth_layers(umap)) == expected


# --- the technique on real UNets ------------------------------------------------------------

# (arch, latent h, w, tile_size, tile counts at depth 0 with swap 1; deeper depths stay whole)
CASES = [("sd15", 32, 48, 128, (2, 3)), ("sd21", 36, 52, 256, (2, 2)), ("sdxl", 64, 96, 128, (2, 3))]


@pytest.mark.parametrize("arch, h, w, tile, counts", CASES)
def test_unet_output_equals_block_diagonal_attention(arch, h, w, tile, counts, make_inputs):
    """End to end, non-square and odd sizes: the tiled UNet equals the UNet whose depth-0 attn1
    layers use a block-diagonal tile mask on the true (rows, cols) grid."""
    unet = build_unet(arch, "tiny", seed=2)
    inputs = make_inputs(unet, batch=2, height=h, width=w)
    with sdpa_attention(), webui_cat_fix():
        plain = unet(**inputs)
        out, messages = run(unet, inputs, f"hypertile swap_size=1 tile_size={tile}")
        patcher = Patcher(unet)
        for layer, depth in depth_layers(map_unet(unet)):
            if depth == 0:
                lh, lw = -(-h // 2 ** layer.level), -(-w // 2 ** layer.level)
                ids = tile_ids(lh, lw, *counts)
                patcher.set_attr(layer.module, "forward", lambda x, context=None, a=layer.module, ids=ids: masked_attention(a, x, ids))
        expected = unet(**inputs)
        patcher.restore()
    assert messages == []
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, plain, atol=1e-3)


def set_host_kernel(monkeypatch) -> list[tuple[int, int]]:
    """A class-level attention kernel, as a host sets one; returns the (batch, tokens) it sees."""
    from ldm.modules.attention import CrossAttention

    shapes = []
    original = CrossAttention.forward

    def host_kernel(self, x, context=None, mask=None):
        shapes.append(tuple(x.shape[:2]))
        return original(self, x, context, mask)

    monkeypatch.setattr(CrossAttention, "forward", host_kernel)
    return shapes


def test_host_attention_kernel_runs_on_the_tiles(make_inputs, monkeypatch):
    """The wrapper calls the attention module's own forward (a class-level kernel the host set)."""
    unet = build_unet("sd15", "tiny")
    inputs = make_inputs(unet, batch=2, height=32, width=48)
    shapes = set_host_kernel(monkeypatch)
    run(unet, inputs, "hypertile swap_size=1")
    assert (2 * 6, 16 * 16) in shapes  # depth 0: 2x3 tiles of 16x16 tokens, in the batch
    assert (2, 16 * 24) in shapes  # depth 1 whole


def test_kernel_set_after_apply_runs_on_the_tiles(make_inputs, monkeypatch):
    """The wrapper looks the class's forward up per call (patcher.current_forward): a kernel the
    host sets after HyperTile is applied (a change of cross-attention optimization) still runs."""
    unet = build_unet("sd15", "tiny")
    inputs = make_inputs(unet, batch=2, height=32, width=48)
    clock = StepClock()
    clock.start(1)
    applied = apply_mods(unet, Settings.from_text("hypertile swap_size=1", strict=True), clock)
    shapes = set_host_kernel(monkeypatch)
    try:
        unet(**inputs)
    finally:
        applied.restore()
    assert (2 * 6, 16 * 16) in shapes  # depth 0: 2x3 tiles of 16x16 tokens, in the batch


def test_no_split_is_bit_identical_and_restore_is_exact(tiny_unet, make_inputs):
    """Latent 16x24: the minimum tile (128 px = 16 tokens) allows one tile per side everywhere."""
    inputs = make_inputs(tiny_unet, batch=2, height=16, width=24)
    before = snapshot(tiny_unet)
    plain = tiny_unet(**inputs)
    out, _ = run(tiny_unet, inputs, "hypertile swap_size=8 tile_size=512")
    assert torch.equal(out, plain)
    assert_restored(tiny_unet, before)


def test_restore_after_tiling_is_bit_identical(make_inputs):
    unet = build_unet("sd15", "tiny")
    inputs = make_inputs(unet, batch=2, height=32, width=48)
    before = snapshot(unet)
    plain = unet(**inputs)
    tiled, _ = run(unet, inputs, "hypertile")
    assert not torch.equal(tiled, plain)
    assert_restored(unet, before)
    assert torch.equal(unet(**inputs), plain)


def test_same_seed_same_tiles_and_global_rng_untouched(make_inputs):
    unet = build_unet("sd15", "tiny")
    inputs = make_inputs(unet, batch=2, height=32, width=32)
    states = random.getstate(), torch.random.get_rng_state()
    outs = [run(unet, inputs, "hypertile swap_size=2 tile_size=128", seed=s)[0] for s in (7, 7, 8)]
    assert random.getstate() == states[0] and torch.equal(torch.random.get_rng_state(), states[1])
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_passes(make_inputs):
    unet = build_unet("sd15", "tiny")
    inputs = make_inputs(unet, batch=2, height=32, width=48)
    plain = unet(**inputs)
    assert torch.equal(run(unet, inputs, "hypertile hires=false", hires=True)[0], plain)
    assert torch.equal(run(unet, inputs, "hypertile first_pass=false")[0], plain)
    assert not torch.equal(run(unet, inputs, "hypertile first_pass=false", hires=True)[0], plain)
    assert not torch.equal(run(unet, inputs, "hypertile max_depth=0")[0], plain)


def test_no_grid_or_cross_attention_falls_back_untiled(make_inputs):
    unet = build_unet("sd15", "tiny")
    attn = unet.input_blocks[1][1].transformer_blocks[0].attn1
    inputs = make_inputs(unet, batch=2, height=32, width=48)
    clock = StepClock()
    clock.start(1)
    applied = apply_mods(unet, Settings.from_text("hypertile swap_size=1", strict=True), clock)
    unet(**inputs)  # the pre-hook now knows the latent size
    merged = torch.randn(2, 1000, attn.to_q.in_features)  # e.g. tokens merged by ToMe
    assert torch.equal(attn(merged), type(attn).forward(attn, merged))
    grid = torch.randn(2, 32 * 48, attn.to_q.in_features)
    assert not torch.equal(attn(grid), type(attn).forward(attn, grid))
    context = torch.randn(2, 7, attn.to_k.in_features)
    assert torch.equal(attn(grid, context=context), type(attn).forward(attn, grid, context=context))
    applied.restore()


def test_bad_values_are_reported():
    with pytest.raises(SettingsError, match="hypertile.max_depth"):
        Settings.from_text("hypertile max_depth=4", strict=True)
    with pytest.raises(SettingsError, match="hypertile.tile_size"):
        Settings.from_text("hypertile tile_size=600", strict=True)


# --- composition with ToMe ----------------------------------------------------------------------

@pytest.mark.parametrize("arch, tome, hypertile, merges_attn", [
    ("sd15", "", "", False),
    ("sd15", "max_downsample=8 merge_mlp=true", "max_depth=0", False),
    ("sd21", "", "max_depth=0 first_pass=false", False),
    ("sdxl", "", "", False),  # auto = /2, where SDXL's depth-0 layers are
    ("sdxl", "max_downsample=1", "", True),  # /1 has no attention in SDXL: no overlap
    ("sd15", "", "first_pass=false hires=false", True),  # HyperTile does nothing
    ("sd15", "merge_attn=false merge_crossattn=true", "", False),  # no attn1 merge to begin with
])
def test_tome_hypertile_rule(arch, tome, hypertile, merges_attn):
    umap = map_unet(build_unet(arch, "tiny"))
    settings = Settings.from_text(f"tome {tome}; hypertile {hypertile}", strict=True)
    resolved, notes = resolve_conflicts(settings, umap)
    assert resolved["tome"]["merge_attn"] is merges_attn
    assert bool(notes) == (settings["tome"]["merge_attn"] and not merges_attn)
    assert resolved["hypertile"] == settings["hypertile"]
    for key in ("ratio", "max_downsample", "merge_crossattn", "merge_mlp"):
        assert resolved["tome"][key] == settings["tome"][key]
    if notes:
        assert "merge_attn" in notes[0]


def test_hypertile_yields_to_another_extensions_attn1_patch_and_says_so(make_unet, make_inputs):
    """Forge's attn1_patch (backend/nn/unet.py BasicTransformerBlock) gives self-attention a context;
    HyperTile then leaves the layer to it, and after the pass says it tiled nothing."""
    from lib_unetmods import Settings, StepClock, apply_mods

    unet = make_unet("sd15")
    inputs = make_inputs(unet, batch=2, height=32, width=32)
    with attn1_patch_of_another_extension(unet):
        expected = unet(**inputs)
        clock = StepClock()
        clock.start(1)
        applied = apply_mods(unet, Settings.from_text("hypertile tile_size=128 swap_size=1"), clock, latent_shape=(2, 4, 32, 32))
        assert applied.applied == ["hypertile"]
        got = unet(**inputs)
        idle = applied.idle_after_pass()
        applied.restore()
    assert torch.equal(got, expected)
    assert "HyperTile yields" in idle["hypertile"] and idle["hypertile"].endswith("nothing to do")
