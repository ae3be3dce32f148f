"""Forge's current UNet host, as it behaves for the UNet (lllyasviel/stable-diffusion-webui-forge:
backend/nn/unet.py, backend/patcher/unet.py + base.py, backend/modules/k_model.py,
backend/sampling/sampling_function.py; read, not copied).

- `forge_unet(ldm_unet)` gives the same weights in Forge's shape: an `IntegratedUNet2DConditionModel`
  (module `backend.nn.unet`) whose forward takes `control` and `transformer_options`, runs Forge's
  block modifiers and input/output block patches, applies `control` in place (`h += ctrl`) after
  each input block, to the middle output and to each popped skip, and passes the next skip's shape
  to each output block; `TimestepEmbedSequential(x, emb, context, transformer_options,
  output_shape)`, `ResBlock(x, emb, transformer_options)`, `SpatialTransformer(x, context,
  transformer_options)`, `Upsample(x, output_shape)` resizing to that shape by nearest, and
  Linear layers that are not `nn.Linear`. The transformer internals stay ldm's.
- `UnetPatcher`: model_options with the one `model_function_wrapper` slot, block modifiers,
  input/output block patches (`set_model_input_block_patch[_after_skip]`, `set_model_output_block_patch`), post-CFG functions; `clone()` deep-copies model_options as Forge's does.
- `sample()`: Forge's batch layout: its to-run list (the conds, then the uncond) popped from the
  end, all chunks that concatenate in one call (uncond first) or one call per chunk (`split`);
  `layout="cfg1"` (CFG scale 1: cond rows only), `layout="and"` (an AND-prompt: one chunk per cond,
  `cond_or_uncond` [1, 0, 0], the second part first) and `layout="area"` (an area prompt: its cond
  runs in its own call on input_x cropped to the area), each with `transformer_options` carrying
  `cond_or_uncond`, `cond_indices`, `uncond_indices`, `sigmas`; `KModel.apply_model` scaling (the
  UNet output is turned into the denoised latent); the conds averaged by weight and CFG scaled by the
  weights' sum (`edit_strength`), on the denoised latents; any sigma schedule. Per evaluation the
  clock gets the step, the sigma and the rows the extension's glue reads from Forge's cfg-denoiser
  callback (`forge_call.evaluation`: the prompts' AND parts, not the area cond).
- `KModel.percent_to_sigma`: the predictor's window edge (backend/modules/k_prediction.py), which
  Forge's built-in Kohya HRFix compares each call's `sigmas[0]` with.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.diffusionmodules.util import timestep_embedding
from lib_unetmods.clock import StepClock
from lib_unetmods.forge_call import evaluation
from lib_unetmods.lab.sampler import sd_sigmas, sigma_to_t
from lib_unetmods.schedules import TRAIN_SIGMAS

COND, UNCOND = 0, 1
AND_COND = 2  # the stand-in's second cond of an AND-prompt (Forge marks it 0, like every cond)
AREA_COND = 3  # a cond with an area: Forge crops input_x to it (sampling_function.get_area_and_mult)


def _crop(x: torch.Tensor) -> torch.Tensor:
    """The area of the stand-in's area prompt: the top-left quarter, as Forge crops input_x to an area."""
    return x[..., : x.shape[-2] // 2, : x.shape[-1] // 2]


def apply_control(h: torch.Tensor, control: dict[str, list[Any]] | None, name: str) -> torch.Tensor:
    if control is not None and control.get(name):
        residual = control[name].pop()
        if residual is not None:
            try:
                h += residual
            except RuntimeError:  # Forge prints a warning and goes on without this residual
                print("warning control could not be applied", h.shape, residual.shape)
    return h


def _modify(modifiers: list[Callable[..., torch.Tensor]], h: torch.Tensor, when: str, options: dict[str, Any]) -> torch.Tensor:
    for modifier in modifiers:
        h = modifier(h, when, options)
    return h


def _unet_forward(self: nn.Module, x: torch.Tensor, timesteps: Any = None, context: Any = None, y: Any = None,
                  control: dict[str, list[Any]] | None = None, transformer_options: dict[str, Any] = {}, **kwargs: Any) -> torch.Tensor:
    transformer_options["original_shape"] = list(x.shape)
    transformer_options["transformer_index"] = 0
    patches = transformer_options.get("patches", {})
    modifiers = transformer_options.get("block_modifiers", [])
    assert (y is not None) == (self.num_classes is not None)
    emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype))
    if self.num_classes is not None:
        emb = emb + self.label_emb(y)
    hs, h = [], x
    for i, module in enumerate(self.input_blocks):
        transformer_options["block"] = ("input", i)
        h = _modify(modifiers, h, "before", transformer_options)
        h = module(h, emb, context, transformer_options)
        h = apply_control(h, control, "input")
        h = _modify(modifiers, h, "after", transformer_options)
        for patch in patches.get("input_block_patch", []):
            h = patch(h, transformer_options)
        hs.append(h)
        for patch in patches.get("input_block_patch_after_skip", []):
            h = patch(h, transformer_options)
    transformer_options["block"] = ("middle", 0)
    h = _modify(modifiers, h, "before", transformer_options)
    h = self.middle_block(h, emb, context, transformer_options)
    h = apply_control(h, control, "middle")
    h = _modify(modifiers, h, "after", transformer_options)
    for i, module in enumerate(self.output_blocks):
        transformer_options["block"] = ("output", i)
        skip = apply_control(hs.pop(), control, "output")
        for patch in patches.get("output_block_patch", []):
            h, skip = patch(h, skip, transformer_options)
        h = torch.cat([h, skip], dim=1)
        output_shape = hs[-1].shape if hs else None
        h = _modify(modifiers, h, "before", transformer_options)
        h = module(h, emb, context, transformer_options, output_shape)
        h = _modify(modifiers, h, "after", transformer_options)
    transformer_options["block"] = ("last", 0)
    h = _modify(modifiers, h, "before", transformer_options)
    h = self.out(h)
    h = _modify(modifiers, h, "after", transformer_options)
    return h.type(x.dtype)


