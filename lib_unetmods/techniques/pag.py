"""Perturbed-Attention Guidance (PAG; Ahn et al. 2024; ComfyUI's PerturbedAttentionGuidance node,
pamparamm/sd-perturbed-attention): one extra UNet pass over the conditional rows in which the
chosen self-attention layers use the identity as attention map (they return to_out(to_v(x)):
each token keeps its own value), then

    guided = cfg_result + scale * (cond - cond_perturbed).

The references do this after CFG (Comfy's post-CFG function). Here the hook sits at the end of
the UNet call and the host still does CFG, so the rows are shifted such that the host's CFG
yields that formula in every batch layout (any prediction type: CFG and the denoiser are linear):
- cond and uncond rows in one call (A1111; Forge's uncond-first batch): every row of an image,
  cond and uncond, gets a = scale * (cond - cond_perturbed): u + a + w (c + a - u - a) = cfg + a;
- a call with cond rows only after the step's uncond call (Forge's split calls): the cond rows get
  a / w, w the CFG scale (the uncond rows are already used): u + w (c + a / w - u) = cfg + a;
- cond rows only and no uncond call in the step (CFG 1 on Forge, A1111 skipping the uncond rows):
  the result is the cond rows, which get a: c + a.
With several cond rows per image (AND prompts), a uses the mean of their differences.
Adaptive scale (pamparamm): scale - scale * adaptive**4 * (1000 - t), at least 0.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..forward import Refused, UNetCall, fresh_containers, select_rows
from ..params import Param, TechniqueSpec, first_pass_or_hires_box
from ..patcher import current_forward

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


def image_shifts(diff: torch.Tensor, cond_images: Sequence[int], images: int) -> torch.Tensor:
    """Per image, the mean over its cond rows of diff (cond - cond_perturbed)."""
    index = torch.tensor(list(cond_images), device=diff.device)
    total = diff.new_zeros((images, *diff.shape[1:])).index_add_(0, index, diff)
    count = torch.zeros(images, device=diff.device, dtype=diff.dtype).index_add_(0, index, torch.ones_like(index, dtype=diff.dtype))
    return total / count.clamp(min=1).view(-1, *[1] * (diff.dim() - 1))


def guidance_shift(out: torch.Tensor, perturbed: torch.Tensor, cond: Sequence[int], uncond: Sequence[int],
                   cond_images: Sequence[int], uncond_images: Sequence[int], scale: float,
                   cfg_weight: float = 1.0) -> torch.Tensor:
    """What to add to the call's rows so that the host's CFG gives cfg_result + scale * (cond -
    cond_perturbed) (see the module docstring). `out`: the UNet's own output; `perturbed`: the
    perturbed pass's rows in the order of `cond`; cond_images / uncond_images: the image of each
    row. With uncond rows in the call, every row of an image gets the shift; without, only the cond
    rows, divided by cfg_weight (the CFG scale after a split uncond call, else 1)."""
    images = max([*cond_images, *uncond_images]) + 1
    per_image = scale * image_shifts(out[list(cond)] - perturbed, cond_images, images)
    shift = torch.zeros_like(out)
    shift[list(cond)] = per_image[list(cond_images)] / (1.0 if uncond else cfg_weight)
    if uncond:
        shift[list(uncond)] = per_image[list(uncond_images)]
    return shift


def guided_rows(out: torch.Tensor, perturbed: torch.Tensor, cond: Sequence[int], uncond: Sequence[int],
                cond_images: Sequence[int], uncond_images: Sequence[int], scale: float,
                cfg_weight: float = 1.0) -> torch.Tensor:
    return out + guidance_shift(out, perturbed, cond, uncond, cond_images, uncond_images, scale, cfg_weight)


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
    """Per-pass state: the inputs of the current call, the perturbed-pass flag, the split-call memory."""

    def __init__(self, ctx: Any, values: dict[str, Any]) -> None:
        self.ctx, self.values = ctx, values
        self.perturbing = False
        self.inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.uncond_step: tuple[int, int] | None = None  # (pass, step) of the last uncond-only call
        self.warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.ctx.messages.append(f"{SPEC.title}: {message}")

    def attention(self, attn: nn.Module) -> Callable[..., Any]:
        inner = current_forward(attn)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            cross = any(a is not None for a in args[:1]) or any(kwargs.get(k) is not None for k in ("context", "value"))
            if self.perturbing and not cross:
                return identity_attention(attn, x)
            return inner(x, *args, **kwargs)

        return forward

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.perturbing and not self.ctx.forward_hooks().extra:  # not another technique's extra pass
            self.inputs = (args, fresh_containers(kwargs))  # Forge's forward pops its control lists

    def scale(self, call: UNetCall) -> float:
        clock = self.ctx.clock
        if not clock.in_window(self.values["start"], self.values["end"]):
            return 0.0
        t = call.timesteps
        timestep = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) and t.numel() else 1000.0
        return adaptive_scale(self.values["scale"], self.values["adaptive"], timestep)

    def layout(self, call: UNetCall, batch: int) -> tuple[list[int], list[int], list[int], list[int]] | None:
        """(cond rows, uncond rows, image of each cond row, image of each uncond row), or None."""
        rows = call.rows()
        clock = self.ctx.clock
        options = call.kwargs.get("transformer_options")
        if rows is None and clock.cond_rows == batch and clock.uncond_rows:  # A1111 dropped the uncond rows
            rows = (list(range(batch)), [])
        if rows is None:
            return None
        cond, uncond = rows
        if isinstance(options, dict) and options.get("cond_or_uncond"):  # Forge: chunks of the same images
            chunk = batch // len(options["cond_or_uncond"])
            return cond, uncond, [r % chunk for r in cond], [r % chunk for r in uncond]
        images = len(uncond) or clock.uncond_rows or len(cond)
        if not cond or len(cond) % images:
            return None
        per = len(cond) // images
        return cond, uncond, [j // per for j in range(len(cond))], list(range(len(uncond)))

    def end(self, out: torch.Tensor, call: UNetCall) -> torch.Tensor:
        if self.perturbing or call.extra or self.inputs is None:
            return out
        clock, batch = self.ctx.clock, out.shape[0]
        layout = self.layout(call, batch)
        if layout is None:
            self.warn_once("layout", "the cond/uncond rows of this call are unknown; no guidance on it")
            return out
        cond, uncond, cond_images, uncond_images = layout
        step = (clock.passes, clock.step)
        if not cond:  # Forge's split calls: the uncond call of the step; the cond call adds the guidance
            self.uncond_step = step
            return out
        scale = self.scale(call)
        if scale <= 0:
            return out
        weight = 1.0
        if not uncond and self.uncond_step == step:
            if not self.ctx.cfg_scale:
                self.warn_once("cfg", "split cond/uncond calls need the CFG scale, which the host did not give; "
                                      "no guidance on them")
                return out
            weight = float(self.ctx.cfg_scale)
        perturbed = self.perturbed_pass(call, cond, batch)
        # the difference from the UNet's own cond rows: an earlier end hook (NDCFG) may have shifted `out`
        raw = call.state.get("output", out)
        return out + guidance_shift(raw, perturbed.to(out.dtype), cond, uncond, cond_images, uncond_images, scale, weight)

    def perturbed_pass(self, call: UNetCall, cond: list[int], batch: int) -> torch.Tensor:
        """The whole UNet again (every other technique included) on the cond rows, the chosen
        self-attention layers perturbed; not a sampler call."""
        args, kwargs = self.inputs
        index = torch.tensor(cond, device=call.x.device)
        kwargs = select_rows(kwargs, index, batch)
        options = kwargs.get("transformer_options")
        if isinstance(options, dict) and "cond_indices" in options:  # Forge: describe the cond-only batch
            chunks = [c for c in options.get("cond_or_uncond", [0]) if c == 0] or [0]
            kwargs["transformer_options"] = {**options, "cond_or_uncond": chunks, "cond_indices": list(range(len(cond))),
                                             "uncond_indices": []}
        self.perturbing = True
        try:
            with self.ctx.forward_hooks().extra_pass(SPEC.id):
                return self.ctx.unet(*select_rows(args, index, batch), **kwargs)
        finally:
            self.perturbing = False


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    if values["scale"] <= 0:
        return "scale 0 guides nothing"
    clock = where.clock
    if clock is not None and not clock.window_steps(values["start"], values["end"]):
        return f"the start/end window covers no step of this {clock.total_steps}-step pass"
    return None


def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    modules = chosen_layers(ctx.map, values["layers"])
    rt = Runtime(ctx, values)
    ctx.hook("end", rt.end)  # raises Refused where block-level hooks cannot run (classic Forge)
    ctx.patcher.add_handle(ctx.unet.register_forward_pre_hook(rt.pre_hook, with_kwargs=True), ctx.technique)
    for module in modules:
        ctx.patcher.set_attr(module, "forward", rt.attention(module), ctx.technique)
