"""ScaleCrafter (He et al., ICLR 2024; YingqingHe/ScaleCrafter): re-dilation of the UNet's 3x3
convs, dispersed convolution and noise-damped classifier-free guidance, for sizes above the
model's native one.

Reference clock: step index i of 50 DDIM steps; a tau means "active while i < tau". Here a tau
is the ratio tau/50 of the pass's steps: active while clock.step < int(ratio * steps), which is
exactly the reference's window at 50 steps.

Settings: the reference ships per-size tables written with diffusers module names. They are kept
here in that form (prefixes of diffusers names) and matched against the ldm convs through
`diffusers_name` (design doc 0.2). The SDXL tables were written with SD1 names: they treat
`down_blocks.3` as the deepest encoder block (the mirror of mid_block / up_blocks.0), which
SDXL, with three levels, does not have, so the reference silently skips it (ScaleCrafter issue
#16). Here SD1-style encoder names in SDXL tables are counted from the deepest level, like the
decoder names already are: down_blocks.b -> SDXL down_blocks.(b-1); up_blocks.b is unchanged;
`up_blocks.2.upsamplers` has no SDXL counterpart (SDXL's last up block, like SD1's, has none)
and matches nothing.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..families import PIXELS_PER_LATENT, ByFamily, is_sdxl, native_side as native_latent_side
from ..forward import Refused
from ..rows import IMAGE, UNCOND, CallRows, ResultShift
from ..params import Param, TechniqueSpec, first_pass_or_hires_box
from .scalecrafter_disperse import dispersion_matrix

LEVEL_PARAMS = 4  # level0..level3 (SDXL has three levels; 4 covers SD1/SD2)

SPEC = TechniqueSpec(
    id="scalecrafter",
    title="ScaleCrafter",
    description="Re-dilates the UNet's convolutions so that images above the native size keep one subject "
                "instead of repeating it; optional noise-damped guidance and dispersed kernels for very large sizes.",
    params=(
        Param("enabled", "bool", False, "ScaleCrafter", "Enable ScaleCrafter re-dilation."),
        Param("native", "choice", "auto", "Native size",
              "The model's training size; settings are chosen by the ratio of the image's pixel count to native x native. "
              "auto = 512 (SD1), 768 (SD2; choose 512 for 2.x-base models), 1024 (SDXL).",
              choices=("auto", "512", "768", "1024")),
        Param("scale", "float", 1.0, "Dilation scale",
              "Multiplies every dilation chosen for the size; below 1 is milder, above 1 stronger.", 0.25, 4.0, 0.05),
        Param("stop", "float", 0.0, "Stop at",
              "Ratio of the steps after which the convs run undilated; 0 = the reference's value for the size (e.g. 0.6).",
              0.0, 1.0, 0.01),
        Param("progressive", "choice", "auto", "Progressive",
              "Lower the dilation step by step to 2 over the window (the reference does this for 8x pixels and more).",
              choices=("auto", "on", "off")),
        Param("ndcfg", "choice", "auto", "Noise-damped CFG",
              "Take the unconditional prediction from a milder-dilated pass; costs one extra UNet pass over the "
              "unconditional rows (about +50% time) on the steps where it is active. auto = as the reference for the size.",
              choices=("auto", "on", "off")),
        Param("ndcfg_stop", "float", 0.0, "NDCFG stop at",
              "Ratio of the steps with noise-damped CFG; 0 = the reference's value (or the dilation's).", 0.0, 1.0, 0.01),
        *(Param(f"level{n}", "float", 0.0, f"Level {n} dilation",
                f"Dilation of every 3x3 conv of the blocks at 1/{2 ** n} of the latent size, replacing the table's; "
                "0 = from the table, 1 = none." + (" SD1/SD2 only." if n == 3 else ""), 0.0, 8.0, 0.05, advanced=True)
          for n in range(LEVEL_PARAMS)),
        Param("disperse", "bool", False, "Dispersed convolution",
              "Replace the deep 3x3 kernels by 5x5 dispersed kernels at half the dilation (the reference ships but never runs it).",
              advanced=True),
        Param("disperse_stop", "float", 0.0, "Dispersion stop at",
              "Ratio of the steps with dispersed kernels; 0 = the dilation's window.", 0.0, 1.0, 0.01, advanced=True),
        Param("hires", "bool", True, "Apply in hires pass", "Also apply in the hires-fix pass, with settings for its size."),
    ),
    recommended={"sd1": {}, "sd2": {}, "sdxl": {}},
)


# --- reference settings ------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One shipped config: dilations by diffusers-name prefix (SD1 names), taus of 50 steps."""

    ratio: float  # target pixels / native pixels
    dilate: Mapping[str, float]
    tau: int
    ndcfg: Mapping[str, float] = field(default_factory=dict)
    ndcfg_tau: int = 0
    progressive: bool = False