IntegratedUNet2DConditionModel = type("IntegratedUNet2DConditionModel", (nn.Module,),
                                      {"forward": _unet_forward, "__module__": "backend.nn.unet"})


def _sequential_forward(self: nn.Module, x: torch.Tensor, emb: torch.Tensor, context: Any = None,
                        transformer_options: dict[str, Any] = {}, output_shape: Any = None) -> torch.Tensor:
    for layer in self:
        name = type(layer).__name__
        if name == "ResBlock":
            x = layer(x, emb, transformer_options)
        elif "SpatialTransformer" in name:
            x = layer(x, context, transformer_options)
            transformer_options["transformer_index"] = transformer_options.get("transformer_index", 0) + 1
        elif name == "Upsample":
            x = layer(x, output_shape=output_shape)
        else:
            x = layer(x)
    return x


def _resblock_forward(self: nn.Module, x: torch.Tensor, emb: torch.Tensor, transformer_options: dict[str, Any] = {}) -> torch.Tensor:
    return type(self).__mro__[1].forward(self, x, emb)


def _transformer_forward(self: nn.Module, x: torch.Tensor, context: Any = None, transformer_options: dict[str, Any] = {}) -> torch.Tensor:
    return type(self).__mro__[1].forward(self, x, context)


def _upsample_forward(self: nn.Module, x: torch.Tensor, output_shape: Any = None) -> torch.Tensor:
    size = tuple(output_shape[2:4]) if output_shape is not None else (x.shape[2] * 2, x.shape[3] * 2)
    x = F.interpolate(x, size=size, mode="nearest")
    return self.conv(x) if self.use_conv else x


def _linear_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, self.weight, self.bias)


ForgeLinear = type("Linear", (nn.Module,), {"forward": _linear_forward, "__module__": "backend.operations"})
_FORWARDS = {"TimestepEmbedSequential": _sequential_forward, "ResBlock": _resblock_forward,
             "SpatialTransformer": _transformer_forward, "Upsample": _upsample_forward}
_classes: dict[type, type] = {}


def _forge_class(cls: type, forward: Callable[..., Any]) -> type:
    if cls not in _classes:
        _classes[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": "backend.nn.unet"})
    return _classes[cls]


def forge_unet(ldm_unet: nn.Module) -> nn.Module:
    """A copy of an ldm UNet (random_unets) with Forge's classes and call conventions."""
    unet = copy.deepcopy(ldm_unet)
    for m in unet.modules():
        name = type(m).__name__
        key = "SpatialTransformer" if "SpatialTransformer" in name else name
        if key in _FORWARDS:
            m.__class__ = _forge_class(type(m), _FORWARDS[key])
        elif isinstance(m, nn.Linear):
            m.__class__ = ForgeLinear
    unet.__class__ = IntegratedUNet2DConditionModel
    return unet


class KModel(nn.Module):
    """apply_model: x * c_in into the UNet at timestep t(sigma), output turned into the denoised latent."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model
        self.log_sigmas = TRAIN_SIGMAS.log().float()  # the predictor's buffer: float64 logs kept as float32

    def percent_to_sigma(self, percent: float) -> float:
        """0 -> a huge sigma, 1 -> 0, else the sigma at timestep (1 - percent) * 999, its log
        interpolated between the two training timesteps around it, in float32."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        t = torch.tensor((1.0 - percent) * 999.0)
        w = t.frac()
        low, high = self.log_sigmas[t.floor().long()], self.log_sigmas[t.ceil().long()]
        return ((1 - w) * low + w * high).exp().item()

    def apply_model(self, x: torch.Tensor, sigma: torch.Tensor, c_crossattn: torch.Tensor, control: Any = None,
                    transformer_options: dict[str, Any] = {}, **extra: Any) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1)
        t = torch.tensor([sigma_to_t(float(v)) for v in sigma], device=x.device)
        eps = self.diffusion_model(x / (s ** 2 + 1) ** 0.5, t, context=c_crossattn, control=control,
                                   transformer_options=transformer_options, **extra).float()
        return x - eps * s


