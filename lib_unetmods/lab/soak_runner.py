"""The soak: randomized generations through the WebUI stand-in (lab/hosts/webui) on the tiny real
UNets of every family, checking after each one that every model is exactly as it was built and
that the outcome is an image or a declared message.

A case is drawn from the declarations (lib_unetmods.techniques.SPECS), never from a hand list
of values: a random subset of techniques, each parameter left at its default / recommended
value or drawn inside its declared range, often exactly at an edge. Around that: odd latent
sides, batch sizes 1-3, batch count 1-2, hires on/off, img2img, a second-order sampler, Forge's
double hires call, settings from the UI, the API dict or XYZ cells, ldm or SDPA attention, a
VAE decoder, the WebUI's own token merging, A1111's call layouts (batch cond/uncond off, AND
parts per image, a longer negative prompt, NGMS dropping uncond rows), model switches, and
interrupts, skips and exceptions injected inside the UNet mid-sampling.

Case `i` of seed `S` is drawn from its own RNG, so `--seed S --start i --runs 1` replays it
(with freshly built models). Used by `python -m lib_unetmods.soak` and tests/test_soak.py.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

try:  # Python 3.11+
    import re._parser as sre_parse
    from re._constants import ANY, BRANCH, CATEGORY, CATEGORY_DIGIT, IN, LITERAL, MAX_REPEAT, MIN_REPEAT, RANGE, SUBPATTERN
except ImportError:  # pragma: no cover - older Pythons
    import sre_parse  # type: ignore[no-redef]
    from sre_constants import ANY, BRANCH, CATEGORY, CATEGORY_DIGIT, IN, LITERAL, MAX_REPEAT, MIN_REPEAT, RANGE, SUBPATTERN  # type: ignore

import torch

from . import CHECKOUT
from .hosts import use_webui_standin

use_webui_standin()

from modules import infotext_utils, processing, script_callbacks, scripts  # noqa: E402
from modules.shared import opts, state  # noqa: E402
from sd_model import FakeSDModel  # noqa: E402

from ..host import LOG_PREFIX, STATE_ATTR  # noqa: E402
from ..params import Param  # noqa: E402
from ..patcher import ACTIVE, restore_all  # noqa: E402
from ..settings import Settings  # noqa: E402
from ..techniques import SPECS  # noqa: E402
from ..xyz import axis_specs, overrides  # noqa: E402
from .model_state import assert_restored, snapshot  # noqa: E402
from .random_unets import ARCHS, build_unet, randomize, sdpa_attention  # noqa: E402

FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
# Latent sides (pixels / 8). Odd and even, tiny and lopsided: 520x776 and 72x1096 keep their
# odd latent sides (65x97 -> 17x25 scaled to the tiny UNets' budget, 9x137 -> 9x35).
LATENT_SIDES = (3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 25)
NAMED_SIZES = ((17, 25), (9, 35), (25, 17), (35, 9))
MAX_LATENT_PIXELS = 25 * 25  # keeps a run around a second on a shared CPU core
# Above the family's native size (where ScaleCrafter and RAU-Net act by default): 776x520 for SD1,
# 1032x1032 for SDXL; a few seconds per UNet call, so rare, small and short (--no-large skips them).
LARGE_SIZES = {"sd15": (65, 97), "sdxl": (129, 129)}


class SoakModel(FakeSDModel):
    """The stand-in model, with a real VAE decoder when the case asks for one (CD-Tuner's
    saturation hooks it; the host restores after decoding)."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module | None, is_sdxl: bool) -> None:
        super().__init__(unet, is_sdxl=is_sdxl)
        self.first_stage_model = vae

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        if self.first_stage_model is None:
            return z.clone()
        decoder = self.first_stage_model.decoder
        image = decoder(z)
        decoder.__dict__.pop("last_z_shape", None)  # ldm's Decoder records its input shape on itself, not ours to check
        return image


def build_vae(seed: int = 1) -> torch.nn.Module:
    """A tiny ldm first-stage model: the real Decoder (module names as in SD's VAE), 32 channels."""
    from ldm.modules.diffusionmodules.model import Decoder

    with contextlib.redirect_stdout(io.StringIO()):  # ldm prints its configuration
        decoder = Decoder(ch=32, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=1, attn_resolutions=[], in_channels=3,
                          resolution=64, z_channels=4, dropout=0.0)
    vae = torch.nn.Module()
    vae.decoder = decoder
    return randomize(vae, seed).eval().requires_grad_(False)


