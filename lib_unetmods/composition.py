"""Which techniques can run together: one table, read by apply_mods and the README.

A rule looks at the settings and the model and, where two techniques clash, turns the loser
(or one of its parameters) off and says so. Rules run in order, and only between techniques
(or parts) that would really act in this pass: a technique with nothing to do on this image
(ScaleCrafter at the native size, Deep Shrink outside its window...) costs the other nothing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from .acts import PassInfo, idle_reason
from .forward import Refused
from .settings import Settings
from .techniques import hidiffusion, scalecrafter, todo, tome
from .techniques.hidiffusion import msw_level, pool_pair, rau_pair
from .techniques.hypertile import split_levels
from .unet_map import UNetMap


@dataclass(frozen=True)
class Rule:
    techniques: tuple[str, str]
    policy: str  # one sentence for the README and the message
    applies: Callable[[Settings, UNetMap, PassInfo], bool]
    resolve: Callable[[Settings, UNetMap], None]
    parts: tuple[str, ...] = ()  # parts that must act as well, e.g. "hidiffusion.rau_net"


def _turn_off(tid: str, param: str = "enabled") -> Callable[[Settings, UNetMap], None]:
    return lambda settings, umap: settings[tid].__setitem__(param, False)


def tome_max_level(values: dict, family: str) -> int:
    """Deepest level ToMe merges: downsampling 2**level <= max_downsample."""
    return tome.resolve_max_downsample(values["max_downsample"], family).bit_length() - 1


def _tome_hypertile_overlap(settings: Settings, umap: UNetMap, where: PassInfo) -> bool:
    ht, tome = settings["hypertile"], settings["tome"]
    if not tome["merge_attn"]:
        return False
    return any(level <= tome_max_level(tome, umap.family) for level in split_levels(umap, ht, where.hw))


_TOME = (
    Rule(("tome", "hypertile"),
         "ToMe + HyperTile: both would act on the same self-attention layers and tiles of merged tokens are not "
         "spatial, so HyperTile keeps self-attention and ToMe's attention merging (merge_attn) is off; its "
         "cross-attention and MLP merging still apply.",
         _tome_hypertile_overlap, _turn_off("tome", "merge_attn")),
)


# ScaleCrafter widens the deep convs' receptive field for a large latent; Deep Shrink and RAU-Net
# instead shrink the deep features back towards the native size in the same early steps. Both
# together would correct the same blocks twice (dilated convs over features already at native
# size), so ScaleCrafter, set up for the image size, keeps the deep blocks; HiDiffusion keeps
# its window attention (MSW-MSA), which touches no conv.
_SCALECRAFTER = (
    Rule(("scalecrafter", "deepshrink"),
         "ScaleCrafter and Deep Shrink both correct the deep blocks for the large size (dilating vs shrinking): "
         "Deep Shrink is turned off while ScaleCrafter acts.",
         lambda settings, umap, where: True, _turn_off("deepshrink")),
    Rule(("scalecrafter", "hidiffusion"),
         "ScaleCrafter and HiDiffusion's RAU-Net both correct the deep blocks for the large size (dilating vs resizing): "
         "RAU-Net is turned off while ScaleCrafter acts.",
         lambda settings, umap, where: True, _turn_off("hidiffusion", "rau_net"), parts=("hidiffusion.rau_net",)),
)


# HiDiffusion's parts yield to the dedicated technique on the same layers.
def _msw_level(settings: Settings, umap: UNetMap) -> int | None:
    """The level HiDiffusion's MSW-MSA windows, or None when it is off."""
    return msw_level(umap) if settings["hidiffusion"]["msw_msa"] else None


def _hypertile_overlaps_msw(settings: Settings, umap: UNetMap, where: PassInfo) -> bool:
    level = _msw_level(settings, umap)
    return level is not None and level in split_levels(umap, settings["hypertile"], where.hw)


def _tome_overlaps_msw(settings: Settings, umap: UNetMap, where: PassInfo) -> bool:
    level = _msw_level(settings, umap)
    tome = settings["tome"]
    return level is not None and bool(tome["merge_attn"]) and level <= tome_max_level(tome, umap.family)