class UnetPatcher:
    def __init__(self, model: KModel) -> None:
        self.model = model
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.controlnet_linked_list = None

    def clone(self) -> "UnetPatcher":
        n = UnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.controlnet_linked_list = self.controlnet_linked_list
        return n

    def set_model_unet_function_wrapper(self, fn: Callable[..., Any]) -> None:
        self.model_options["model_function_wrapper"] = fn

    def _add_patch(self, name: str, fn: Callable[..., Any]) -> None:
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = patches.get(name, []) + [fn]

    def set_model_input_block_patch(self, fn: Callable[..., Any]) -> None:
        self._add_patch("input_block_patch", fn)

    def set_model_input_block_patch_after_skip(self, fn: Callable[..., Any]) -> None:
        self._add_patch("input_block_patch_after_skip", fn)

    def set_model_output_block_patch(self, fn: Callable[..., Any]) -> None:
        self._add_patch("output_block_patch", fn)

    def add_block_modifier(self, fn: Callable[..., Any]) -> None:
        self.model_options["transformer_options"].setdefault("block_modifiers", []).append(fn)

    def set_model_sampler_post_cfg_function(self, fn: Callable[..., Any]) -> None:
        self.model_options["sampler_post_cfg_function"] = self.model_options.get("sampler_post_cfg_function", []) + [fn]


def _indices(cond_or_uncond: list[int], rows: int) -> tuple[list[int], list[int]]:
    cond, uncond = [], []
    for i, c in enumerate(cond_or_uncond):
        (cond if c == COND else uncond).extend(range(i * rows, (i + 1) * rows))
    return cond, uncond


def _conds(layout: str) -> list[int]:
    """The conds of the stand-in's prompt, in Forge's to-run order."""
    return [COND] + ([AND_COND] if layout == "and" else []) + ([AREA_COND] if layout == "area" else [])


def _batches(to_run: list[int], split: bool) -> list[list[int]]:
    """Forge's loop over its to-run list: the chunks that concatenate with the first one left (the
    area chunk has another input shape), taken from the end of the list: all of them, or one per
    call when memory is short (`split`)."""
    batches = []
    while to_run:
        same = [k for k in reversed(to_run) if (k == AREA_COND) == (to_run[0] == AREA_COND)]
        batch = same[:1] if split else same
        batches.append(batch)
        to_run = [k for k in to_run if k not in batch]
    return batches


