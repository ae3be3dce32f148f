"""The benchmark's chart: one horizontal bar per timed configuration (median speed-up, min-max
whiskers), its values written beside the bar, the settings in the title and in the file name.
Configurations that did nothing are listed under the chart instead of drawn as bars."""
from __future__ import annotations

import os
import textwrap
from typing import Any


def draw(rows: list[dict[str, Any]], title: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # ranked bars by speed-up (fastest on top), then the baseline and the unranked ones below it
    ranked = sorted((r for r in rows if r["ranked"]), key=lambda r: r["speedup"])
    others = [r for r in rows if r["speedup"] is not None and not r["ranked"]]
    timed = others[::-1] + ranked
    skipped = [r for r in rows if r["speedup"] is None]
    height = 1.2 + 0.42 * max(len(timed), 1)
    fig, ax = plt.subplots(figsize=(9, height + 0.9))
    labels = [r["label"] + (" (output unchanged)" if r["unchanged"] else "") +
              (f" [vs {r['reference']}]" if r["reference"] != "baseline" else "") for r in timed]
    values = [r["speedup"] for r in timed]
    lows = [r["speedup_min"] if r["speedup_min"] is not None else v for r, v in zip(timed, values)]
    highs = [r["speedup_max"] if r["speedup_max"] is not None else v for r, v in zip(timed, values)]
    colors = ["#aaaaaa" if not r["ranked"] else "#3b8f5a" if v >= 1 else "#c0503c" for r, v in zip(timed, values)]
    ax.barh(range(len(timed)), values, color=colors, height=0.6, tick_label=labels,
            xerr=[[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]], capsize=3)
    ax.axvline(1.0, color="k", lw=0.8)
    right = max(highs + [1.0])
    for i, r in enumerate(timed):
        text = f"{values[i]:.2f}x"
        if r["speedup_min"] is not None:
            text += f" ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
        if r["label"] != "baseline":
            text += f"  diff {r['rel_diff']:.1e}" if r["rel_diff"] is not None else ""
        if r["peak_mem_patched"] is not None:
            text += f"  {r['peak_mem_patched'] / 2**20:.0f} MB"
        ax.text(highs[i] + 0.01 * right, i, text, va="center", fontsize=8)
    ax.set_xlim(0, right + 0.75 * max(right, 1.5))  # room for the value labels right of the bars
    ax.set_xlabel("speed-up vs the unpatched UNet (median over rounds; whiskers min-max)")
    ax.set_title("\n".join(line for part in title.split("\n") for line in textwrap.wrap(part, 100)), fontsize=9)
    caption = ("Beside each bar: median (min-max over rounds) speed-up, relative output difference from the "
               "unpatched UNet, peak working memory during a run. Grey: not ranked (the baseline itself, or the "
               "output is bit-identical to the baseline's).")
    if skipped:
        caption += " Not timed (did nothing): " + "; ".join(f"{r['label']}" for r in skipped) + "."
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(caption, 130)), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.07 * 4 / (height + 0.9) + 0.02, 1, 1))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
