"""Perturbed-Attention Guidance (PAG; Ahn et al. 2024; ComfyUI's PerturbedAttentionGuidance node,
pamparamm/sd-perturbed-attention): one extra UNet pass over the conditional rows in which the
chosen self-attention layers use the identity as attention map (they return to_out(to_v(x)):
each token keeps its own value), then

    guided = cfg_result + scale * (cond - cond_perturbed).

The references do this after CFG (Comfy's post-CFG function). Here the hook sits at the end of
the UNet call and the host still does CFG: the host combines each image's rows linearly, so the
change a = scale * (cond - cond_perturbed) is put into the rows of the image that carry it into
the host's result (rows.ResultShift, from the row description the host glue made): a / S on each,
S their coefficient sum. With cond and uncond rows in one call (A1111 with "Batch cond/uncond" on,
Forge's uncond-first batch) every row of the image gets a; a call with cond rows only (A1111's and
Forge's split calls) gets a / (s W), s the CFG scale and W the AND weights' sum; CFG 1 and A1111's
dropped uncond rows, where the cond rows are the result, a. With several AND parts, cond - perturbed
is weighted by the parts' weights (the host's own weighting: Forge's and Comfy's cond is that mean).
Adaptive scale (pamparamm): scale - scale * adaptive**4 * (1000 - t), at least 0.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.nn as nn

from ..clock import covers_no_step
from ..forward import Refused, UNetCall
from ..params import Param, TechniqueSpec, first_pass_or_hires_box
from ..patcher import current_forward
from ..rows import COND, CallRows, ResultShift
from ..unet_map import plain_self_attention

LAYERS_PATTERN = r"(middle|(input|output)\.\d+)(,(middle|(input|output)\.\d+))*"

SPEC = TechniqueSpec(
    id="pag",
    title="Perturbed-Attention Guidance (PAG)",
    description="Guides away from a pass whose middle self-attention is replaced by the identity: better "
                "structure, also at low CFG; costs one extra pass over the conditional rows.",
    params=(
        Param("enabled", "bool", False, "Perturbed-Attention Guidance (PAG)",
              "Enable PAG: one extra UNet pass over the conditional rows per step (about +50 % time with CFG)."),
        Param("scale", "float", 3.0, "PAG scale",
              "Strength of the guidance away from the perturbed prediction; the paper uses 3 with CFG 4. Higher "
              "values sharpen structure but can over-saturate.", 0.0, 20.0, 0.1),
        Param("layers", "text", "middle", "Layers",
              "Blocks whose self-attention is perturbed: middle, input.N or output.N (the UNet's input_blocks[N] / "
              "output_blocks[N]), comma-separated; every transformer of a named block. The paper and the references "
              "use middle.", pattern=LAYERS_PATTERN),
        Param("adaptive", "float", 0.0, "Adaptive scale",
              "Lowers the PAG scale towards the end of sampling (scale - scale * adaptive**4 * (1000 - t)); once it "
              "reaches 0 the extra pass is skipped, which saves time. 0 = constant scale.", 0.0, 1.0, 0.001,
              advanced=True),
        Param("start", "float", 0.0, "Start at", "Ratio of the steps where PAG starts.", 0.0, 1.0, 0.01, advanced=True),
        Param("end", "float", 1.0, "End at", "Ratio of the steps where PAG ends (the extra pass stops too).",
              0.0, 1.0, 0.01, advanced=True),
        Param("hires", "bool", True, "Apply in hires pass", "Also guide in the hires-fix pass."),
    ),
    presets={"paper": {"scale": 3.0, "layers": "middle"}, "light": {"scale": 1.5, "layers": "middle"}},
    recommended={"default": {"scale": 3.0, "layers": "middle"}},
)


# --- the math, on plain tensors ----------------------------------------------------------

def identity_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Self-attention with the identity as attention map: every token attends only to itself, so
    the heads return the values unchanged and only the output projection remains."""
    return attn.to_out(attn.to_v(x))


def adaptive_scale(scale: float, adaptive: float, timestep: float) -> float:
    if adaptive <= 0:
        return scale
    return max(0.0, scale - scale * adaptive ** 4 * (1000 - timestep))


def parse_layers(text: str) -> list[tuple[str, int]]:
    """"middle,input.7" -> [("middle", 0), ("input", 7)]."""
    out = []
    for part in text.split(","):
        kind, _, index = part.partition(".")
        out.append((kind, int(index) if index else 0))
    return out


