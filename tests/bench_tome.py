"""Side-by-side timing of our ToMe and tomesd 0.1.3 against the unpatched UNet (not a test).

    python tests/bench_tome.py --arch sd15 --size 512 --rounds 3
    python tests/bench_tome.py --arch sdxl --size 1024 --rounds 2 --tomesd-max-downsample 1 2
    python tests/bench_tome.py --arch sdxl --sdxl-depth 2 --size 1024 --tomesd-max-downsample 2  # ~4 GB, not 10

Single UNet calls with cond + uncond rows (batch 2), SDPA attention as in the WebUI, random
weights; baseline, ours and tomesd run interleaved in every round (the order reversed every other
round), and the speed-up is the median over rounds of baseline time / patched time within the
round, in wall time and in process CPU time (steadier on a shared machine when run with
--threads 1). tomesd is only imported here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_unetmods import Settings, StepClock, apply_mods  # noqa: E402
from lib_unetmods.lab import random_unets  # noqa: E402
from lib_unetmods.lab.bench_compare import unet_call, with_tomesd  # noqa: E402  (the one copy, shipped)
from lib_unetmods.lab.random_unets import build_unet, example_inputs, sdpa_attention, webui_cat_fix  # noqa: E402


def ours(unet: nn.Module, inputs: dict, text: str) -> torch.Tensor:
    clock = StepClock()
    clock.start(1)
    applied = apply_mods(unet, Settings.from_text(text, strict=True), clock)
    try:
        return unet_call(unet, inputs)
    finally:
        applied.restore()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15", choices=("sd15", "sd21", "sdxl"))
    ap.add_argument("--size", type=int, default=512, help="square image size in pixels")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tomesd-max-downsample", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sdxl-depth", type=int, default=None,
                    help="transformer depth at SDXL's lowest level (10 in SDXL; less keeps memory small)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.sdxl_depth is not None:
        random_unets.SDXL_DEPTH["full"] = (0, 2, args.sdxl_depth)
    unet = build_unet(args.arch, "full")
    inputs = example_inputs(unet, batch=2, height=args.size // 8, width=args.size // 8)
    configs: dict[str, Callable[[], torch.Tensor]] = {
        "baseline": lambda: unet_call(unet, inputs),
        f"ours ratio={args.ratio}": lambda: ours(unet, inputs, f"tome ratio={args.ratio}"),
    }
    for md in args.tomesd_max_downsample:
        configs[f"tomesd ratio={args.ratio} max_downsample={md}"] = (
            lambda md=md: with_tomesd(unet, inputs, ratio=args.ratio, max_downsample=md, use_rand=False))
    times: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}
    outputs: dict[str, torch.Tensor] = {}
    with sdpa_attention(), webui_cat_fix():
        unet_call(unet, inputs)  # warm-up
        for r in range(args.rounds):
            for label in list(configs)[::1 if r % 2 == 0 else -1]:  # alternate the order: no position bias
                fn = configs[label]
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[label] = fn()
                times[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
                print(f"round {r + 1} {label:<36} {times[label][-1]:7.2f} s wall {cpu[label][-1]:7.2f} s cpu",
                      file=sys.stderr, flush=True)
    base = outputs["baseline"]
    depth = f", SDXL depth {random_unets.SDXL_DEPTH['full']}" if args.arch == "sdxl" else ""
    print(f"{args.arch}{depth} {args.size}x{args.size}, batch 2 (cond+uncond), SDPA, {args.threads} threads, {args.rounds} rounds")
    print(f"{'config':<38} {'clock':>5} {'median s':>9} {'speed-up':>9} {'min-max':>13} {'rel diff':>9}")
    for label in configs:
        diff = float((outputs[label] - base).norm() / base.norm())
        for name, series in (("wall", times), ("cpu", cpu)):
            ups = [b / t for b, t in zip(series["baseline"], series[label])]
            print(f"{label:<38} {name:>5} {statistics.median(series[label]):>9.2f} {statistics.median(ups):>8.3f}x"
                  f" {min(ups):>6.3f}-{max(ups):<6.3f} {diff:>9.2e}")
    ours_label = next(k for k in configs if k.startswith("ours"))
    for label in (k for k in configs if k.startswith("tomesd")):
        for name, series in (("wall", times), ("cpu", cpu)):
            ups = [t / o for o, t in zip(series[ours_label], series[label])]  # > 1: ours faster in that round
            print(f"ours vs {label:<30} {name:>5} tomesd time / ours time: median {statistics.median(ups):.3f}"
                  f" (min-max {min(ups):.3f}-{max(ups):.3f})")


if __name__ == "__main__":
    main()
