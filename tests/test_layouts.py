"""Which row is which, in every call layout A1111 makes (the stand-in's CFGDenoiser calls as the real
one does: lib_unetmods/lab/hosts/webui): Settings > "Batch cond/uncond" on and off, AND parts whose
count and weight differ per image, prompt and negative prompt of different token counts (padded or
not), uncond rows dropped by "Negative Guidance minimum sigma" and by early-CFG skipping, an edit
model's three row groups, the hires pass, a second-order sampler and sd-webui-controlnet's forward.

Through the script, PAG, CD Tuner's colour map and ScaleCrafter's noise-damped CFG equal a direct
reference sampler written here (every prediction in its own UNet call, combined as A1111 combines
them) to 1e-4, and give the same image with batch cond/uncond on and off (1e-5). Below: the row
description itself (a1111_call, forge_call, rows.ResultShift) against the hosts' combines, and what
Forge's cfg_denoiser callback announces."""
from types import SimpleNamespace

import pytest
import torch

from lib_unetmods import Settings, StepClock, a1111_call, apply_mods, forge_call
from lib_unetmods.lab.hosts.controlnet import ControlNetHook
from lib_unetmods.lab.model_state import assert_restored, snapshot
from lib_unetmods.lab.random_unets import build_unet
from lib_unetmods.lab.sampler import sd_sigmas, sigma_to_t
from lib_unetmods.rows import COND, IMAGE, UNCOND, ResultShift
from lib_unetmods.techniques import cdtuner
from tiny_unet_calls import perturbed, rel, unet_of
from webui_run import args_for, clean_state, make_runner, script_module, txt2img  # noqa: F401

from modules import processing  # noqa: E402
from modules.shared import opts  # noqa: E402
from sd_model import FakeSDModel  # noqa: E402

STEPS, WIDTH, HEIGHT = 3, 128, 96  # latent 12x16: the middle block attends over 2x2 tokens
SC = "scalecrafter level1=2 level2=2 stop=1"
TECHNIQUES = {
    "pag": "pag scale=3",
    "colour_map": "cdtuner cm_colors=5,-5,-5|0,0,5 cm_ratios=1,1 cm_stop=2",
    "ndcfg": f"{SC} ndcfg=on ndcfg_stop=1",
}
TWO_ANDS = [[1.0, 0.5], [0.8]]  # image 0: two AND parts, image 1: one
# layout: (processing arguments, WebUI settings); the "_split" twin has batch cond/uncond off
LAYOUTS = {
    "batched": (dict(batch_size=2), {}),
    "and": (dict(batch_size=2, prompt_weights=TWO_ANDS), {}),
    "lengths": (dict(batch_size=2, prompt_weights=TWO_ANDS, uncond_tokens=14), {}),
    "padded": (dict(batch_size=2, uncond_tokens=14), {"pad_cond_uncond": True}),
    "ngms": (dict(batch_size=2, prompt_weights=TWO_ANDS, s_min_uncond=100.0), {}),
    "ngms_all_and": (dict(batch_size=1, prompt_weights=[[1.0, 1.0]], s_min_uncond=100.0), {"s_min_uncond_all": True}),
    "early": (dict(batch_size=2, prompt_weights=TWO_ANDS), {"skip_early_cond": 0.5}),
    "edit": (dict(batch_size=2, image_cfg_scale=1.5), {}),
}
LAYOUTS.update({f"{name}_split": (kw, {**o, "batch_cond_uncond": False}) for name, (kw, o) in list(LAYOUTS.items())})


EDIT_UNET = build_unet("sd15", "tiny", seed=1, in_channels=8)  # instruct-pix2pix: x and the image latent
SNAPSHOTS = [(unet, snapshot(unet)) for unet in (unet_of("sd15"), EDIT_UNET)]


@pytest.fixture(autouse=True)
def models_restored():
    yield
    for unet, before in SNAPSHOTS:
        assert_restored(unet, before)


