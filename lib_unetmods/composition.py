"""Which techniques can run together: one table, read by apply_mods and the README.

A rule looks at the settings and the model and, where two techniques clash, turns the loser
(or one of its parameters) off and says so. Rules run in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .settings import Settings
from .techniques.hidiffusion import msw_level, pool_pair, rau_pair
from .techniques.hypertile import tiled_levels
from .techniques.tome import resolve_max_downsample
from .unet_map import UNetMap


@dataclass(frozen=True)
class Rule:
    techniques: tuple[str, str]
    policy: str  # one sentence for the README and the message
    applies: Callable[[Settings, UNetMap], bool]
    resolve: Callable[[Settings, UNetMap], None]


def _turn_off(tid: str, param: str = "enabled") -> Callable[[Settings, UNetMap], None]:
    return lambda settings, umap: settings[tid].__setitem__(param, False)


def tome_max_level(values: dict, family: str) -> int:
    """Deepest level ToMe merges: downsampling 2**level <= max_downsample."""
    return resolve_max_downsample(values["max_downsample"], family).bit_length() - 1


def _tome_hypertile_overlap(settings: Settings, umap: UNetMap) -> bool:
    ht, tome = settings["hypertile"], settings["tome"]
    if not (tome["merge_attn"] and (ht["first_pass"] or ht["hires"])):
        return False
    return any(level <= tome_max_level(tome, umap.family) for level in tiled_levels(umap, ht["max_depth"]))


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
         "Deep Shrink is turned off while ScaleCrafter is on.",
         lambda settings, umap: True, _turn_off("deepshrink")),
    Rule(("scalecrafter", "hidiffusion"),
         "ScaleCrafter and HiDiffusion's RAU-Net both correct the deep blocks for the large size (dilating vs resizing): "
         "RAU-Net is turned off while ScaleCrafter is on; MSW-MSA stays.",
         lambda settings, umap: bool(settings["hidiffusion"].get("rau_net")), _turn_off("hidiffusion", "rau_net")),
)


# HiDiffusion's parts yield to the dedicated technique on the same layers.
def _msw_level(settings: Settings, umap: UNetMap) -> int | None:
    """The level HiDiffusion's MSW-MSA windows, or None when it is off."""
    return msw_level(umap) if settings["hidiffusion"]["msw_msa"] else None


def _hypertile_overlaps_msw(settings: Settings, umap: UNetMap) -> bool:
    level = _msw_level(settings, umap)
    return level is not None and level in tiled_levels(umap, settings["hypertile"]["max_depth"])


def _tome_overlaps_msw(settings: Settings, umap: UNetMap) -> bool:
    level = _msw_level(settings, umap)
    tome = settings["tome"]
    return level is not None and bool(tome["merge_attn"]) and level <= tome_max_level(tome, umap.family)


_HIDIFFUSION = (
    Rule(("hidiffusion", "deepshrink"),
         "HiDiffusion RAU-Net and Deep Shrink both resize the deep features: Deep Shrink wins, RAU-Net is off "
         "(HiDiffusion's MSW-MSA still runs).",
         lambda s, m: bool(s["hidiffusion"]["rau_net"]), _turn_off("hidiffusion", "rau_net")),
    Rule(("hidiffusion", "hypertile"),
         "HyperTile and HiDiffusion MSW-MSA would both tile the same self-attention layers: HyperTile wins, MSW-MSA is "
         "off (HiDiffusion's RAU-Net still runs).",
         _hypertile_overlaps_msw, _turn_off("hidiffusion", "msw_msa")),
    Rule(("hidiffusion", "tome"),
         "ToMe merges the tokens of the self-attention layers HiDiffusion MSW-MSA windows (out of spatial order): ToMe "
         "wins, MSW-MSA is off (HiDiffusion's RAU-Net still runs).",
         _tome_overlaps_msw, _turn_off("hidiffusion", "msw_msa")),
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
    return min(pool_pair(umap, hd["pool_blocks"])[0], rau_pair(umap, hd["rau_blocks"])[0])


def _cap_cache_level(first_block: Callable[[Settings, UNetMap], int]) -> Callable[[Settings, UNetMap], None]:
    def resolve(settings: Settings, umap: UNetMap) -> None:
        settings["deepcache"]["level"] = first_block(settings, umap) - 1

    return resolve


_DEEPCACHE = (
    Rule(("deepcache", "deepshrink"),
         "DeepCache's cache level reaches the block Deep Shrink resizes after: the level is lowered below that block "
         "so a cached tensor always has the size the cheap step expects.",
         lambda s, m: s["deepcache"]["level"] >= _shrink_block(s, m), _cap_cache_level(_shrink_block)),
    Rule(("deepcache", "hidiffusion"),
         "DeepCache's cache level reaches the blocks HiDiffusion resizes: the level is lowered below them so a cached "
         "tensor always has the size the cheap step expects.",
         lambda s, m: s["hidiffusion"]["rau_net"] and s["deepcache"]["level"] >= _hidiffusion_block(s, m),
         _cap_cache_level(_hidiffusion_block)),
)

RULES: tuple[Rule, ...] = (*_TOME, *_SCALECRAFTER, *_HIDIFFUSION, *_DEEPCACHE)


def resolve_conflicts(settings: Settings, umap: UNetMap) -> tuple[Settings, list[str]]:
    settings = settings.copy()
    notes = []
    for rule in RULES:
        a, b = rule.techniques
        if all(t in settings.values and settings[t]["enabled"] for t in (a, b)) and rule.applies(settings, umap):
            rule.resolve(settings, umap)
            notes.append(rule.policy)
    return settings, notes