_HIDIFFUSION = (
    Rule(("hidiffusion", "deepshrink"),
         "HiDiffusion RAU-Net and Deep Shrink both resize the deep features: Deep Shrink wins, RAU-Net is off.",
         lambda s, m, w: True, _turn_off("hidiffusion", "rau_net"), parts=("hidiffusion.rau_net",)),
    Rule(("hidiffusion", "hypertile"),
         "HyperTile and HiDiffusion MSW-MSA would both tile the same self-attention layers: HyperTile wins, MSW-MSA is "
         "off.",
         _hypertile_overlaps_msw, _turn_off("hidiffusion", "msw_msa"), parts=("hidiffusion.msw_msa",)),
    Rule(("hidiffusion", "tome"),
         "ToMe merges the tokens of the self-attention layers HiDiffusion MSW-MSA windows (out of spatial order): ToMe "
         "wins, MSW-MSA is off.",
         _tome_overlaps_msw, _turn_off("hidiffusion", "msw_msa"), parts=("hidiffusion.msw_msa",)),
)

# DeepCache reuses the tensor entering output_blocks[L-k]; where a resizer acts at or above input
# block k, that tensor's size depends on whether the step it came from was resized, so the cache
# level is kept above (shallower than) the first resized block.
def _shrink_block(settings: Settings, umap: UNetMap) -> int:
    ds = settings["deepshrink"]
    return min(ds["block"], ds["block2"]) if ds["end2"] > ds["end"] else ds["block"]


def _hidiffusion_block(settings: Settings, umap: UNetMap) -> int:
    """RAU-Net's first resized input block (its RAD or its pooled pair)."""
    hd = settings["hidiffusion"]
    try:
        return min(pool_pair(umap, hd["pool_blocks"])[0], rau_pair(umap, hd["rau_blocks"])[0])
    except Refused:  # blocks that do not fit this model: RAU-Net is skipped with its own message
        return sys.maxsize


def _cap_cache_level(first_block: Callable[[Settings, UNetMap], int]) -> Callable[[Settings, UNetMap], None]:
    def resolve(settings: Settings, umap: UNetMap) -> None:
        settings["deepcache"]["level"] = first_block(settings, umap) - 1

    return resolve


_DEEPCACHE = (
    Rule(("deepcache", "deepshrink"),
         "DeepCache's cache level reaches the block Deep Shrink resizes after: the level is lowered below that block "
         "so a cached tensor always has the size the cheap step expects.",
         lambda s, m, w: s["deepcache"]["level"] >= _shrink_block(s, m), _cap_cache_level(_shrink_block)),
    Rule(("deepcache", "hidiffusion"),
         "DeepCache's cache level reaches the blocks HiDiffusion resizes: the level is lowered below them so a cached "
         "tensor always has the size the cheap step expects.",
         lambda s, m, w: s["deepcache"]["level"] >= _hidiffusion_block(s, m),
         _cap_cache_level(_hidiffusion_block), parts=("hidiffusion.rau_net",)),
)

# ToDo keeps every query and downsamples keys/values: with the other self-attention savers on the
# same layers it wins over the ones that reorder or window tokens (ToMe, MSW-MSA: their tokens have
# no spatial grid left to downsample) and runs inside HyperTile's wrapper (on the calls HyperTile
# splits, each tile attends in full; the calls it leaves whole, too small to split, are downsampled).
def todo_max_level(values: dict, family: str) -> int:
    return todo.resolve_max_depth(values["max_depth"], family) - 1


def _todo_levels(settings: Settings, umap: UNetMap) -> set[int]:
    return {a.level for a in umap.self_attention(todo_max_level(settings["todo"], umap.family))}


