"""ToDo against ToMe side by side, and PAG's cost, over several sizes in one run (not a test).

    python tests/bench_todo.py                                   # sd15 512/768/1024 and sdxl 1024, full UNets
    python tests/bench_todo.py --cases sd15:768 sdxl:1024 --rounds 3 --threads 2
    python tests/bench_todo.py --unet-size tiny --cases sd15:512 sd15:1024 sdxl:1024   # quick
    python tests/bench_todo.py --extra "todo max_depth=2" --extra "todo factor=3"     # more rows

Per case (architecture, square size): single UNet calls with cond + uncond rows (batch 2), SDPA
attention as in the WebUI, random weights, the A1111 batch layout; the baseline and every
configuration run interleaved in every round (order reversed every other round). A row's speed-up
is the median over rounds of baseline time / its time within the round (min-max over rounds);
`rel diff` is its distance to the unpatched output, |out - base| / |base|. PAG's row is the cost
of a step with its extra pass (speed-up below 1: cost = 1 / speed-up). CPU figures from a shared
machine are noisy: compare rows of one run only; process CPU time (with --threads 1) is steadier than wall time there.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_unetmods import Settings, StepClock, apply_mods  # noqa: E402
from lib_unetmods.a1111_call import evaluation  # noqa: E402
from lib_unetmods.lab import random_unets  # noqa: E402
from lib_unetmods.lab.bench_compare import unet_call  # noqa: E402
from lib_unetmods.lab.random_unets import build_unet, example_inputs, sdpa_attention, webui_cat_fix  # noqa: E402

DEFAULT = ("tome ratio=0.5", "todo factor=2", "pag")


def patched(unet: torch.nn.Module, inputs: dict, text: str) -> torch.Tensor:
    clock = StepClock()
    clock.start(1)
    clock.evaluate(evaluation([[1.0]], 7.0))  # cond row, then uncond row (A1111)
    applied = apply_mods(unet, Settings.from_text(text, strict=True), clock)
    try:
        return unet_call(unet, inputs)
    finally:
        applied.restore()


def run_case(arch: str, size: int, texts: list[str], rounds: int, unet_size: str) -> list[dict]:
    unet = build_unet(arch, unet_size)
    inputs = example_inputs(unet, batch=2, height=size // 8, width=size // 8)
    labels = ["none", *texts]
    times: dict[str, list[float]] = {k: [] for k in labels}
    cpu: dict[str, list[float]] = {k: [] for k in labels}  # process CPU time: steadier on a shared machine
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), sdpa_attention(), webui_cat_fix():
        unet_call(unet, inputs)  # warm-up
        for r in range(rounds):
            for label in labels[::1 if r % 2 == 0 else -1]:
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[label] = unet_call(unet, inputs) if label == "none" else patched(unet, inputs, label)
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
                print(f"{arch} {size} round {r + 1} {label:<28} {times[label][-1]:7.2f} s", file=sys.stderr, flush=True)
    base = outputs["none"]
    rows = []
    for label in texts:
        for clock, series in (("wall", times), ("cpu", cpu)):
            ups = [b / t for b, t in zip(series["none"], series[label])]
            rows.append({"arch": arch, "size": size, "unet": unet_size, "mods": label, "rounds": rounds, "clock": clock,
                         "time": statistics.median(series[label]), "baseline": statistics.median(series["none"]),
                         "speedup": statistics.median(ups), "speedup_min": min(ups), "speedup_max": max(ups),
                         "rel_diff": float((outputs[label] - base).norm() / base.norm())})
    del unet
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["sd15:512", "sd15:768", "sd15:1024", "sdxl:1024"],
                    help="ARCH:SIZE, e.g. sd15:768 (square, pixels)")
    ap.add_argument("--extra", action="append", default=[], help="another configuration in the text form")
    ap.add_argument("--no-pag", action="store_true", help="leave out PAG's row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unet-size", choices=("full", "tiny"), default="full")
    ap.add_argument("--sdxl-depth", type=int, default=None,
                    help="transformer depth at SDXL's lowest level (10 in SDXL; less keeps memory and time small)")
    ap.add_argument("--json", metavar="FILE", help="also write one JSON object per row to FILE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sdxl_depth is not None:
        random_unets.SDXL_DEPTH["full"] = (0, 2, args.sdxl_depth)
    texts = [t for t in DEFAULT if not (args.no_pag and t == "pag")] + args.extra
    for text in texts:
        Settings.from_text(text, strict=True)  # bad text: fail before any model is built
    rows = []
    for case in args.cases:
        arch, _, size = case.partition(":")
        rows += run_case(arch, int(size), texts, args.rounds, args.unet_size)
        for row in rows:
            if row["arch"] == arch and row["size"] == int(size):
                print(f"{arch:<5} {size:>5} {row['mods']:<28} {row['clock']:>4} {row['speedup']:6.3f}x "
                      f"({row['speedup_min']:.3f}-{row['speedup_max']:.3f}) rel diff {row['rel_diff']:.2e}", flush=True)
    print(f"\n{args.unet_size} UNets, batch 2 (cond+uncond), SDPA, {args.threads} threads, {args.rounds} rounds, CPU")
    print(f"{'arch':<5} {'size':>5} {'mods':<28} {'clock':>5} {'median s':>9} {'speed-up':>9} {'min-max':>13} {'rel diff':>9}")
    for row in rows:
        print(f"{row['arch']:<5} {row['size']:>5} {row['mods']:<28} {row['clock']:>5} {row['time']:>9.2f} {row['speedup']:>8.3f}x "
              f"{row['speedup_min']:>6.3f}-{row['speedup_max']:<6.3f} {row['rel_diff']:>9.2e}")
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
