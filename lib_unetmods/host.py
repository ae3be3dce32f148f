"""Glue between a WebUI processing object `p` and the backend, without importing the WebUI.

One `Generation` per processing object: it keeps the validated settings, the step clock of the
current sampling pass and what is applied, and reports messages to the console and the UI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.nn as nn

from . import a1111_call, forge_call
from .apply import Applied, apply_mods
from .clock import StepClock
from .params import INFOTEXT_PREFIX, MESSAGES_KEY
from .patcher import restore_all
from .schedules import pass_steps
from .settings import Settings
from .techniques import SPECS
from .xyz import overrides

STATE_ATTR = "unetmods_generation"
LOG_PREFIX = "[UNet Mods]"


@dataclass
class Generation:
    settings: Settings
    clock: StepClock = field(default_factory=StepClock)
    applied: Applied | None = None
    messages: list[str] = field(default_factory=list)  # reported so far, each once, in order
    first_pass_shape: tuple[int, ...] | None = None  # latent shape of the first pass, for hires scaling
    # what ran in the current batch: pass (False: first / img2img, True: hires) -> technique -> values used
    ran: dict[bool, dict[str, dict[str, Any]]] = field(default_factory=dict)
    forge: bool = False  # the host is Forge (its own batching of cond and uncond rows)

    def report(self, p: Any, messages: Iterable[str]) -> None:
        """Each message once per generation: to the console, to the UI as a comment, and kept
        for the infotext's messages field (API clients get no comments)."""
        for message in messages:
            if message in self.messages:
                continue
            self.messages.append(message)
            print(f"{LOG_PREFIX} {message}")
            comment = getattr(p, "comment", None)
            if callable(comment):
                comment(f"{LOG_PREFIX} {message}")

    def restore(self) -> None:
        if self.applied is not None:
            self.applied.restore()
            self.applied = None


def settings_from(p: Any, args: Iterable[Any]) -> Settings:
    """The UI's positional values (or an API dict), then the XYZ cell's overrides."""
    settings = Settings.from_args(args)
    cell = overrides(p)
    if cell:
        settings.update_from_dict(cell)
    return settings


def write_infotext(p: Any, keys: dict[str, str], generation: Generation) -> None:
    """Replace our keys (the XYZ grid shares extra_generation_params between cells), and the
    messages so far. The WebUI builds each image's infotext after both of its passes ran."""
    params = p.extra_generation_params
    for key in [k for k in params if k.startswith(f"{INFOTEXT_PREFIX} ")]:
        del params[key]
    params.update(keys)
    if generation.messages:
        params[MESSAGES_KEY] = " | ".join(generation.messages)


def ran_infotext(ran: dict[bool, dict[str, dict[str, Any]]]) -> dict[str, str]:
    """One key per technique that acted in some pass of the batch, with the values it used
    (in its first pass). Where a technique has a switch for a pass that took place, the switch
    says whether it acted there, so pasting the text runs the same passes again."""
    out = {}
    for tid, spec in SPECS.items():
        used = [ran[hires][tid] for hires in (False, True) if tid in ran.get(hires, {})]
        if not used:
            continue
        values = dict(used[0])
        for hires, switch in ((False, "first_pass"), (True, "hires")):
            if hires in ran and switch in values:
                values[switch] = tid in ran[hires]
        out[spec.infotext_key] = spec.to_text(values)
    return out


def record_pass(p: Any, generation: Generation, hires: bool, applied: Applied | None) -> None:
    """Remember what acted in this pass (a new batch starts with its first pass) and rewrite
    the infotext keys from it: a technique skipped, turned off by a rule or with nothing to do
    writes no key."""
    if not hires:
        generation.ran.clear()
    acted = applied.applied if applied is not None and applied.settings is not None else []
    generation.ran[hires] = {tid: dict(applied.settings[tid]) for tid in acted}
    write_infotext(p, ran_infotext(generation.ran), generation)


def finish_pass(p: Any, generation: Generation) -> None:
    """After a pass sampled (before the next pass applies, or when the batch ends): a technique
    that changed nothing after all (DeepCache with residuals at every step, HyperTile that never
    split a layer) loses its key and says why, once. The WebUI builds the infotext after this."""
    applied = generation.applied
    if applied is None or applied.settings is None:
        return
    idle = applied.idle_after_pass()
    applied.after_pass.clear()  # once per pass (Forge calls the hires setup twice)
    hires = generation.clock.hires
    for tid in idle:
        generation.ran.get(hires, {}).pop(tid, None)
    said = len(generation.messages)
    generation.report(p, [*applied.messages, *idle.values()])  # also what the hooks said while sampling
    if idle or len(generation.messages) > said:
        write_infotext(p, ran_infotext(generation.ran), generation)


def forge_objects(p: Any) -> Any | None:
    """Forge's `sd_model.forge_objects` (None on A1111)."""
    return getattr(getattr(p, "sd_model", None), "forge_objects", None)


