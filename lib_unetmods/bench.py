"""The benchmark: a UNet over a sampling schedule, with no mods, everything off, and each
technique (or --mods), on the same inputs, with the WebUI's default attention kernel (SDPA).

    python -m lib_unetmods.bench                      # SD1.5-sized UNet, 512x512, CPU
    python -m lib_unetmods.bench --arch sdxl --size 1024x1024 --steps 8 --mods "freeu" --json

Each round runs the baseline, every configuration (in reverse order every other round), and the
baseline again; a configuration's ratio in a round is the baseline time interpolated to its place
in the round (linear between the two baseline runs, so a machine that speeds up or slows down
during the round does not bias it) over its own time. The speed-up is the median over rounds,
with the min..max spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .apply import apply_mods
from .clock import StepClock
from .random_unets import ARCHS, build_unet, example_inputs, sdpa_attention, webui_cat_fix
from .sampler import euler_sample
from .settings import Settings
from .techniques import SPECS
from .unet_map import map_unet

DEFAULT_SIZE = "512x512"


@dataclass
class Config:
    label: str
    settings: Settings | None  # None = the plain UNet, nothing applied
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # interpolated baseline time / own time, per round
    peak_mem: int = 0
    output: torch.Tensor | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def mods(self) -> str:
        return "none" if self.settings is None else self.settings.to_text() or "(all off)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lib_unetmods.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=ARCHS, default="sd15")
    ap.add_argument("--size", default=DEFAULT_SIZE, help="image size WxH in pixels (latent = /8)")
    ap.add_argument("--steps", type=int, default=4, help="sampler steps per run")
    ap.add_argument("--batch", type=int, default=1, help="images per batch; the UNet sees cond + uncond rows")
    ap.add_argument("--mods", action="append", default=[],
                    help='canonical text, e.g. "freeu b1=1.3; tome ratio=0.5"; repeat for several configs '
                         "(default: each technique at its recommended settings)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of interleaved runs")
    ap.add_argument("--checkpoint", help="UNet state dict (.safetensors, ldm key names) instead of random weights")
    ap.add_argument("--unet-size", choices=("full", "tiny"), default="full",
                    help="tiny: 32 model channels, same layout (for quick checks)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--host", choices=("ldm", "forge", "controlnet"), default="ldm",
                    help="UNet host: the stand-ins of tests/hosts (Forge's UNet and batch layout, ControlNet's forward); "
                         "from a checkout only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object per configuration on stdout")
    ap.add_argument("--out", default="bench-out", help="folder for the chart")
    args = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size must be WxH, got {args.size!r}")
    if w % 8 or h % 8 or w <= 0 or h <= 0:
        ap.error(f"--size must be positive multiples of 8, got {args.size}")
    args.width, args.height = w, h
    return args


def load_unet(args: argparse.Namespace) -> nn.Module:
    unet = build_unet(args.arch, args.unet_size, seed=args.seed)
    if args.checkpoint:
        from safetensors.torch import load_file

        prefix = "model.diffusion_model."
        state = {k.removeprefix(prefix): v.float() for k, v in load_file(args.checkpoint).items()
                 if k.startswith(prefix) or not k.startswith("model.")}
        unet.load_state_dict(state, strict=True)
    return unet.to(args.device)


def host_unet(args: argparse.Namespace, unet: nn.Module) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """The UNet and its sampler on the chosen host; the stand-ins live in the checkout's tests/."""
    if args.host == "ldm":
        return unet, euler_sample
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from hosts import bench_host

    return bench_host(args.host, unet)


def make_configs(args: argparse.Namespace, family: str) -> list[Config]:
    configs = [Config("baseline", None), Config("all off", Settings())]
    if args.mods:
        return configs + [Config(text, Settings.from_text(text, strict=True)) for text in args.mods]
    for tid, spec in SPECS.items():
        configs.append(Config(tid, Settings({tid: spec.recommended_values(family)})))
    return configs