class InjectedError(RuntimeError):
    """Raised inside the UNet by the soak (stands in for an out-of-memory error)."""


# --- drawing values from the declarations ---------------------------------------------------

def sample_regex(pattern: str, rng: random.Random, max_extra: int = 3) -> str:
    """A random string matching `pattern` (the subset of regex syntax the declarations use:
    literals, classes, ranges, \\d, groups, alternation, repeats)."""

    def emit(items: Any) -> str:
        out = []
        for op, av in items:
            if op is LITERAL:
                out.append(chr(av))
            elif op is IN:
                out.append(pick_in(av))
            elif op is ANY:
                out.append(rng.choice("abc019.,|-"))
            elif op in (MAX_REPEAT, MIN_REPEAT):
                lo, hi, sub = av
                out.extend(emit(sub) for _ in range(rng.randint(lo, min(hi, lo + max_extra))))
            elif op is SUBPATTERN:
                out.append(emit(av[-1]))
            elif op is BRANCH:
                out.append(emit(rng.choice(av[1])))
            elif op is CATEGORY:
                out.append(pick_category(av))
            else:
                raise ValueError(f"sample_regex: {op} in {pattern!r} is not supported")
        return "".join(out)

    def pick_category(category: Any) -> str:
        if category is CATEGORY_DIGIT:
            return str(rng.randint(0, 9))
        raise ValueError(f"sample_regex: {category} in {pattern!r} is not supported")

    def pick_in(items: Any) -> str:
        op, av = rng.choice(items)
        if op is LITERAL:
            return chr(av)
        if op is RANGE:
            return chr(rng.randint(*av))
        if op is CATEGORY:
            return pick_category(av)
        raise ValueError(f"sample_regex: {op} in a class of {pattern!r} is not supported")

    return emit(sre_parse.parse(pattern))


def draw_value(param: Param, rng: random.Random) -> Any:
    """A value the declaration accepts: an edge 40% of the time for numbers, else inside."""
    if param.kind == "bool":
        return rng.random() < 0.5
    if param.kind == "choice":
        return rng.choice(param.choices)
    if param.kind == "text":
        return param.default if rng.random() < 0.3 else param.coerce(sample_regex(param.pattern or ".*", rng))
    lo, hi = param.minimum, param.maximum
    r = rng.random()
    if r < 0.2:
        value = lo
    elif r < 0.4:
        value = hi
    elif param.kind == "int":
        value = rng.randint(int(lo), int(hi))
    elif r < 0.7 and param.step:  # on the slider's grid
        value = lo + param.step * rng.randint(0, int(round((hi - lo) / param.step)))
        value = min(max(round(value, 10), lo), hi)
    else:
        value = rng.uniform(lo, hi)
    return param.coerce(value)


def draw_settings(rng: random.Random, family: str, include: str | None = None) -> Settings:
    """A random subset of techniques (one to all, always with `include`), each from its defaults,
    its recommended values or a preset, with some or all parameters drawn."""
    count = min(len(SPECS), 1 + int(rng.expovariate(0.6)))
    chosen = rng.sample(list(SPECS), count)
    if include is not None and include not in chosen:
        chosen.append(include)
    settings = Settings()
    for tid in chosen:
        spec = SPECS[tid]
        base = rng.random()
        values = spec.recommended_values(family) if base < 0.4 else {**spec.defaults(), "enabled": True}
        if spec.presets and base > 0.85:
            spec.update(values, {"preset": rng.choice(list(spec.presets))}, [])
        mutate = rng.choice((0.0, 0.25, 1.0))
        for param in spec.params[1:]:
            if rng.random() < mutate:
                values[param.name] = draw_value(param, rng)
        settings.values[tid] = values
    return settings


# --- a case ------------------------------------------------------------------------------