def processing_for(script_module, layout, text, **extra):
    kw, settings = LAYOUTS[layout]
    vars(opts).update(settings)
    runner = make_runner(script_module, img2img=layout.startswith("edit"))[0]
    mods = Settings.from_text(text, strict=True) if text else Settings()
    common = dict(steps=STEPS, width=WIDTH, height=HEIGHT, seed=3, **kw, **extra)
    if not layout.startswith("edit"):
        return txt2img(unet_of("sd15"), runner, mods, **common)
    init = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(9))
    return processing.StableDiffusionProcessingImg2Img(FakeSDModel(EDIT_UNET, edit=True), runner, args_for(mods),
                                                       init_latent=init, denoising_strength=0.75, **common)


def ours(script_module, layout, text, **extra):
    p = processing_for(script_module, layout, text, **extra)
    return processing.process_images(p).images[0], p


# --- the reference: each prediction in its own UNet call, A1111's combine written out --------------

def skips_uncond(p, evaluation, total, sigma, edit):
    """A1111 1.10 CFGDenoiser.forward: the evaluations whose uncond rows it drops."""
    if opts.skip_early_cond and evaluation / total <= opts.skip_early_cond:
        return True
    return bool((evaluation % 2 or opts.s_min_uncond_all) and p.s_min_uncond > 0 and sigma < p.s_min_uncond and not edit)


def row_of(cond, i):
    return {k: v[i] for k, v in cond.items()} if isinstance(cond, dict) else cond[i]


