"""The quality lab's rows, declared as params.py declares parameters: what each row runs (the
settings text, the scale, the steps, the CFG scale, a lab probe), what it is measured against,
whether the default set runs it, and what it decides.

A row runs on every lab model. Its settings are the text a user would type (`Settings.from_text`);
where blocks are numbered differently by layout, `mods` gives one text per layout ("sd1" or
"sdxl", the family's `layout`). A row's `reference` is another row (by identity, never by label):
the images its `distance` is measured against, at the same scale; None means the scale's plain row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

from ...families import layout

Scale = Union[int, str]  # 1, 2, 3 (times the training side) or "hires" (1x, then x2 at denoise 0.5)
SCALES: tuple[Scale, ...] = (1, 2, 3, "hires")
DEFAULT, ALL = "default", "all"


@dataclass(frozen=True, eq=False)  # rows are compared and hashed by identity
class Row:
    label: str
    mods: Union[str, Mapping[str, str]] = "none"  # settings text, or one per layout
    scale: Scale = 1
    half_steps: bool = False  # the yardstick: the same settings at half the steps
    cfg: float | None = None  # guidance scale, if not the lab's
    reference: "Row | None" = None  # distance to this row's images (None: the scale's plain row)
    probe: str | None = None  # a lab ablation of the UNet (sampling.PROBES), not a technique
    group: str = DEFAULT  # DEFAULT: the default run; ALL: only with --all
    decides: str = ""  # the question the row answers (README, "Quality lab")

    def mods_for(self, family: str) -> str:
        return self.mods if isinstance(self.mods, str) else self.mods[layout(family)]

    def describe(self, family: str) -> str:
        """The settings text, or the probe (with the settings it runs beside, if any)."""
        text = self.mods_for(family)
        if self.probe is None:
            return text
        return self.probe if text == "none" else f"{self.probe}; {text}"


def _plain(scale: Scale, cfg: float | None = None, group: str = DEFAULT) -> Row:
    return Row("plain" if cfg is None else f"plain, CFG {cfg:g}", scale=scale, cfg=cfg, group=group)


PLAIN: dict[Scale, Row] = {scale: _plain(scale) for scale in SCALES}
PLAIN_CFG = {cfg: _plain(1, cfg, ALL) for cfg in (1.0, 5.0)}
HIDIFFUSION_2X = Row("HiDiffusion", "hidiffusion", 2, decides="2x: HiDiffusion at its defaults")
HIDIFFUSION_1X_20 = Row("HiDiffusion", "hidiffusion", 1, group=ALL)
# Deep Shrink after block 6, for every step, runs the levels from the last one with attention down
# (level 2 in both layouts; SD1's level 3 is 2x2 at the lab's size) at half size and changes nothing else.
DEEP_PATH = "deep path: Deep Shrink after block 6"
# PAG's layer: its default (the middle block), the deepest output level's first attention block,
# the last attention block (the first lab model's choice: its middle block did nothing)
PAG_LAYERS: tuple[tuple[str, Union[str, Mapping[str, str]]], ...] = (
    ("", "pag"),
    (" on the deepest output level", {"sd1": "pag layers=output.3", "sdxl": "pag layers=output.0"}),
    (" on the last attention block", {"sd1": "pag layers=output.11", "sdxl": "pag layers=output.5"}),
)


def reference_of(row: Row) -> Row:
    return row.reference or PLAIN[row.scale]


def _rows() -> list[Row]:
    rows: list[Row] = [*PLAIN.values()]
    rows += [
        # the yardstick of every distance at 1x, and the deep-path rows: does the model use the
        # part the deep-path techniques change?
        Row("plain, half the steps", "none", 1, half_steps=True),
        Row(DEEP_PATH, "deepshrink block=6 end=1", 1, decides="whether the model uses its deep path (at least 0.01)"),
        Row("deep path: middle block removed", "none", 1, probe="no middle block",
            decides="whether the middle block (PAG's default layer) matters"),
        # each technique at its defaults at the training size
        Row("FreeU", "freeu", 1), Row("CD Tuner", "cdtuner auto_values=on", 1),
        Row("ToMe", "tome", 1), Row("ToDo", "todo", 1), Row("DeepCache", "deepcache", 1),
        Row("PAG", "pag", 1, decides="PAG at its defaults (middle block, CFG 3)"),
        # high resolution at 2x: each technique at its defaults and at the values recommended
        # for the family (auto values); the speed stack against HiDiffusion alone
        HIDIFFUSION_2X,
        Row("ScaleCrafter", "scalecrafter", 2, decides="2x: ScaleCrafter at its defaults"),
        Row("Deep Shrink", "deepshrink", 2, decides="2x: Deep Shrink at its defaults (block 3, end 0.35)"),
        Row("Deep Shrink, auto values", "deepshrink auto_values=on", 2,
            decides="2x: Deep Shrink at the family's recommended values"),
        Row("speed stack", "stack=fast", 2, reference=HIDIFFUSION_2X, decides="the stack's DeepCache"),
        Row("HiDiffusion, half the steps", "hidiffusion", 2, half_steps=True, reference=HIDIFFUSION_2X),
        # 3x: Deep Shrink's factor follows the scale
        Row("Deep Shrink factor 3", "deepshrink factor=3", 3, decides="3x: the best technique"),
        Row("ScaleCrafter", "scalecrafter", 3), Row("HiDiffusion", "hidiffusion", 3),
    ]
    rows += _sweeps()
    return rows


def _sweeps() -> list[Row]:
    """--all: the rows that settle a setting, and second settings."""
    stack_dc = {n: Row(f"speed stack, DeepCache 1 in {n}", f"stack=fast; deepcache interval={n}", 2, reference=HIDIFFUSION_2X,
                       group=ALL, decides="DeepCache's interval in stack=fast") for n in (2, 4)}
    rows = [
        Row("plain, half the steps", "none", 2, half_steps=True, group=ALL),
        Row("plain, half the steps", "none", "hires", half_steps=True, group=ALL),
        # Deep Shrink's block and window per scale
        *[Row(f"Deep Shrink block {b}", f"deepshrink block={b}", 2, group=ALL, decides="2x: Deep Shrink's block")
          for b in (1, 6)],
        Row("Deep Shrink, end 0.5", "deepshrink end=0.5", 2, group=ALL, decides="2x: Deep Shrink's window"),
        Row("Deep Shrink, smooth (SDXL preset)", "deepshrink preset=sdxl", 2, group=ALL),
        *[Row(f"Deep Shrink block {b}, factor 3", f"deepshrink block={b} factor=3", 3, group=ALL,
              decides="3x: Deep Shrink's block") for b in (1, 6)],
        Row("Deep Shrink factor 3, end 0.5", "deepshrink factor=3 end=0.5", 3, group=ALL, decides="3x: Deep Shrink's window"),
        Row("Deep Shrink factor 3, auto values", "deepshrink factor=3 auto_values=on", 3, group=ALL),
        # ScaleCrafter's parts per scale
        Row("ScaleCrafter without NDCFG", "scalecrafter ndcfg=off", 2, group=ALL, decides="ScaleCrafter's NDCFG"),
        Row("ScaleCrafter without NDCFG", "scalecrafter ndcfg=off", 3, group=ALL),
        Row("ScaleCrafter, not progressive", "scalecrafter progressive=off", 3, group=ALL),
        # HiDiffusion's parts and its SDXL settings
        Row("HiDiffusion RAU-Net only", "hidiffusion msw_msa=off", 2, group=ALL),
        # (auto: SD1 T1 0.4; SDXL T1 0.4, aggressive; RAU-Net at 3/8 on SD1, 6/2 on SDXL)
        *[Row(f"HiDiffusion, {name}", f"hidiffusion auto=off aggressive={on}", scale, group=ALL,
              decides="HiDiffusion's schedule per layout") for name, on in (("aggressive", "on"), ("not aggressive", "off"))
          for scale in (2, 3)],
        Row("HiDiffusion, RAU-Net at its other blocks", {"sd1": "hidiffusion rau_blocks=6/5", "sdxl": "hidiffusion rau_blocks=3/5"},
            2, group=ALL, decides="HiDiffusion's RAU-Net blocks"),
        # the speed techniques at 2x, where users reach for them; their depth on each layout
        Row("ToMe", "tome", 2, group=ALL),
        *[Row(f"ToMe to depth {d}", f"tome max_downsample={d}", 2, group=ALL, decides="ToMe's depth") for d in (2, 4)],
        Row("ToDo", "todo", 2, group=ALL),
        *[Row(f"ToDo to depth {d}", f"todo max_depth={d}", 2, group=ALL, decides="ToDo's max_depth") for d in (2, 3)],
        Row("HyperTile", "hypertile tile_size=128", 2, group=ALL), Row("DeepCache", "deepcache", 2, group=ALL),
        Row("FreeU", "freeu", 2, group=ALL),
        *stack_dc.values(),
        # PAG: whether it helps at CFG 1, 3 and 5 (against the unpatched model at the same CFG), and where
        *PLAIN_CFG.values(),
        *[Row(f"PAG{where}" + ("" if cfg is None else f", CFG {cfg:g}"), mods, 1, cfg=cfg,
              reference=None if cfg is None else PLAIN_CFG[cfg], group=ALL, decides="PAG's layer and CFG")
          for cfg in (1.0, None, 5.0) for where, mods in PAG_LAYERS if (cfg, where) != (None, "")],
        # the hires-fix path
        Row("Deep Shrink", "deepshrink", "hires", group=ALL), Row("HiDiffusion", "hidiffusion", "hires", group=ALL),
        # the stack at the training size (RAU-Net is off there; MSW-MSA runs), for --steps 20
        HIDIFFUSION_1X_20,
        Row("speed stack", "stack=fast", 1, reference=HIDIFFUSION_1X_20, group=ALL),
        Row("HiDiffusion, half the steps", "hidiffusion", 1, half_steps=True, reference=HIDIFFUSION_1X_20, group=ALL),
    ]
    return rows


ROWS: list[Row] = _rows()


def select(rows: list[Row], groups: tuple[str, ...] = (DEFAULT,), scales: set[Scale] | None = None, only: str = "",
           exclude: str = "") -> list[Row]:
    """The rows a run asks for: those of `groups`, at the given scales, whose label or settings
    contain one of `only`'s comma-separated texts and whose label contains none of `exclude`'s."""
    wanted = [o for o in only.split(",") if o]
    unwanted = [e for e in exclude.split(",") if e]

    def text(row: Row) -> str:
        return row.label + " " + (row.mods if isinstance(row.mods, str) else " ".join(row.mods.values()))

    return [r for r in rows if r.group in groups and (not scales or r.scale in scales)
            and (not wanted or any(o in text(r) for o in wanted)) and not any(e in r.label for e in unwanted)]