@dataclass
class Case:
    index: int
    seed: int
    arch: str
    settings: Settings
    route: str  # "ui" (positional args), "api" (one dict) or "xyz" (UI defaults + an XYZ cell per parameter)
    latent: tuple[int, int]  # (height, width) of the first pass
    batch_size: int
    n_iter: int
    steps: int
    img2img: bool
    strength: float
    fix_steps: bool
    hires: bool
    hr_scale: float
    hr_steps: int
    second_order: bool
    forge: bool
    webui_tome: float
    sdpa: bool  # the WebUI's default attention (torch SDPA) instead of ldm's own
    vae: bool  # the model has a (tiny, real ldm) VAE decoder and decodes with it
    inject: tuple[str, int, str] | None  # (interrupt | skip | raise, at UNet call n, in module)
    # A1111's call layouts: batch cond/uncond, each image's AND weights, the negative prompt's length, NGMS
    batch_cond_uncond: bool = True
    prompt_weights: list[list[float]] | None = None
    uncond_tokens: int = 7
    s_min_uncond: float = 0.0

    def describe(self) -> str:
        h, w = self.latent
        parts = [f"run {self.index} (seed {self.seed})", self.arch, f"{w * 8}x{h * 8}", f"batch {self.batch_size}x{self.n_iter}",
                 f"{self.steps} steps" + (" heun" if self.second_order else "")]
        if self.img2img:
            parts.append(f"img2img strength={self.strength:.2f}" + (" fix_steps" if self.fix_steps else ""))
        if self.hires:
            parts.append(f"hires x{self.hr_scale} {self.hr_steps or self.steps} steps")
        if self.forge:
            parts.append("forge")
        if not self.sdpa:
            parts.append("ldm attention")
        if self.vae:
            parts.append("VAE decode")
        if self.webui_tome:
            parts.append(f"webui token merging {self.webui_tome}")
        if self.inject:
            parts.append(f"{self.inject[0]} at UNet call {self.inject[1]} in {self.inject[2] or 'the UNet'}")
        if not self.batch_cond_uncond:
            parts.append("batch cond/uncond off")
        if self.prompt_weights:
            parts.append(f"AND weights {self.prompt_weights}")
        if self.uncond_tokens != 7:
            parts.append(f"negative prompt of {self.uncond_tokens} tokens")
        if self.s_min_uncond:
            parts.append(f"NGMS {self.s_min_uncond:g}")
        parts.append(f"{self.route}: {self.settings.to_text() or '(all off)'}")
        return ", ".join(parts)


def draw_latent(rng: random.Random) -> tuple[int, int]:
    if rng.random() < 0.25:
        return rng.choice(NAMED_SIZES)
    while True:
        h, w = rng.choice(LATENT_SIDES), rng.choice(LATENT_SIDES)
        if h * w <= MAX_LATENT_PIXELS:
            return h, w


def draw_case(seed: int, index: int, archs: tuple[str, ...] = ARCHS, large: bool = True, include: str | None = None) -> Case:
    """Run `index` of soak `seed`; the same arguments always give the same case."""
    rng = random.Random(f"unetmods-soak-{seed}-{index}")
    arch = rng.choice(archs)
    img2img = rng.random() < 0.25
    hires = not img2img and rng.random() < 0.35
    latent = draw_latent(rng)
    inject = None
    if rng.random() < 0.3:
        kind = rng.choice(("interrupt", "skip", "raise"))
        inject = (kind, rng.randint(1, 6), rng.choice(("", "input_blocks.4", "middle_block", "output_blocks.3", "output_blocks.8")))
    case = Case(
        index=index, seed=seed, arch=arch, settings=draw_settings(rng, FAMILY[arch], include),
        route=rng.choice(("ui", "ui", "api", "xyz")), latent=latent, batch_size=rng.randint(1, 3),
        n_iter=1 if rng.random() < 0.7 else 2, steps=rng.randint(2, 6), img2img=img2img,
        strength=rng.choice((0.0, 1.0, round(rng.uniform(0.05, 1.0), 2))), fix_steps=rng.random() < 0.3,
        hires=hires, hr_scale=rng.choice((1.25, 1.5, 2.0)) if latent[0] * latent[1] <= 13 * 13 else 1.25,
        hr_steps=rng.choice((0, 1, 3)), second_order=rng.random() < 0.2, forge=rng.random() < 0.3,
        webui_tome=0.3 if rng.random() < 0.05 else 0.0, sdpa=rng.random() < 0.7, vae=rng.random() < 0.15,
        inject=inject)
    if include == "hypertile":  # it splits nothing on the small latents (a no-op, no key): 384x384 always splits
        case.latent, case.hr_scale = (48, 48), 1.25
    if large and arch in LARGE_SIZES and rng.random() < 0.03:
        case.latent, case.sdpa, case.hires, case.second_order = LARGE_SIZES[arch], True, False, False
        case.batch_size, case.n_iter, case.steps, case.vae = 1, 1, 2, False
    # the call layout, drawn last so that every case keeps the rest of what it drew before
    case.batch_cond_uncond = rng.random() >= 0.3
    if rng.random() < 0.3:
        case.prompt_weights = [[rng.choice((1.0, 0.5, 1.3)) for _ in range(rng.randint(1, 3))] for _ in range(case.batch_size)]
    case.uncond_tokens = 14 if rng.random() < 0.2 else 7
    case.s_min_uncond = 100.0 if rng.random() < 0.1 else 0.0
    return case