def host_unet(p: Any) -> nn.Module | None:
    """The UNet module: Forge's `sd_model.forge_objects.unet.model.diffusion_model`, A1111's
    `sd_model.model.diffusion_model`; None where a link is missing."""
    forge = forge_objects(p)
    wrapper = getattr(forge.unet, "model", None) if forge is not None else getattr(getattr(p, "sd_model", None), "model", None)
    return getattr(wrapper, "diffusion_model", None)


def host_vae(p: Any) -> nn.Module | None:
    """The first-stage model (its decoder is what CD Tuner's saturation edits)."""
    forge = forge_objects(p)
    if forge is not None:
        return getattr(forge.vae, "first_stage_model", None)
    return getattr(getattr(p, "sd_model", None), "first_stage_model", None)


def webui_token_merging(p: Any, hires: bool) -> float:
    """The WebUI's own token merging ratio for this pass (0 where the WebUI has none)."""
    getter = getattr(p, "get_token_merging_ratio", None)
    if not callable(getter):
        return 0.0
    return float(getter(for_hr=hires) or 0)


def begin_pass(p: Any, generation: Generation, x_shape: tuple[int, ...] | None, fix_steps: bool = False,
               custom_unet: bool = False) -> None:
    """Apply the settings for the sampling pass about to start (first, hires, img2img). Safe to
    call twice for one pass (Forge does): everything is restored first, nothing stacks."""
    restore_all()
    generation.applied = None
    settings = generation.settings
    if not settings.enabled_ids():
        return
    hires = bool(getattr(p, "is_hr_pass", False))
    if custom_unet:
        generation.report(p, ["a custom UNet (e.g. TensorRT) is active, so no Python UNet code runs: UNet Mods skipped"])
        return
    unet = host_unet(p)
    if unet is None:
        generation.report(p, ["this model has no UNet to patch: UNet Mods skipped"])
        return
    if "tome" in settings.values and settings["tome"]["enabled"] and webui_token_merging(p, hires) > 0:
        settings = settings.copy()
        settings["tome"]["enabled"] = False
        generation.report(p, ["the WebUI's own token merging is on (Settings > Optimizations): "
                              "UNet Mods' ToMe is off for this pass so tokens are not merged twice"])
    generation.clock = StepClock(passes=generation.clock.passes)
    generation.forge = forge_objects(p) is not None
    generation.clock.start(pass_steps(p, hires, fix_steps), hires)
    if not hires:
        generation.first_pass_shape = x_shape
    seeds = getattr(p, "seeds", None) or [getattr(p, "seed", 0)]
    parameterization = getattr(getattr(p, "sd_model", None), "parameterization", "eps")
    generation.applied = apply_mods(
        unet, settings, generation.clock,
        seed=int(seeds[0]),
        latent_shape=x_shape,
        vae=host_vae(p),
        prediction="v" if parameterization == "v" else "eps",
        hires_planned=not hires and bool(getattr(p, "enable_hr", False)),
        base_shape=generation.first_pass_shape if hires else None,
    )
    generation.report(p, generation.applied.messages)
    _follow_sampler_steps(p, generation)


def _follow_sampler_steps(p: Any, generation: Generation) -> None:
    """Advance the clock from the sampler's per-step callback (called once per sampler step,
    after the step's model calls), so second-order samplers count steps, not UNet calls."""
    sampler = getattr(p, "sampler", None)
    callback = getattr(sampler, "callback_state", None)
    if generation.applied is None or generation.applied.patcher is None:
        return
    if not callable(callback):
        generation.report(p, [f"the sampler ({type(sampler).__name__}) has no per-step callback: step windows and "
                              "schedules follow only the WebUI's step counter, which such a sampler may leave at step 0"])
        return
    clock = generation.clock

    def callback_state(d: dict[str, Any]) -> Any:
        clock.begin_step(int(d.get("i", clock.step)) + 1)
        return callback(d)

    generation.applied.patcher.set_attr(sampler, "callback_state", callback_state, "clock")


def on_cfg_denoiser(generation: Generation | None, params: Any, opts: Any) -> None:
    """The WebUI's per-model-evaluation callback: total steps, sigma, the rows the evaluation's UNet
    calls will take (a1111_call.py, forge_call.py; `opts`: the WebUI's settings), and the sampler's
    step counter as a floor for the clock (it lags one step behind on k-diffusion samplers)."""
    if generation is None or generation.applied is None:
        return
    clock = generation.clock
    clock.total_steps = max(int(params.total_sampling_steps), 1)
    sigma = params.sigma
    if hasattr(sigma, "reshape"):  # a tensor, one sigma per row: the rows share it
        sigma = float(sigma.reshape(-1)[0])
    clock.begin_step(max(clock.step, int(params.sampling_step)), sigma)
    clock.evaluate((forge_call if generation.forge else a1111_call).evaluation_from(params, opts))