@torch.no_grad()
def reference(script_module, layout, technique):
    """The first image batch of the layout, sampled with every row of every evaluation predicted
    alone: cond rows (one per AND part), uncond rows (an edit model: image and uncond groups), PAG's
    perturbed cond rows, NDCFG's undilated uncond rows; the colour map pushes every stacked row first."""
    p = processing_for(script_module, layout, "")
    model, edit = p.sd_model, layout.startswith("edit")
    unet = model.model.diffusion_model
    c, uc = p.conds()
    if opts.pad_cond_uncond:  # the prompts as the host pads them (with the empty prompt's tokens)
        longest = max(processing.tokens(uc), 7)
        uc = processing.pad_to(uc, longest)
        for parts in c.batch:
            for part in parts:
                part.cond = processing.pad_to(processing.prompt_parser.stack([part.cond]), longest)[0]
    p.seeds = [p.seed + i for i in range(p.batch_size)]
    h, w = HEIGHT // 8, WIDTH // 8
    if edit:
        steps = processing.img2img_steps(p)
        sigmas = sd_sigmas(p.steps)[-(steps + 1):]
        image = p.init_latent.expand(p.batch_size, -1, -1, -1)
        x = image + p.noise(h, w) * sigmas[0]
    else:
        sigmas = sd_sigmas(p.steps)
        image = torch.zeros(p.batch_size, 5, 1, 1)
        x = p.noise(h, w) * sigmas[0]
    total = len(sigmas) - 1
    values = Settings.from_text(TECHNIQUES[technique], strict=True)["cdtuner"] if technique == "colour_map" else None
    for i in range(total):
        s = float(sigmas[i])
        rows = [(COND, j, part.weight, part.cond, image[j]) for j, parts in enumerate(c.batch) for part in parts]
        groups = [(IMAGE, image), (UNCOND, torch.zeros_like(image))] if edit else [(UNCOND, image)]
        rows += [(kind, j, 1.0, row_of(uc, j), ic[j]) for kind, ic in groups for j in range(p.batch_size)]
        xs = x[[r[1] for r in rows]]
        if technique == "colour_map" and i < values["cm_stop"]:
            vectors = [cdtuner.colour_vector(col, "sd1") for col in cdtuner.parse_colours(values["cm_colors"])]
            boxes = cdtuner.region_boxes(h, w, cdtuner.parse_cells(values["cm_ratios"]), values["cm_mode"])
            ratios = [cdtuner.colour_map_ratio(v, i, values["cm_strength"], values["cm_stop"], False) for v in vectors]
            xs = cdtuner.colour_map_push(xs, [r[0] == UNCOND for r in rows], boxes, vectors, ratios)

        def denoise(r):
            cond = rows[r][3]
            cond = {k: v[None] for k, v in cond.items()} if isinstance(cond, dict) else cond[None]
            t = torch.tensor([sigma_to_t(s)])
            eps = model.apply_model(xs[r:r + 1] / (s ** 2 + 1) ** 0.5, t, {"c_crossattn": cond, "c_concat": rows[r][4][None]})
            return xs[r] - s * eps[0]

        skip = skips_uncond(p, i, total, s, edit)
        clock = StepClock()
        clock.start(total)
        clock.begin_step(i)
        dilation = apply_mods(unet, Settings.from_text(SC, strict=True), clock) if technique == "ndcfg" else None
        try:
            out = [None if skip and kind == UNCOND else denoise(r) for r, (kind, *_) in enumerate(rows)]
        finally:
            if dilation is not None:
                dilation.restore()
        denoised = []
        for j in range(p.batch_size):
            conds = [(r, rows[r][2]) for r in range(len(rows)) if rows[r][:2] == (COND, j)]
            u = next(r for r in range(len(rows)) if rows[r][:2] == (UNCOND, j))
            if edit:
                ic = next(r for r in range(len(rows)) if rows[r][:2] == (IMAGE, j))
                result = out[u] + p.cfg_scale * (out[conds[0][0]] - out[ic]) + p.image_cfg_scale * (out[ic] - out[u])
            elif skip:  # the first cond row stands in for the uncond, at scale 1
                first = out[conds[0][0]]
                result = first + sum(wt * (out[r] - first) for r, wt in conds)
            else:
                uncond = denoise(u) if technique == "ndcfg" else out[u]  # NDCFG: the undilated uncond
                result = uncond + sum(p.cfg_scale * wt * (out[r] - out[u]) for r, wt in conds)
            if technique == "pag":
                total_weight = sum(wt for _, wt in conds)
                with perturbed(unet, [unet.middle_block]):
                    result = result + sum(3.0 * wt / total_weight * (out[r] - denoise(r)) for r, wt in conds)
            denoised.append(result)
        x = x + (x - torch.stack(denoised)) / s * (float(sigmas[i + 1]) - s)
    return x


@pytest.mark.parametrize("technique", list(TECHNIQUES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_equals_the_reference_in_every_layout(script_module, layout, technique):
    image, p = ours(script_module, layout, TECHNIQUES[technique])
    expected = reference(script_module, layout, technique)
    assert rel(image, expected) < 1e-4, (rel(image, expected), p.extra_generation_params.get("UNetMods messages"))
    params = p.extra_generation_params
    if technique == "ndcfg" and layout.startswith("edit"):  # an edit model guides with image rows too
        assert "NDCFG needs the cond and uncond rows" in params["UNetMods messages"]
    else:
        assert "UNetMods messages" not in params, params["UNetMods messages"]


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_technique_acts_against_the_reference(script_module, technique):
    plain = ours(script_module, "and", SC if technique == "ndcfg" else "")[0]
    assert rel(reference(script_module, "and", technique), plain) > 1e-3


@pytest.mark.parametrize("technique", list(TECHNIQUES))
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if not name.endswith("_split")])
def test_split_equals_batched(script_module, layout, technique):
    batched, _ = ours(script_module, layout, TECHNIQUES[technique])
    split, _ = ours(script_module, f"{layout}_split", TECHNIQUES[technique])
    assert rel(split, batched) < 1e-5