# --- running a case ----------------------------------------------------------------------

@dataclass
class Result:
    case: Case
    outcome: str  # "image", "interrupted", "raised" (the injected error), "failure"
    problems: list[str] = field(default_factory=list)  # failures: crashes, bad images, undeclared messages
    leaks: list[str] = field(default_factory=list)  # a model not restored, a patch left active
    messages: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # techniques applied (not refused), per sampling pass


class Observer(scripts.Script):
    """Another extension's AlwaysVisible script, run after UNet Mods': records what each
    sampling pass applied (the soak's coverage)."""

    def title(self) -> str:
        return "soak observer"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        return []

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        generation = getattr(p, STATE_ATTR, None)
        if generation is not None and generation.applied is not None:
            p.unetmods_soak_applied.extend(generation.applied.applied)

    def __getattr__(self, name: str) -> Any:  # every other script callback: nothing to do
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class Soak:
    """Loads the script once and keeps one tiny UNet per family for the whole soak, as a WebUI
    process keeps its script and its loaded models."""

    def __init__(self, archs: tuple[str, ...] = ARCHS) -> None:
        self.archs = archs
        self.script_module = script_module()
        self.models = {arch: build_unet(arch, "tiny", seed=1) for arch in archs}
        self.models["vae"] = build_vae()
        self.snapshots = {arch: snapshot(unet) for arch, unet in self.models.items()}
        self.runners: dict[tuple[bool, bool], tuple[Any, list[Any]]] = {}
        self.loaded: str | None = None
        self.pending: Result | None = None  # a run that raised: its leftover is checked after the next run

    def runner(self, forge: bool, img2img: bool) -> tuple[Any, list[Any]]:
        if (forge, img2img) not in self.runners:
            runner = scripts.ScriptRunner([self.script_module.UNetModsScript(), Observer()], forge=forge)
            inputs = runner.setup_ui(img2img)
            self.runners[(forge, img2img)] = (runner, inputs)
        return self.runners[(forge, img2img)]

    def run(self, case: Case) -> Result:
        result = Result(case, "failure")
        unet = self.models[case.arch]
        model = SoakModel(unet, self.models["vae"] if case.vae else None, is_sdxl=case.arch == "sdxl")
        if case.arch == "sd21":
            model.parameterization = "v"  # SD2-768 predicts v
        out, err = io.StringIO(), io.StringIO()
        attention = sdpa_attention() if case.sdpa else contextlib.nullcontext()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), attention:
            if self.loaded != case.arch:  # a model switch: the WebUI calls on_model_loaded
                script_callbacks.model_loaded_callback(model)
                self.loaded = case.arch
            p = self._processing(case, model)
            p.unetmods_soak_applied = result.applied
            handle = _inject(unet, case.inject)
            saved = dict(vars(opts))
            opts.img2img_fix_steps, opts.token_merging_ratio = case.fix_steps, case.webui_tome
            opts.token_merging_ratio_hr, opts.batch_cond_uncond = case.webui_tome, case.batch_cond_uncond
            state.interrupted = state.skipped = False
            processed = None
            try:
                processed = processing.process_images(p)
            except InjectedError:
                result.outcome = "raised"
            except Exception:
                result.problems.append("exception out of the generation:\n" + traceback.format_exc())
            finally:
                if handle is not None:
                    handle.remove()
                state.interrupted = state.skipped = False
                vars(opts).update(saved)  # the stand-in's options are process-wide: leave them as found
        result.problems += [f"undeclared console output: {line!r}" for line in out.getvalue().splitlines()
                            if line.strip() and not line.startswith(LOG_PREFIX)]
        if "Traceback" in err.getvalue():
            result.problems.append("an error was swallowed by the WebUI's script/callback runner:\n" + err.getvalue())
        if processed is not None:
            result.outcome = "interrupted" if case.inject and case.inject[0] == "interrupt" and len(processed.images) < case.n_iter else "image"
            result.problems += _check_images(case, processed)
        comments = list(getattr(p, "comments", {}))
        result.messages = comments
        result.problems += [f"undeclared message: {c!r}" for c in comments if not c.startswith(LOG_PREFIX)]
        generation = getattr(p, STATE_ATTR, None)
        if generation is None:
            result.problems.append("the script did not run (no generation state on p)")
        else:
            # the infotext line as saved with the image, parsed as the WebUI parses a pasted one
            line = processed.infotexts[0] if processed is not None and processed.infotexts else processing.create_infotext(p)
            result.problems += _check_settings(case, generation.settings, infotext_utils.parse_generation_parameters(line))
        self._check_models(result)
        if result.problems and result.outcome != "failure":
            result.outcome = "failure"
        return result

    def _processing(self, case: Case, model: SoakModel) -> Any:
        runner, inputs = self.runner(case.forge, case.img2img)
        script = runner.alwayson_scripts[0]
        defaults = [c.value for c in inputs[script.args_from:script.args_to]]
        if case.route == "api":
            args = [None, {tid: dict(case.settings[tid]) for tid in case.settings.enabled_ids()}, *defaults[1:]]
        elif case.route == "xyz":
            args = [None, *defaults]
        else:
            args = [None, *case.settings.to_args()]
        h, w = case.latent
        common = dict(steps=case.steps, batch_size=case.batch_size, n_iter=case.n_iter, width=w * 8, height=h * 8,
                      seed=case.seed * 1000 + case.index, second_order=case.second_order, prompt_weights=case.prompt_weights,
                      uncond_tokens=case.uncond_tokens, s_min_uncond=case.s_min_uncond)
        if case.img2img:
            init = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(case.index))
            p = processing.StableDiffusionProcessingImg2Img(model, runner, args, init_latent=init,
                                                            denoising_strength=case.strength, **common)
        else:
            p = processing.StableDiffusionProcessingTxt2Img(model, runner, args, enable_hr=case.hires, hr_scale=case.hr_scale,
                                                            hr_second_pass_steps=case.hr_steps, **common)
        if case.route == "xyz":  # as the grid does for one cell: each axis' apply() on the (copied) p
            axes = xyz_axes()
            for tid in case.settings.enabled_ids():
                for name, value in case.settings[tid].items():
                    axis = axes[(tid, name)]
                    cell = axis["type"](str(value) if isinstance(value, bool) else value)
                    axis["apply"](p, cell, [cell])
        return p

    def _check_models(self, result: Result) -> None:
        """Every model exactly as built. After a run that raised, the WebUI runs no postprocess:
        the patch may stay until the next generation's before_process (or a model load) removes
        it, so the models that run used are checked after the next run."""
        raised = result.outcome == "raised"
        used = {result.case.arch, "vae"} if raised else set()
        blame = f"runs {self.pending.case.index}-{result.case.index}" if self.pending else f"run {result.case.index}"
        result.leaks += self._leaks(set(self.models) - used, f"after {blame}")
        if raised:
            self.pending = result
        else:
            self.pending = None
            if ACTIVE:
                result.leaks.append(f"{len(ACTIVE)} patcher(s) still active after {blame}")

    def _leaks(self, names: set[str], when: str) -> list[str]:
        leaks = []
        for name in sorted(names):
            try:
                assert_restored(self.models[name], self.snapshots[name])
            except AssertionError as e:
                leaks.append(f"{name} model {when}: {e}")
        return leaks

    def finish(self) -> list[str]:
        """After the last run: what a raised last run left behind, removed as the next
        generation's before_process would (restore_all)."""
        if self.pending is None:
            return []
        restore_all()
        self.pending = None
        return self._leaks(set(self.models), "after the last run raised and restore_all() ran") + (
            [f"{len(ACTIVE)} patcher(s) still active after restore_all()"] if ACTIVE else [])