def calc_cond_uncond_batch(patcher: UnetPatcher, cond: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor,
                           sigma: torch.Tensor, split: bool, control: Callable[..., Any] | None,
                           y: torch.Tensor | None = None, y_uncond: torch.Tensor | None = None,
                           layout: str = "cfg") -> tuple[torch.Tensor, torch.Tensor]:
    """One model evaluation of a step: (the conds averaged where they cover, the uncond). layout
    "cfg1": at CFG scale 1 Forge drops the uncond chunk, calls hold cond rows only (the uncond
    prediction is then 0). "and": an AND-prompt, one chunk per cond. "area": a cond on the top-left
    quarter."""
    model, options = patcher.model, patcher.model_options
    chunks = {COND: (cond, y), UNCOND: (uncond, y if y_uncond is None else y_uncond), AND_COND: (cond.flip(1), y),
              AREA_COND: (cond.flip(1), y)}
    out: dict[int, torch.Tensor] = {}
    for chunk_ids in _batches(_conds(layout) + ([] if layout == "cfg1" else [UNCOND]), split):
        cond_or_uncond = [UNCOND if k == UNCOND else COND for k in chunk_ids]
        n = len(cond_or_uncond)
        area = chunk_ids == [AREA_COND]
        input_x = torch.cat([_crop(x) if area else x] * n)
        timestep = torch.cat([sigma] * n)
        to = dict(options["transformer_options"])
        to["cond_or_uncond"] = cond_or_uncond[:]
        to["sigmas"] = sigma
        to["cond_indices"], to["uncond_indices"] = _indices(cond_or_uncond, x.shape[0])
        c: dict[str, Any] = {"c_crossattn": torch.cat([chunks[k][0] for k in chunk_ids]), "transformer_options": to}
        if y is not None:
            c["y"] = torch.cat([chunks[k][1] for k in chunk_ids])
        if control is not None:
            c["control"] = control(input_x, timestep, c)
        if "model_function_wrapper" in options:
            output = options["model_function_wrapper"](model.apply_model, {"input": input_x, "timestep": timestep, "c": c,
                                                                          "cond_or_uncond": cond_or_uncond})
        else:
            output = model.apply_model(input_x, timestep, **c)
        for k, o in zip(chunk_ids, output.chunk(n)):
            out[k] = o
    total, count = torch.zeros_like(x), torch.zeros_like(x)  # Forge: out_cond += o * mult; / counts
    for k in _conds(layout):
        h, w = out[k].shape[-2:]
        total[..., :h, :w] += out[k]
        count[..., :h, :w] += 1
    return total / count, out.get(UNCOND, torch.zeros_like(x))


@torch.no_grad()
def sample(patcher: UnetPatcher, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
           clock: StepClock, cfg_scale: float = 7.0, split: bool = False, control: Callable[..., Any] | None = None,
           y: torch.Tensor | None = None, y_uncond: torch.Tensor | None = None, layout: str = "cfg",
           sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Euler with CFG on denoised latents; the same update as lib_unetmods.lab.sampler.euler_sample.
    `sigmas`: the schedule (steps + 1 values, the last 0); default evenly spaced timesteps."""
    sigmas = (sd_sigmas(steps) if sigmas is None else sigmas).to(noise.device)
    x = noise * sigmas[0]
    if layout == "cfg1":
        cfg_scale = 1.0
    parts = len(_conds(layout)) - (layout == "area")  # the glue sees the prompt's AND parts, not an area
    strength = len(_conds(layout))  # Forge's edit_strength: the sum of every cond's strength
    for i in range(steps):
        sigma = float(sigmas[i])
        clock.begin_step(i, sigma)
        clock.evaluate(evaluation([[1.0] * parts] * noise.shape[0], cfg_scale, x))
        s = torch.full((noise.shape[0],), sigma, device=noise.device)
        cond_pred, uncond_pred = calc_cond_uncond_batch(patcher, cond, uncond, x, s, split, control, y, y_uncond, layout)
        denoised = uncond_pred + (cond_pred - uncond_pred) * cfg_scale * strength
        for fn in patcher.model_options.get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                           "model": patcher.model, "sigma": s, "input": x, "model_options": patcher.model_options})
        x = x + (x - denoised) / sigma * (float(sigmas[i + 1]) - sigma)
    clock.end_step()
    return x


def control_from(residuals: Callable[..., list[Any]], adapter_blocks: list[int] | None = None) -> Callable[..., dict[str, list[Any]]]:
    """Forge's ControlNet `get_control`: a fresh dict of residual lists per UNet call (the forward
    pops them), skips in input order under "output", the middle one under "middle". With
    `adapter_blocks`, a T2I-Adapter (backend/patcher/controlnet.py `T2IAdapter.get_control` and
    `control_merge`): its features fill `control["input"]`, one entry per input block (None where
    it injects nothing), stored reversed so that the forward's `pop()` after input block i gives
    block i's; the middle gets the rest (SDXL) and "output" is empty."""
    def get_control(x: torch.Tensor, timestep: torch.Tensor, c: dict[str, Any]) -> dict[str, list[Any]]:
        t = torch.tensor([sigma_to_t(float(v)) for v in timestep], device=x.device)
        s = timestep.view(-1, 1, 1, 1)
        outs = residuals(x / (s ** 2 + 1) ** 0.5, t, c["c_crossattn"], c.get("y"))
        outs = [None if isinstance(o, float) else o for o in outs]
        if adapter_blocks is None:
            return {"input": [], "middle": [outs[-1]], "output": outs[:-1]}
        inputs = [outs[i] if i in adapter_blocks else None for i in range(len(outs) - 1)]
        sdxl = c.get("y") is not None
        return {"input": inputs[::-1], "middle": [outs[-1] if sdxl else None], "output": []}

    return get_control