def _uniform(d: float, *prefixes: str) -> dict[str, float]:
    return {p: d for p in prefixes}


_ALL7 = ("down_blocks.1", "down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2")
_SD_DEEP = {"down_blocks.1": 2, "down_blocks.2": 3, "down_blocks.3": 4, "mid_block": 4,
            "up_blocks.0": 4, "up_blocks.1": 3, "up_blocks.2": 2}
_SD1_NDCFG = {"down_blocks.2": 3, "down_blocks.3": 4, "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 3}
_SD2_NDCFG = {"down_blocks.2.resnets": 3, "down_blocks.2.downsamplers": 4, "down_blocks.3": 4, "mid_block": 4,
              "up_blocks.0": 4, "up_blocks.1": 4, "up_blocks.2": 3}
_SDXL_DEEP = _uniform(2, "down_blocks.3", "mid_block", "up_blocks.0")
_SDXL_4096 = {"down_blocks.3": 4, "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 3, "up_blocks.2": 2}

REFERENCE: dict[str, tuple[Config, ...]] = ByFamily({  # design doc 1.3: configs/*.yaml + assets/*_settings
    "sd1": (
        Config(4, _uniform(2, *_ALL7), 30),  # 1024x1024
        Config(6.25, _uniform(2.5, *_ALL7), 35),  # 1280x1280
        Config(8, _SD_DEEP, 35, _SD1_NDCFG, 35, True),  # 2048x1024
        Config(16, _SD_DEEP, 35, _SD1_NDCFG, 35, True),  # 2048x2048
    ),
    "sd2": (
        Config(4, _uniform(2, *_ALL7), 20),
        Config(6.25, _uniform(2.5, *_ALL7), 30),
        Config(8, _SD_DEEP, 37, _SD2_NDCFG, 0, True),  # ships NDCFG settings but ndcfg_tau 0
        Config(16, {**_SD2_NDCFG, "up_blocks.3.resnets": 2}, 37, _SD2_NDCFG, 37, True),
    ),
    "sdxl": (
        Config(4, _SDXL_DEEP, 30),  # 2048x2048
        Config(6.25, _uniform(2.5, "down_blocks.3", "mid_block", "up_blocks.0"), 30),  # 2560x2560
        Config(8, {"down_blocks.2": 3, **_SDXL_4096}, 35, _SDXL_DEEP, 35, True),  # 4096x2048
        Config(16, {"down_blocks.2": 4, **_SDXL_4096}, 35, _SDXL_DEEP, 35, True),  # 4096x4096
    ),
})
REFERENCE["sdxl_refiner"] = REFERENCE["sdxl"]
DISPERSE = ByFamily({  # assets/disperse_settings (2048x2048 / 4096x4096)
    "sd1": ("down_blocks.2.downsamplers", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1"),
    "sd2": ("down_blocks.2.downsamplers", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1"),
    "sdxl": ("down_blocks.2", "mid_block", "up_blocks.0"),
})
DISPERSE["sdxl_refiner"] = DISPERSE["sdxl"]


def sdxl_name(reference_name: str) -> str | None:
    """A name from the reference's SDXL tables (SD1 layout) as the SDXL module it was meant for:
    encoder blocks counted from the deepest level; None where SDXL has no counterpart."""
    parts = reference_name.split(".")
    if parts[0] != "down_blocks":
        return reference_name
    b = int(parts[1]) - 1
    return None if b < 0 else ".".join(["down_blocks", str(b), *parts[2:]])


def diffusers_name(ldm_name: str) -> str | None:
    """The diffusers name of an ldm/sgm 3x3 conv (design doc 0.2); None for other convs."""
    p = ldm_name.split(".")
    if p[0] == "input_blocks" and len(p) >= 4 and int(p[1]) > 0:
        b, r = divmod(int(p[1]) - 1, 3)
        if p[2:] == ["0", "op"]:
            return f"down_blocks.{b}.downsamplers.0.conv"
        conv = {"in_layers.2": "conv1", "out_layers.3": "conv2"}.get(".".join(p[3:]))
        return f"down_blocks.{b}.resnets.{r}.{conv}" if p[2] == "0" and conv else None
    if p[0] == "middle_block" and p[1] in ("0", "2"):
        conv = {"in_layers.2": "conv1", "out_layers.3": "conv2"}.get(".".join(p[2:]))
        return f"mid_block.resnets.{int(p[1]) // 2}.{conv}" if conv else None
    if p[0] == "output_blocks" and len(p) >= 4:
        b, r = divmod(int(p[1]), 3)
        if p[2] != "0" and p[3:] == ["conv"]:
            return f"up_blocks.{b}.upsamplers.0.conv"
        conv = {"in_layers.2": "conv1", "out_layers.3": "conv2"}.get(".".join(p[3:]))
        return f"up_blocks.{b}.resnets.{r}.{conv}" if p[2] == "0" and conv else None
    return None


def level_of(name: str, num_levels: int) -> int:
    """Resolution level of a diffusers conv name's block (an up block's upsampler counts with its block)."""
    kind, _, rest = name.partition(".")
    if kind == "mid_block":
        return num_levels - 1
    b = int(rest.split(".")[0])
    return b if kind == "down_blocks" else num_levels - 1 - b


def lookup(table: Mapping[str, float], name: str, family: str) -> float:
    """The table's dilation for a diffusers conv name: the longest matching prefix, else 1."""
    best, value = -1, 1.0
    for prefix, d in table.items():
        target = sdxl_name(prefix) if is_sdxl(family) else prefix
        if target and (name == target or name.startswith(target + ".")) and len(target) > best:
            best, value = len(target), float(d)
    return value


def native_size(family: str, values: Mapping[str, Any]) -> int:
    return native_latent_side(family) * PIXELS_PER_LATENT if values["native"] == "auto" else int(values["native"])


def choose_config(family: str, ratio: float) -> tuple[Config, float]:
    """The shipped config nearest in log pixel ratio, and k = sqrt(ratio / its ratio), the
    factor on its dilations: between and beyond the tables the dilation follows the linear size
    (the uniform tables are exactly d = sqrt(ratio)); at or below the native size every d <= 1."""
    configs = REFERENCE[family]
    config = min(configs, key=lambda c: (abs(math.log(ratio / c.ratio)), c.ratio))
    return config, math.sqrt(ratio / config.ratio)


# --- the plan for one pass -----------------------------------------------------------------

@dataclass
class Plan:
    """Base dilation per conv (ldm name) for the main and the NDCFG pass, and the windows."""

    dilate: dict[str, float]
    stop: float
    progressive: bool = False
    ndcfg: dict[str, float] | None = None  # None = NDCFG off; {} = unconditional branch undilated
    ndcfg_stop: float = 0.0
    disperse: frozenset[str] = frozenset()
    disperse_stop: float = 0.0

    @property
    def active(self) -> bool:
        return any(d > 1 for d in self.dilate.values()) or (self.ndcfg is not None and self.ndcfg_stop > 0)


def _scaled(d: float, k: float) -> float:
    return max(1.0, d * k) if d > 1 else 1.0


def make_plan(family: str, num_levels: int, conv_names: Mapping[str, str], ratio: float, values: Mapping[str, Any]) -> Plan:
    """conv_names: ldm name -> diffusers name of the convs to consider."""
    config, k = choose_config(family, ratio)
    k_user = k * values["scale"]
    dilate = {}
    for ldm, name in conv_names.items():
        override = values[f"level{level_of(name, num_levels)}"]  # 0 = from the table
        dilate[ldm] = max(1.0, override * values["scale"]) if override > 0 else _scaled(lookup(config.dilate, name, family), k_user)
    stop = values["stop"] or config.tau / 50
    ndcfg_on = values["ndcfg"] == "on" or (values["ndcfg"] == "auto" and config.ndcfg_tau > 0)
    ndcfg = {ldm: _scaled(lookup(config.ndcfg, name, family), k_user) for ldm, name in conv_names.items()} if ndcfg_on else None
    if ndcfg is not None and all(d <= 1 for d in (*ndcfg.values(), *dilate.values())):
        ndcfg = None  # at or below the native size: the milder pass would be the plain pass again (+50 % for nothing)
    ndcfg_stop = values["ndcfg_stop"] or (config.ndcfg_tau / 50 if config.ndcfg_tau else stop)
    progressive = values["progressive"] == "on" or (values["progressive"] == "auto" and config.progressive)
    disperse = frozenset(ldm for ldm, name in conv_names.items() if lookup(dict.fromkeys(DISPERSE[family], 2.0), name, family) > 1)
    return Plan(dilate, stop, progressive, ndcfg, ndcfg_stop,
                disperse if values["disperse"] else frozenset(), values["disperse_stop"] or stop)


def pixel_ratio(latent_size: tuple[int, int], native: int) -> float:
    """The image's pixel count over native x native (the tables' key)."""
    return latent_size[0] * latent_size[1] * 64 / native ** 2


def ndcfg_active(plan: Plan, step: int, total: int) -> bool:
    return plan.ndcfg is not None and step < int(plan.ndcfg_stop * total)


runs_in_pass = first_pass_or_hires_box


def progressive_dilation(d: float, tau: int, step: int) -> float:
    """The reference's schedule: ceil(d * (tau - i) / tau), at least 2 (always an integer)."""
    return float(max(math.ceil(d * (tau - step) / tau), 2))


def step_factors(plan: Plan, step: int, total: int, ndcfg_pass: bool = False) -> dict[str, tuple[float, bool]]:
    """(dilation s, dispersed) per conv that differs from the plain conv at this step; a
    dispersed 5x5 kernel already doubles the field, so its dilation is halved (at least 1)."""
    table, stop = (plan.ndcfg or {}, plan.ndcfg_stop) if ndcfg_pass else (plan.dilate, plan.stop)
    tau = int(stop * total)
    if step >= tau:
        return {}
    dispersed = step < int(plan.disperse_stop * total)
    out = {}
    for name, d in table.items():
        if d <= 1:
            continue
        s = progressive_dilation(d, tau, step) if plan.progressive else d
        if dispersed and name in plan.disperse:
            out[name] = (max(s / 2, 1.0), True)
        else:
            out[name] = (s, False)
    return out


# --- the conv operator ----------------------------------------------------------------------

def conv_output_size(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int]:
    """What the unpatched conv returns for an input of `size`."""
    return tuple(  # type: ignore[return-value]
        (n + 2 * p - dil * (k - 1) - 1) // s + 1
        for n, p, dil, k, s in zip(size, conv.padding, conv.dilation, conv.kernel_size, conv.stride)
    )


@contextmanager
def conv_attrs(conv: nn.Conv2d, **attrs: tuple[int, int]) -> Iterator[None]:
    """Temporarily change stride / padding / dilation, so the conv's own forward (and the
    WebUI's class-level LoRA Conv2d.forward) runs with them."""
    old = {name: getattr(conv, name) for name in attrs}
    for name, value in attrs.items():
        setattr(conv, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(conv, name, value)


def dilated_conv(conv: nn.Conv2d, x: torch.Tensor, d: int) -> torch.Tensor:
    with conv_attrs(conv, dilation=(d, d), padding=(d, d)):
        return type(conv).forward(conv, x)


def dispersed_conv(conv: nn.Conv2d, x: torch.Tensor, d: int, r: torch.Tensor) -> torch.Tensor:
    """The 5x5 kernel R.w with dilation d and padding 2d, through the conv's own 3x3 weight:
    conv5(x, R.w) = sum_j w_j * y_j with y_j = x correlated with R[:, j] (a fixed 5x5 filter per
    channel). The nine y_j are interleaved into a 3x3 pixel grid, which the conv reads with
    stride 3, so LoRA merged into the weight still applies."""
    channels = x.shape[1]
    taps = r.t().reshape(9, 1, 5, 5).to(x.dtype).to(x.device).repeat(channels, 1, 1, 1)  # row c*9 + j
    y = F.conv2d(x, taps, stride=conv.stride, padding=2 * d, dilation=d, groups=channels)
    with conv_attrs(conv, stride=(3, 3), padding=(0, 0), dilation=(1, 1)):
        return type(conv).forward(conv, F.pixel_shuffle(y, 3))


def redilate(conv: nn.Conv2d, x: torch.Tensor, s: float, r: torch.Tensor | None = None) -> torch.Tensor:
    """ReDilateConvProcessor: dilation d = ceil(s); for fractional s the input is resized by d/s
    (bilinear) first and the result resized back to the unpatched conv's output size (the
    reference uses int(H / stride), which differs for odd sizes). Integer s is a plain dilated
    conv with padding d (2d for a dispersed 5x5 kernel)."""
    d = math.ceil(s)
    out_size = conv_output_size(conv, tuple(x.shape[-2:]))
    if d != s:
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(round(h * d / s), round(w * d / s)), mode="bilinear", align_corners=False)
    y = dilated_conv(conv, x, d) if r is None else dispersed_conv(conv, x, d, r)
    if tuple(y.shape[-2:]) != out_size:
        y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
    return y


# --- noise-damped CFG -----------------------------------------------------------------------

# --- wiring ----------------------------------------------------------------------------------

class Runtime:
    """Per-pass state shared by the conv forwards, the UNet pre-hook and the NDCFG end hook."""

    def __init__(self, ctx: Any, values: Mapping[str, Any], convs: dict[str, str]) -> None:
        self.ctx, self.values, self.convs = ctx, values, convs
        self.native = native_size(ctx.map.family, values)
        self.plans: dict[tuple[int, int], Plan] = {}
        self.size: tuple[int, int] | None = None
        self.ndcfg_pass = False
        self.shift = ResultShift()  # uncond_mild - uncond_main of each image, still to place
        self._factors: dict[tuple[Any, ...], dict[str, tuple[float, bool]]] = {}
        self.warn_once = ctx.warner()

    def plan(self, size: tuple[int, int]) -> Plan:
        if size not in self.plans:
            self.plans[size] = plan_for(self.ctx.map, self.values, size, self.convs)
        return self.plans[size]

    def factors(self) -> dict[str, tuple[float, bool]]:
        if self.size is None:
            return {}
        clock = self.ctx.clock
        key = (self.size, clock.step, clock.total_steps, self.ndcfg_pass)
        if key not in self._factors:
            self._factors[key] = step_factors(self.plan(self.size), clock.step, clock.total_steps, self.ndcfg_pass)
        return self._factors[key]

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.ndcfg_pass:
            return
        x = args[0] if args else kwargs["x"]
        self.size = tuple(x.shape[-2:])  # type: ignore[assignment]

    def conv_forward(self, name: str, conv: nn.Conv2d) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            s, dispersed = self.factors().get(name, (1.0, False))
            if not dispersed and s == 1:
                return type(conv).forward(conv, x)
            return redilate(conv, x, s, dispersion_matrix() if dispersed else None)

        return forward

    def ndcfg_end(self, out: torch.Tensor, call: Any) -> torch.Tensor:
        """uncond_mild + sum_k w_k (cond_k - uncond_main) through the host's own CFG (reference
        text2image.py, step 3): the change uncond_mild - uncond_main of each image's result goes
        into the image's rows (rows.ResultShift); in one call with its cond rows, the uncond row
        becomes uncond_mild and the cond rows move with it."""
        plan = self.plan(self.size) if self.size else None
        clock = self.ctx.clock
        if self.ndcfg_pass or call.extra or plan is None or not ndcfg_active(plan, clock.step, clock.total_steps):
            return out
        rows = call.rows
        if rows is None or not rows.coefficients_known:
            return self._plain_cfg("the rows of this call are unknown", out)
        if any(r.kind == IMAGE for r in rows.evaluation.rows):
            return self._plain_cfg("an edit model guides with image rows too", out)
        if not self.shift.begin(rows):
            self._plain_cfg("the host's guidance gave no weight to an image's uncond row", out)
        uncond = rows.of(UNCOND)
        if uncond:
            mild = self.mild_pass(rows, uncond)
            for j, i in enumerate(uncond):
                self.shift.add(rows.rows[i].image, mild[j] - out[i])
        shift = self.shift.place(rows, out)
        return out if shift is None else out + shift

    def mild_pass(self, rows: CallRows, uncond: list[int]) -> torch.Tensor:
        """The whole UNet again, with every other technique, on the uncond rows only, with NDCFG's
        milder dilation (not a sampler call)."""
        self.ndcfg_pass = True
        try:
            return self.ctx.calls.rerun(self.ctx.unet, SPEC.id, rows, uncond)
        finally:
            self.ndcfg_pass = False

    def _plain_cfg(self, why: str, out: torch.Tensor) -> torch.Tensor:
        self.warn_once(f"NDCFG needs the cond and uncond rows of each image ({why}); plain CFG there")
        return out


def conv_names(umap: Any) -> dict[str, str]:
    """ldm name -> diffusers name of the 3x3 convs the reference's tables address."""
    return {name: dn for name, _, _ in umap.convs3x3 if (dn := diffusers_name(name))}


def plan_for(umap: Any, values: Mapping[str, Any], size: tuple[int, ...], convs: dict[str, str] | None = None) -> Plan:
    """The plan for a latent of `size` (h, w); inactive at or below the native pixel count."""
    ratio = pixel_ratio((size[0], size[1]), native_size(umap.family, values))
    return make_plan(umap.family, umap.num_levels, conv_names(umap) if convs is None else convs, ratio, values)


def idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    """Nothing to do at or below the native pixel count (NDCFG included: its milder pass would be
    the plain one); raises Refused on a UNet without the convs."""
    if umap is None:
        return None
    if not conv_names(umap):
        raise Refused("no ResBlock / Downsample / Upsample 3x3 convs found")
    if where.hw is None or plan_for(umap, values, where.hw).active:
        return None
    native = native_size(umap.family, values)
    return f"{where.hw[1] * 8}x{where.hw[0] * 8} is not above the native {native}x{native} pixel count"


def ndcfg_idle(values: dict[str, Any], umap: Any, where: Any) -> str | None:
    """Why the noise-damped CFG pass does not run in this pass (None: it does, or may)."""
    if umap is None or where.hw is None:
        return None if values["ndcfg"] != "off" else "noise-damped CFG is off"
    return None if plan_for(umap, values, where.hw).ndcfg is not None else "no noise-damped CFG at this size"


def apply(ctx: Any, values: dict[str, Any]) -> None:
    if not runs_in_pass(values, ctx.hires):
        return
    convs = conv_names(ctx.map)
    if not convs:
        raise Refused("no ResBlock / Downsample / Upsample 3x3 convs found")
    install(ctx, Runtime(ctx, values, convs))


def install(ctx: Any, rt: Runtime) -> None:
    """Wrap the convs' forwards, record the latent size of each call, hook NDCFG."""
    plan = None
    if ctx.latent_shape is not None:  # else the size is read from the first UNet call
        size = tuple(ctx.latent_shape[-2:])
        plan = rt.plan(size)
        if not plan.active:
            ctx.warn(f"{size[1] * 8}x{size[0] * 8} is not above the native {rt.native}x{rt.native} pixel count; nothing to do")
            return
    by_name = {name: conv for name, conv, _ in ctx.map.convs3x3}
    ctx.patcher.add_handle(ctx.unet.register_forward_pre_hook(rt.pre_hook, with_kwargs=True), ctx.technique)
    for name in rt.convs:
        ctx.patcher.set_attr(by_name[name], "forward", rt.conv_forward(name, by_name[name]), ctx.technique)
    if rt.values["ndcfg"] != "off" and (plan is None or plan.ndcfg is not None):
        try:
            ctx.hook("end", rt.ndcfg_end)
        except Refused as e:
            ctx.warn(f"noise-damped CFG needs the hooked UNet forward ({e}); re-dilation only")