def _inject(unet: torch.nn.Module, inject: tuple[str, int, str] | None) -> Any:
    """A pre-hook on a block (or the UNet) that interrupts, skips or raises at its n-th call."""
    if inject is None:
        return None
    kind, at, where = inject
    module = unet.get_submodule(where) if where else unet
    calls = [0]

    def hook(_module: Any, _args: Any) -> None:
        calls[0] += 1
        if calls[0] != at:
            return
        if kind == "raise":
            raise InjectedError("injected mid-sampling")
        if kind == "interrupt":
            state.interrupt()
        else:
            state.skipped = True

    return module.register_forward_pre_hook(hook)


def _check_settings(case: Case, ran: Settings, infotext: dict[str, Any]) -> list[str]:
    """What ran is what was asked for (valid values: no errors), and the infotext is readable."""
    problems = [f"a valid setting was reported: {e}" for e in ran.errors]
    if ran != case.settings:
        problems.append(f"asked for {case.settings.to_text()!r} via {case.route}, ran {ran.to_text()!r}")
    return problems + infotext_problems(ran, infotext)


def infotext_problems(requested: Settings, infotext: dict[str, Any]) -> list[str]:
    """Our infotext keys paste back without an error, and name no technique that was not asked for
    (what a key records may differ from the request: values the technique resolved and used)."""
    pasted = Settings.from_infotext(infotext)
    problems = [f"the infotext does not paste back cleanly: {e}" for e in pasted.errors]
    extra = set(pasted.enabled_ids()) - set(requested.enabled_ids())
    if extra:
        problems.append(f"the infotext names techniques that were not asked for: {sorted(extra)} in {infotext}")
    return problems