_TODO = (
    Rule(("todo", "tome"),
         "ToDo + ToMe: both would reduce the same self-attention layers; ToDo keeps every query and downsamples keys "
         "and values, so ToMe's attention merging (merge_attn) is off; its cross-attention and MLP merging still apply.",
         lambda s, m, w: bool(s["tome"]["merge_attn"]) and any(l <= tome_max_level(s["tome"], m.family) for l in _todo_levels(s, m)),
         _turn_off("tome", "merge_attn")),
    Rule(("todo", "hidiffusion"),
         "ToDo + HiDiffusion MSW-MSA: both act on the same self-attention layers; ToDo keeps global attention on "
         "downsampled keys, so MSW-MSA is off.",
         lambda s, m, w: _msw_level(s, m) in _todo_levels(s, m), _turn_off("hidiffusion", "msw_msa"),
         parts=("hidiffusion.msw_msa",)),
    Rule(("todo", "hypertile"),
         "ToDo + HyperTile: on the same self-attention layers HyperTile tiles first and each tile attends in full; "
         "ToDo downsamples the keys of the calls HyperTile leaves whole (layers too small to split at this size).",
         lambda s, m, w: bool(_todo_levels(s, m) & split_levels(m, s["hypertile"], w.hw)), lambda s, m: None),
)

# PAG and ScaleCrafter's noise-damped CFG each add a pass and change different rows: both run. NDCFG
# replaces the uncond rows by a milder-dilated pass, PAG adds scale * (cond - perturbed cond), where the
# perturbed pass runs with the main pass's dilation (so the difference is the attention perturbation
# alone); neither extra pass runs the other's (forward.CallTracker.rerun).
_PAG = (
    Rule(("pag", "scalecrafter"),
         "PAG + ScaleCrafter noise-damped CFG: both extra passes run (about one extra full UNet pass per step): "
         "guided = NDCFG result + PAG scale * (cond - perturbed cond), the perturbed pass dilated as the main one.",
         lambda s, m, w: True, lambda s, m: None, parts=("scalecrafter.ndcfg",)),
)

RULES: tuple[Rule, ...] = (*_TOME, *_TODO, *_SCALECRAFTER, *_HIDIFFUSION, *_DEEPCACHE, *_PAG)


_PART_IDLE: dict[str, Callable[[dict, UNetMap, PassInfo], str | None]] = {
    "hidiffusion.rau_net": hidiffusion.rau_idle,
    "hidiffusion.msw_msa": hidiffusion.msw_idle,
    "scalecrafter.ndcfg": scalecrafter.ndcfg_idle,
}


def acting(settings: Settings, umap: UNetMap, where: PassInfo) -> set[str]:
    """Techniques (and parts, "technique.part") that would act in this pass: each technique's
    own idle() says (acts.py), as for the infotext, the messages and the preview."""
    out = set()
    for tid, values in settings.values.items():
        try:
            if idle_reason(tid, values, umap, where) is None:
                out.add(tid)
        except Refused:  # it cannot run here at all: it is skipped with its own message
            pass
    for part, idle in _PART_IDLE.items():
        tid = part.partition(".")[0]
        try:
            if tid in out and idle(settings[tid], umap, where) is None:
                out.add(part)
        except Refused:
            pass
    return out


def _hidiffusion_left(after: dict) -> tuple[bool, str]:
    """After rules took part of HiDiffusion: whether it stays on, and what is left of it."""
    if not (after["rau_net"] or after["msw_msa"]):
        return False, "Nothing is left of HiDiffusion: it is off for this pass."
    return True, f"HiDiffusion runs with {'MSW-MSA' if after['msw_msa'] else 'RAU-Net'} only."


def resolve_conflicts(settings: Settings, umap: UNetMap, where: PassInfo | None = None) -> tuple[Settings, list[str]]:
    """Apply the rules whose techniques (and parts) would all act in this pass; each note once.
    Without `where`, every enabled technique is assumed to act."""
    where = where or PassInfo()
    settings = settings.copy()
    notes: list[str] = []
    took_hidiffusion = None  # index of the last note that took a part of HiDiffusion
    for rule in RULES:
        live = acting(settings, umap, where)
        if all(t in live for t in (*rule.techniques, *rule.parts)) and rule.applies(settings, umap, where):
            before = dict(settings.values.get("hidiffusion", {}))
            rule.resolve(settings, umap)
            if rule.policy not in notes:
                notes.append(rule.policy)
            if before and settings["hidiffusion"] != before:
                took_hidiffusion = notes.index(rule.policy)
    if took_hidiffusion is not None:  # say what is left of it in the same note, not in a contradicting one
        settings["hidiffusion"]["enabled"], left = _hidiffusion_left(settings["hidiffusion"])
        notes[took_hidiffusion] += f" {left}"
    return settings, notes