@pytest.mark.parametrize("extra", [dict(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2), dict(second_order=True)])
def test_split_equals_batched_in_the_hires_pass_and_with_a_second_order_sampler(script_module, extra):
    text = "; ".join(TECHNIQUES.values())
    (batched, p), (split, q) = ours(script_module, "and", text, **extra), ours(script_module, "and_split", text, **extra)
    assert rel(split, batched) < 1e-5 and p.extra_generation_params == q.extra_generation_params


@pytest.mark.parametrize("technique", ["pag", "colour_map"])
def test_split_equals_batched_under_controlnets_forward(script_module, technique):
    """sd-webui-controlnet replaces the UNet's forward and adds its residuals in every call: the rows
    stay what A1111's CFG denoiser made them."""
    unit = ControlNetHook(unet_of("sd15"), scale=0.5)
    unit.hook()
    try:
        batched, _ = ours(script_module, "and", TECHNIQUES[technique])
        split, p = ours(script_module, "and_split", TECHNIQUES[technique])
        plain, _ = ours(script_module, "and", "")
    finally:
        unit.restore()
        del unet_of("sd15").forward  # ControlNet's leftover bound forward
    assert rel(split, batched) < 1e-5 and rel(batched, plain) > 1e-3 and "UNetMods messages" not in p.extra_generation_params


def test_ndcfg_at_cfg_1_with_split_calls_leaves_the_evaluation_alone(script_module):
    """At CFG 1 an image's uncond row carries nothing into its result, and with split calls its cond
    row ran before the milder uncond was known: NDCFG says so and changes nothing, in no later evaluation
    either (each change stays in its evaluation)."""
    image, p = ours(script_module, "batched_split", TECHNIQUES["ndcfg"], cfg_scale=1.0)
    plain, _ = ours(script_module, "batched_split", SC, cfg_scale=1.0)
    assert torch.equal(image, plain) and "gave no weight to an image's uncond row" in p.extra_generation_params["UNetMods messages"]


# --- the row description against the hosts' combines -----------------------------------------

def a1111_combine(out, parts, cfg, skip=False):
    """A1111's combine_denoised on the stacked outputs (cond rows image by image, then the uncond rows)."""
    images, result, row = len(parts), [], 0
    for j, weights in enumerate(parts):
        conds = out[row:row + len(weights)]
        row += len(weights)
        u = conds[0] if skip else out[sum(map(len, parts)) + j]
        result.append(u + sum((1.0 if skip else cfg) * wt * (cc - u) for wt, cc in zip(weights, conds)))
    return torch.stack(result[:images])


def forge_combine(out, weights, images, cfg):
    """Forge's: the chunks popped uncond first, the parts last to first; conds averaged by weight,
    CFG scaled by the weights' sum (0 uncond at CFG 1)."""
    n = len(weights)
    dropped = abs(cfg - 1.0) < 1e-9
    u = torch.zeros_like(out[:images]) if dropped else out[:images]
    chunks = out[0 if dropped else images:].view(n, images, *out.shape[1:]).flip(0)  # part 0 first
    mean = sum(wt * chunks[k] for k, wt in enumerate(weights)) / sum(weights)
    return u + (mean - u) * cfg * sum(weights)