def xyz_axes() -> dict[tuple[str, str], dict[str, Any]]:
    """XYZ axes by the (technique, parameter) they set, found by applying each to a probe."""
    if not _AXES:
        for axis in axis_specs():
            probe = SimpleNamespace()
            axis["apply"](probe, "probe", ["probe"])
            ((tid, changes),) = overrides(probe).items()
            ((name, _),) = changes.items()
            _AXES[(tid, name)] = axis
    return _AXES


_AXES: dict[tuple[str, str], dict[str, Any]] = {}


def _check_images(case: Case, processed: Any) -> list[str]:
    problems = []
    interrupted = case.inject is not None and case.inject[0] == "interrupt"
    if not processed.images or (len(processed.images) != case.n_iter and not interrupted):
        problems.append(f"{len(processed.images)} image batches for a batch count of {case.n_iter}")
    h, w = case.latent
    sizes = {(h, w)}
    if case.hires:
        sizes.add((int(h * 8 * case.hr_scale) // 8, int(w * 8 * case.hr_scale) // 8))
    channels, scale = (3, 8) if case.vae else (4, 1)
    sizes = {(a * scale, b * scale) for a, b in sizes}
    for i, image in enumerate(processed.images):
        if image.shape[:2] != (case.batch_size, channels) or tuple(image.shape[2:]) not in sizes:
            problems.append(f"image batch {i} has shape {tuple(image.shape)}")
        elif not torch.isfinite(image).all():
            problems.append(f"image batch {i} has {int((~torch.isfinite(image)).sum())} non-finite values")
    return problems


_SCRIPT: list[Any] = []


def script_module() -> Any:
    """scripts/unetmods.py loaded once per process, like the WebUI loads an extension's script."""
    if not _SCRIPT:
        loaded = [d.module for d in scripts.scripts_data if d.path.endswith(os.path.join("scripts", "unetmods.py"))]
        _SCRIPT.append(loaded[0] if loaded else scripts.load_script(os.path.join(CHECKOUT, "scripts", "unetmods.py")))
    return _SCRIPT[0]