def chosen_layers(umap: Any, text: str) -> list[nn.Module]:
    """The self-attention modules of the named blocks; Refused naming a block without one."""
    modules = []
    for kind, index in parse_layers(text):
        blocks = {"middle": [umap.middle], "input": umap.inputs, "output": umap.outputs}[kind]
        if not re.fullmatch(LAYERS_PATTERN, text) or index >= len(blocks):
            raise Refused(f"layers={text}: this UNet has no {kind} block {index} "
                          f"({len(umap.inputs)} input blocks, {len(umap.outputs)} output blocks)")
        block = blocks[index]
        found = [a.module for a in umap.self_attention() if a.block is block]
        if not found:
            name = "middle block" if kind == "middle" else f"{kind}_blocks[{index}]"
            raise Refused(f"layers={text}: the {name} has no self-attention in this {umap.family} UNet")
        modules += [m for m in found if m not in modules]
    return modules


# --- wiring ------------------------------------------------------------------------------

runs_in_pass = first_pass_or_hires_box


class Runtime:
    """Per-pass state: the perturbed-pass flag, the guidance still to place, what the pass did."""

    def __init__(self, ctx: Any, values: dict[str, Any]) -> None:
        self.ctx, self.values = ctx, values
        self.perturbing = False
        self.shift = ResultShift()
        self.cond_calls = 0  # calls with cond rows to guide
        self.guided = 0  # of those, calls whose guidance had a scale above 0
        self.warn_once = ctx.warner()

    def attention(self, attn: nn.Module) -> Callable[..., Any]:
        inner = current_forward(attn)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.perturbing and plain_self_attention(args, kwargs):
                return identity_attention(attn, x)
            return inner(x, *args, **kwargs)

        return forward

    def scale(self, call: UNetCall) -> float:
        clock = self.ctx.clock
        if not clock.in_window(self.values["start"], self.values["end"]):
            return 0.0
        t = call.timesteps
        timestep = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) and t.numel() else 1000.0
        return adaptive_scale(self.values["scale"], self.values["adaptive"], timestep)

    def end(self, out: torch.Tensor, call: UNetCall) -> torch.Tensor:
        if self.perturbing or call.extra:
            return out
        rows = call.rows
        if rows is None or not rows.coefficients_known:
            self.warn_once("which rows of this UNet call are cond and uncond rows, and of which image, is unknown; "
                           "no guidance on it")
            return out
        if not self.shift.begin(rows):
            self.warn_once("the host's guidance gave no weight to the rows of an image; no guidance on it")
        cond = rows.of(COND)
        scale = self.scale(call) if cond else 0.0
        self.cond_calls += bool(cond)
        if scale > 0:
            self.guided += 1
            perturbed = self.perturbed_pass(rows, cond)
            # the difference from the UNet's own cond rows: an earlier end hook (NDCFG) may have shifted `out`
            diff = call.state.get("output", out)[cond] - perturbed.to(out.dtype)
            for j, i in enumerate(cond):
                row = rows.rows[i]
                weights = rows.evaluation.cond_weight(row.image)
                if weights:
                    self.shift.add(row.image, diff[j] * (scale * row.weight / weights))
        shift = self.shift.place(rows, out)
        return out if shift is None else out + shift

    def perturbed_pass(self, rows: CallRows, cond: list[int]) -> torch.Tensor:
        """The whole UNet again (every other technique included) on the cond rows, the chosen
        self-attention layers perturbed; not a sampler call."""
        self.perturbing = True
        try:
            return self.ctx.calls.rerun(self.ctx.unet, SPEC.id, rows, cond)
        finally:
            self.perturbing = False

    def idle(self) -> str | None:
        """After the pass: why the guidance changed nothing (None: it did, or no call ran)."""
        if self.guided:
            return None
        if self.cond_calls:
            return "the adaptive scale was 0 at every step of this pass"
        return "no UNet call of this pass had cond rows it could guide"


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    if values["scale"] <= 0:
        return "scale 0 guides nothing"
    return covers_no_step(where.clock, lambda clock: clock.window_steps(values["start"], values["end"]))


def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    modules = chosen_layers(ctx.map, values["layers"])
    rt = Runtime(ctx, values)
    ctx.hook("end", rt.end)  # raises Refused where block-level hooks cannot run (classic Forge)
    ctx.idle_after(rt.idle)
    for module in modules:
        ctx.patcher.set_attr(module, "forward", rt.attention(module), ctx.technique)