PARTS = [[1.0, 1.0], [0.7], [1.0, 0.5, 0.25]]
CASES = {  # parts, layout
    "batched": (PARTS, a1111_call.Layout()),
    "split": (PARTS, a1111_call.Layout(batch_cond_uncond=False)),
    "lengths": (PARTS, a1111_call.Layout(equal_lengths=False)),
    "lengths_split": (PARTS, a1111_call.Layout(False, equal_lengths=False)),
    "skip": (PARTS, a1111_call.Layout(skip_uncond=True)),
    "skip_split": (PARTS, a1111_call.Layout(False, skip_uncond=True)),
    "skip_alone": ([[1.0, 1.0]], a1111_call.Layout(False, skip_uncond=True)),  # a first call whose row carries nothing
    "edit_split": ([[1.0]] * 3, a1111_call.Layout(False, edit=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_change_reaches_each_image_through_a1111s_combine(case):
    """Changes d_j placed by ResultShift through the calls of every split A1111 makes, each arriving
    with the image's first row: the combine of the shifted rows is the combine of the plain rows plus
    d_j, also where the first call holds only cond rows or a row that carries nothing (A1111's fake
    uncond at two equal AND weights)."""
    parts, layout = CASES[case]
    cfg, images = 6.0, len(parts)
    ev = a1111_call.evaluation(parts, cfg, layout=layout, image_cfg_scale=1.5)
    out, change = torch.randn(len(ev.run), 5), torch.randn(images, 5)
    shift, placed, taken = ResultShift(), torch.zeros_like(out), 0
    for size in ev.calls:
        rows = ev.take(size)
        shift.begin(rows)
        for j in sorted(set(rows.images) - {r.image for r in ev.rows[:taken]}):
            shift.add(j, change[j])
        add = shift.place(rows, out[taken:taken + size])
        placed[taken:taken + size] += 0 if add is None else add
        taken += size
    assert ev.taken == len(ev.run) and not ev.broken and not shift.due
    if layout.edit:
        n = images
        combine = lambda o: o[2 * n:] + cfg * (o[:n] - o[n:2 * n]) + 1.5 * (o[n:2 * n] - o[2 * n:])  # noqa: E731
    else:
        combine = lambda o: a1111_combine(o, parts, cfg, layout.skip_uncond)  # noqa: E731
    torch.testing.assert_close(combine(out + placed), combine(out) + change)


@pytest.mark.parametrize("cfg", [7.0, 1.0])
@pytest.mark.parametrize("per_call", [False, True])
def test_the_change_reaches_each_image_through_forges_combine(cfg, per_call):
    """Forge's chunks, in one call or one call each (the uncond chunk first, without it at CFG 1),
    the change arriving with the first cond chunk."""
    weights, images = [1.0, 0.5], 2
    ev = forge_call.evaluation([[0.3, 0.2], weights], cfg)  # Forge keeps the last image's weights
    assert [r.kind for r in ev.rows] == ([] if cfg == 1 else [UNCOND] * 2) + [COND] * 4
    assert [r.part for r in ev.rows if r.kind == COND] == [1, 1, 0, 0]
    out, change = torch.randn(len(ev.rows), 3), torch.randn(images, 3)
    shift, placed, taken, added = ResultShift(), torch.zeros_like(out), 0, False
    for size in [images] * (len(ev.rows) // images) if per_call else [len(ev.rows)]:
        rows = ev.take(size, [r.kind for r in ev.rows[taken:taken + size]])
        shift.begin(rows)
        if not added and rows.of(COND):
            added = [shift.add(j, change[j]) for j in range(images)]
        add = shift.place(rows, out[taken:taken + size])
        placed[taken:taken + size] += 0 if add is None else add
        taken += size
    torch.testing.assert_close(forge_combine(out + placed, weights, images, cfg), forge_combine(out, weights, images, cfg) + change)
    assert forge_call.evaluation([[1.0]], 7.0).take(2, [COND, UNCOND]) is None  # chunks the call does not say it has


def test_a1111_evaluations_describe_each_layout():
    parts = [[1.0, 0.5], [0.8]]
    batched = a1111_call.evaluation(parts, 7.0)
    assert [(r.kind, r.image, r.part) for r in batched.rows] == [(COND, 0, 0), (COND, 0, 1), (COND, 1, 0), (UNCOND, 0, 0),
                                                                    (UNCOND, 1, 0)]
    assert batched.calls == [5] and [r.coef for r in batched.rows] == pytest.approx([7.0, 3.5, 5.6, 1 - 7 * 1.5, 1 - 7 * 0.8])
    split = a1111_call.Layout(batch_cond_uncond=False)
    assert a1111_call.evaluation(parts, 7.0, layout=split).calls == [2, 2, 1]
    assert a1111_call.evaluation(parts, 7.0, layout=a1111_call.Layout(equal_lengths=False)).calls == [3, 2]
    assert a1111_call.evaluation(parts, 7.0, layout=a1111_call.Layout(False, equal_lengths=False)).calls == [2, 1, 2]
    skip = a1111_call.evaluation(parts, 7.0, layout=a1111_call.Layout(skip_uncond=True))
    assert skip.calls == [3] and [r.dropped for r in skip.rows] == [False] * 3 + [True] * 2
    assert [r.coef for r in skip.rows[:3]] == [1 - 1.5 + 1.0, 0.5, 1.0]
    edit = a1111_call.evaluation([[1.0]] * 2, 7.0, layout=a1111_call.Layout(edit=True), image_cfg_scale=1.5)
    assert [r.kind for r in edit.rows] == [COND, COND, IMAGE, IMAGE, UNCOND, UNCOND] and edit.calls == [6]
    assert a1111_call.evaluation(parts, 7.0, layout=a1111_call.Layout(edit=True)) is None  # A1111 refuses AND there
    taken = a1111_call.evaluation(parts, 7.0, layout=split)
    assert taken.take(3) is None and taken.take(2) is None  # a call that does not fit: the rest is unknown


def test_forge_announces_what_its_cfg_denoiser_will_run():
    """forge_call.evaluation_from on Forge's cfg_denoiser params: the hires pass's own CFG scale, the
    uncond chunk gone on NGMS steps (Forge guides at scale 1 there), the parts of the image with the
    fewest, weighted as the last image's."""
    weights = [[1.0, 0.5, 0.2], [0.8, 0.4]]
    batch = [[SimpleNamespace(weight=w) for w in ws] for ws in weights]

    def params(hires, sigma, step):
        extra = {"cond": SimpleNamespace(batch=batch), "cond_scale": 7.0, "s_min_uncond": 2.0}
        denoiser = SimpleNamespace(sampler=SimpleNamespace(sampler_extra_args=extra), step=step, total_steps=4,
                                   p=SimpleNamespace(is_hr_pass=hires, hr_cfg=3.0))
        return SimpleNamespace(denoiser=denoiser, x=torch.zeros(2, 4, 8, 8), sigma=torch.full((2,), sigma), text_uncond=object())

    o = SimpleNamespace(skip_early_cond=0.0, s_min_uncond_all=False)
    ev = forge_call.evaluation_from(params(True, 5.0, 1), o)
    assert [(r.kind, r.part, r.weight) for r in ev.rows[::2]] == [(UNCOND, 0, 1.0), (COND, 1, 0.4), (COND, 0, 0.8)]
    assert [r.coef for r in ev.rows[::2]] == pytest.approx([1 - 3.0 * 1.2, 3.0 * 0.4, 3.0 * 0.8])
    ngms = forge_call.evaluation_from(params(False, 1.0, 1), o)
    assert [r.kind for r in ngms.rows] == [COND] * 4 and [r.coef for r in ngms.rows[::2]] == pytest.approx([0.4, 0.8])


def test_a1111_skips_as_its_cfg_denoiser():
    class Opts:
        skip_early_cond, s_min_uncond_all = 0.0, False

    o = Opts()
    assert [a1111_call.skips_uncond(i, 4, 1.0, 2.0, o, False) for i in range(4)] == [False, True, False, True]
    assert not a1111_call.skips_uncond(1, 4, 3.0, 2.0, o, False) and not a1111_call.skips_uncond(1, 4, 1.0, 2.0, o, True)
    o.s_min_uncond_all = True
    assert all(a1111_call.skips_uncond(i, 4, 1.0, 2.0, o, False) for i in range(4))
    o.skip_early_cond, o.s_min_uncond_all = 0.5, False
    assert [a1111_call.skips_uncond(i, 4, 9.0, 0.0, o, False) for i in range(4)] == [True, True, True, False]