class PeakMemory:
    """Peak memory of a run above its start: the CUDA allocator's peak, or on CPU the peak
    resident set size sampled every 2 ms (a coarse but kernel-independent measure)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            out = fn()
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - start
            return out
        start = _rss()
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                peak[0] = max(peak[0], _rss())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            return fn()
        finally:
            done.set()
            thread.join()
            self.peak = max(peak[0], _rss()) - start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_config(unet: nn.Module, config: Config, inputs: dict, args: argparse.Namespace) -> float:
    clock = StepClock()
    clock.start(args.steps)
    applied = None
    if config.settings is not None:
        applied = apply_mods(unet, config.settings, clock, seed=args.seed, latent_shape=tuple(inputs["noise"].shape))
        config.messages = applied.messages
    memory = PeakMemory(torch.device(args.device))
    try:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = memory.run(lambda: args.sample(unet, inputs["noise"], inputs["cond"], inputs["uncond"], args.steps, clock,
                                              y=inputs["y"]))
        elapsed = time.perf_counter() - start
    finally:
        if applied is not None:
            applied.restore()
    config.times.append(elapsed)
    config.peak_mem = max(config.peak_mem, memory.peak)
    if config.output is None:
        config.output = out
    return elapsed


def rel_diff(config: Config, baseline: Config) -> float:
    return float((config.output - baseline.output).norm() / baseline.output.norm())


def fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def benchmark(args: argparse.Namespace) -> list[Config]:
    torch.manual_seed(args.seed)
    unet, args.sample = host_unet(args, load_unet(args))
    family = map_unet(unet).family
    configs = make_configs(args, family)
    sample_inputs = example_inputs(unet, batch=2 * args.batch, height=args.height // 8, width=args.width // 8, seed=args.seed)
    inputs = {
        "noise": sample_inputs["x"][: args.batch],
        "cond": sample_inputs["context"][: args.batch],
        "uncond": sample_inputs["context"][args.batch:],
        "y": None if sample_inputs["y"] is None else sample_inputs["y"][: args.batch],
    }
    baseline, others = configs[0], configs[1:]
    total = args.repeats * (len(others) + 2)
    done, started = 0, time.perf_counter()
    log = sys.stderr
    print(f"{args.arch} on {args.host} ({args.unet_size}, {family}) {args.width}x{args.height}, {args.steps} steps, "
          f"{2 * args.batch} UNet rows, {args.device}, SDPA attention: {total} runs", file=log)
    with ExitStack() as stack:
        stack.enter_context(sdpa_attention())
        stack.enter_context(webui_cat_fix())
        args.sample(unet, inputs["noise"], inputs["cond"], inputs["uncond"], 1, StepClock(), y=inputs["y"])  # warm-up
        for r in range(args.repeats):
            order = others if r % 2 == 0 else others[::-1]
            round_times = []
            for config in [baseline, *order, baseline]:
                round_times.append(run_config(unet, config, inputs, args))
                done += 1
                eta = (time.perf_counter() - started) / done * (total - done)
                print(f"[{done:>3}/{total}] round {r + 1}/{args.repeats}  {config.label:<14} {round_times[-1]:7.2f} s"
                      f"   eta {fmt_time(eta)}", file=log, flush=True)
            first, last = round_times[0], round_times[-1]
            for j, (config, elapsed) in enumerate(zip(order, round_times[1:-1])):
                config.ratios.append((first + (last - first) * (j + 1) / (len(order) + 1)) / elapsed)
            baseline.ratios.append(1.0)
    return configs


def report(configs: list[Config], args: argparse.Namespace) -> None:
    baseline = configs[0]
    rows = []
    for config in configs:
        ratios = config.ratios
        rows.append({
            "arch": args.arch, "host": args.host, "unet": args.unet_size, "size": f"{args.width}x{args.height}", "steps": args.steps,
            "batch": args.batch, "label": config.label, "mods": config.mods,
            "baseline_s": statistics.median(baseline.times), "patched_s": statistics.median(config.times),
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "rel_diff": rel_diff(config, baseline),
            "peak_mem_baseline": baseline.peak_mem, "peak_mem_patched": config.peak_mem,
            "device": args.device, "repeats": args.repeats, "messages": config.messages,
        })
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{'config':<14} {'speed-up':>9} {'spread':>13} {'time s':>8} {'peak MB':>8} {'rel diff':>9}  mods")
        for row in rows:
            print(f"{row['label']:<14} {row['speedup']:>8.3f}x {row['speedup_min']:>6.3f}-{row['speedup_max']:<6.3f}"
                  f" {row['patched_s']:>8.2f} {row['peak_mem_patched'] / 2**20:>8.0f} {row['rel_diff']:>9.2e}  {row['mods']}")
            for message in row["messages"]:
                print(f"{'':<14} note: {message}")
    chart(rows, args)


def chart(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_{args.arch}_{args.width}x{args.height}_{args.steps}steps.png")
    labels = [r["label"] for r in rows]
    values = [r["speedup"] for r in rows]
    errors = [[v - r["speedup_min"] for v, r in zip(values, rows)], [r["speedup_max"] - v for v, r in zip(values, rows)]]
    fig, ax = plt.subplots(figsize=(1.1 * len(rows) + 2, 4))
    ax.bar(labels, values, yerr=errors, capsize=4, color=["#888"] * 2 + ["#4a7"] * (len(rows) - 2))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speed-up vs baseline (median, min-max)")
    ax.set_title(f"{args.arch} {args.width}x{args.height}, {args.steps} steps, {args.device}, SDPA")
    for i, row in enumerate(rows):
        ax.annotate(f"{row['rel_diff']:.1e}", (i, values[i]), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 12), textcoords="offset points")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"chart: {path} (numbers above the bars: relative output difference)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    report(benchmark(args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
