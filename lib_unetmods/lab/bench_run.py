"""The benchmark's runs: configurations, the interleaved schedule, timing and peak memory, and the
results written after every run (so an interrupted run leaves a valid partial result)."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from argparse import Namespace
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn

from . import bench_chart, bench_compare
from ..apply import apply_mods
from .bench_checkpoint import load_unet_weights
from .bench_cli import BenchError
from .progress import fmt_time
from ..clock import StepClock
from .random_unets import build_unet, example_inputs, sdpa_attention, webui_cat_fix
from ..schedules import sigma_to_t
from .sampler import euler_sample, sd_sigmas
from ..settings import Settings
from ..techniques import SPECS
from ..unet_map import map_unet


@dataclass
class Config:
    label: str
    mods: str  # what runs, in words
    settings: Settings | None = None  # ours, through apply_mods
    wrap: Callable[[nn.Module], ContextManager[Any]] | None = None  # a reference package's patch around a run
    model: str = "ldm"  # which UNet runs: "ldm", or "diffusers" (the --compare deepcache copy)
    reference: str = "baseline"  # the configuration its speed-up and output difference are taken against
    notes: list[str] = field(default_factory=list)
    compare_with: str | None = None  # a reference package's run: the label of our configuration it mirrors
    noop: str = ""  # why it is not timed: nothing was installed
    unchanged: bool = False  # timed, but its output is bit-identical to the reference's
    output: torch.Tensor | None = None
    peak: int | None = None


@dataclass
class Run:
    index: int
    round: int
    label: str
    seconds: float
    peak: int


# --- peak memory ----------------------------------------------------------------------------

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> Callable[[], int] | None:
    """Bytes the C allocator has handed out and not freed (glibc mallinfo2: heap + mmapped
    blocks), which torch's CPU tensors come from; None where it does not exist."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return in_use


MALLOC_IN_USE = _malloc_in_use()


def measured(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, int | None]:
    """(output, seconds, peak bytes allocated above the start). CUDA: the allocator's peak. CPU:
    the C allocator's bytes in use, sampled every 2 ms from a thread."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_mem = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return out, time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - start_mem
    if MALLOC_IN_USE is None:
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start, None
    base = MALLOC_IN_USE()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], MALLOC_IN_USE())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        out = fn()
        return out, time.perf_counter() - start, max(peak[0], MALLOC_IN_USE()) - base
    finally:
        done.set()
        thread.join()


# --- the benchmark --------------------------------------------------------------------------

class Bench:
    def __init__(self, args: Namespace, log: Any = sys.stderr) -> None:
        self.args = args
        self.log = log
        self.device = torch.device(args.device)
        self.runs: list[Run] = []
        self.interrupted = False
        self.tag = file_tag(args)
        self.path = os.path.join(args.out, self.tag)
        self.models: dict[str, nn.Module] = {}
        self.heartbeat_s = 60.0
        self.current: tuple[str, StepClock, float] | None = None  # the run in progress: label, clock, start

    def say(self, text: str) -> None:
        print(text, file=self.log, flush=True)

    # --- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        args = self.args
        if args.threads:
            torch.set_num_threads(args.threads)
        what = f"{args.arch} UNet ({args.unet_size}" + (f", weights of {os.path.basename(args.checkpoint)})" if
                                                         args.checkpoint else ", random weights)")
        self.say(f"building the {what} ...")
        start = time.perf_counter()
        unet = build_unet(args.arch, args.unet_size, seed=args.seed)
        if args.checkpoint_info is not None:
            load_unet_weights(unet, args.checkpoint_info)
        self.models["ldm"], self.host_sample = host_unet(args.host, unet.to(self.device))
        self.family = map_unet(unet).family
        batch = args.batch
        sample = example_inputs(unet, batch=2 * batch, height=args.height // 8, width=args.width // 8, seed=args.seed)
        self.inputs = {"noise": sample["x"][:batch], "cond": sample["context"][:batch],
                       "uncond": sample["context"][batch:], "y": None if sample["y"] is None else sample["y"][:batch]}
        self.configs = make_configs(args, self.family)
        if "deepcache" in args.compare:
            self.models["diffusers"] = bench_compare.DiffusersAsLdm(
                bench_compare.diffusers_unet(unet, args.arch, args.unet_size))
        self.say(f"built in {time.perf_counter() - start:.0f} s")
        for config in self.configs:
            self.probe(config)
        self.timed = [c for c in self.configs[1:] if not c.noop]

    def probe(self, config: Config) -> None:
        """Apply and take off once: keep the messages; nothing installed = a no-op, not timed."""
        if config.settings is None:
            return
        clock = StepClock()
        clock.start(self.args.steps)
        applied = apply_mods(self.models[config.model], config.settings, clock, seed=self.args.seed,
                             latent_shape=tuple(self.inputs["noise"].shape))
        applied.restore()
        config.notes += applied.messages
        if applied.patcher is None:
            config.noop = "; ".join(applied.messages) or "every technique off: nothing is installed on the UNet"

    # --- runs ----------------------------------------------------------------------------
    def sample(self, model: nn.Module, clock: StepClock, steps: int) -> torch.Tensor:
        i = self.inputs
        sample = self.host_sample if model is self.models["ldm"] else euler_sample
        return sample(model, i["noise"], i["cond"], i["uncond"], steps, clock, y=i["y"])

    def run_config(self, config: Config) -> tuple[float, int | None]:
        model = self.models[config.model]
        clock = StepClock()
        clock.start(self.args.steps)
        self.current = (config.label, clock, time.perf_counter())
        with ExitStack() as stack:
            stack.callback(setattr, self, "current", None)
            if config.settings is not None:
                applied = apply_mods(model, config.settings, clock, seed=self.args.seed,
                                     latent_shape=tuple(self.inputs["noise"].shape))
                stack.callback(applied.restore)
            if config.wrap is not None:
                stack.enter_context(config.wrap(model))
            out, seconds, peak = measured(lambda: self.sample(model, clock, self.args.steps), self.device)
        if config.output is None:
            config.output = out
            reference = self.config(config.reference)
            if config is not reference and reference.output is not None and torch.equal(out, reference.output):
                config.unchanged = True
        if peak is not None:
            config.peak = max(config.peak or 0, peak)
        return seconds, peak

    def config(self, label: str) -> Config:
        return next(c for c in self.configs if c.label == label)

    def schedule(self) -> list[tuple[int, Config]]:
        """baseline, round 1, baseline, round 2 (reversed), baseline, ...: every configuration
        sits between two baseline runs; reversing cancels a drift's effect on the order."""
        baseline = self.configs[0]
        plan = [(0, baseline)]
        for r in range(self.args.repeats):
            order = self.timed if r % 2 == 0 else self.timed[::-1]
            plan += [(r, c) for c in order] + [(r, baseline)]
        return plan

    def run(self) -> None:
        args = self.args
        plan = self.schedule()
        with ExitStack() as stack:
            stack.enter_context(sdpa_attention())
            stack.enter_context(webui_cat_fix())
            stop = threading.Event()
            stack.callback(stop.set)
            threading.Thread(target=self._heartbeat, args=(stop,), daemon=True).start()
            start = time.perf_counter()
            for model in self.models.values():  # warm-up: first calls allocate and pick kernels
                self.sample(model, StepClock(), 1)
            per_step = time.perf_counter() - start
            expected = per_step * args.steps * len(plan)
            self.say(f"{args.arch} on {args.host} ({args.unet_size}, {self.family}) {args.width}x{args.height}, {args.steps} steps, "
                     f"{2 * args.batch} UNet rows, {args.device}, {torch.get_num_threads()} threads, SDPA attention: "
                     f"{len(plan)} runs in {args.repeats} rounds; warm-up {per_step:.1f} s per step, so expect about "
                     f"{fmt_time(expected)} (less for the techniques that save time)")
            for c in self.configs:
                if c.noop:
                    self.say(f"  {c.label}: not timed, it does nothing here ({c.noop})")
            started = time.perf_counter()
            for index, (r, config) in enumerate(plan):
                seconds, peak = self.run_config(config)
                self.runs.append(Run(index, r, config.label, seconds, peak or 0))
                self.write(run=self.runs[-1])
                done = index + 1
                eta = (time.perf_counter() - started) / done * (len(plan) - done)
                row = next(row for row in self.rows() if row["label"] == config.label)
                ratio = f"{row['speedup']:.3f}x" if row["speedup"] is not None else ""
                self.say(f"[{done:>3}/{len(plan)}] round {r + 1}/{args.repeats}  {config.label:<16} {seconds:7.2f} s"
                         f"  {ratio:>7}   eta {fmt_time(eta)}")
                if config is self.configs[0] and index > 0:
                    self.say(table(self.rows(), heading=f"after round {r + 1} of {args.repeats}:"))

    def _heartbeat(self, stop: threading.Event) -> None:
        """A line every heartbeat_s while a run lasts that long (a 1024x1024 step takes about a
        minute on a 2-core CPU): its step and the time it still needs at its pace so far."""
        while not stop.wait(self.heartbeat_s):
            current = self.current
            if current is None:
                continue
            label, clock, began = current
            elapsed, done, steps = time.perf_counter() - began, clock.step, self.args.steps
            left = f", about {fmt_time(elapsed / done * (steps - done))} left in this run" if done else ""
            self.say(f"      {label}: step {min(done + 1, steps)}/{steps}, {fmt_time(elapsed)} so far{left}")

    # --- results -------------------------------------------------------------------------
    def ratios(self, config: Config) -> list[float]:
        """Per run of `config`: the reference's time at that point over its own time. The main
        baseline's time is interpolated between the baseline runs around it (only the one
        before, while the next has not run yet); another reference is its run in the same round."""
        own = [run for run in self.runs if run.label == config.label]
        if config.reference == self.configs[0].label:
            base = [run for run in self.runs if run.label == config.reference]
            out = []
            for run in own:
                before = max((b for b in base if b.index < run.index), key=lambda b: b.index)
                after = min((b for b in base if b.index > run.index), key=lambda b: b.index, default=None)
                ref = before.seconds if after is None else (
                    before.seconds + (after.seconds - before.seconds) * (run.index - before.index) / (after.index - before.index))
                out.append(ref / run.seconds)
            return out
        ref = {run.round: run.seconds for run in self.runs if run.label == config.reference}
        return [ref[run.round] / run.seconds for run in own if run.round in ref]

    def rows(self) -> list[dict[str, Any]]:
        args = self.args
        baseline = self.configs[0]
        base_times = [run.seconds for run in self.runs if run.label == baseline.label]
        rows = []
        for config in self.configs:
            times = [run.seconds for run in self.runs if run.label == config.label]
            if not times and not config.noop:
                continue
            ratios = [1.0] * len(times) if config is baseline else self.ratios(config)
            reference = self.config(config.reference)
            diff = None
            if config.noop:
                diff = 0.0
            elif config is not baseline and config.output is not None and reference.output is not None:
                diff = float((config.output - reference.output).norm() / reference.output.norm())
            spread = len(ratios) >= 2 and config is not baseline
            rows.append({
                "arch": args.arch, "host": args.host, "unet": args.unet_size, "size": f"{args.width}x{args.height}", "steps": args.steps,
                "batch": args.batch, "device": args.device, "threads": torch.get_num_threads(),
                "checkpoint": args.checkpoint, "label": config.label, "mods": config.mods,
                "reference": config.reference, "reference_run": config.model != "ldm" or config.wrap is not None,
                "noop": config.noop or None, "unchanged": config.unchanged,
                "ranked": not (config.noop or config.unchanged) and config is not baseline and bool(ratios),
                "rounds": len(ratios),
                "speedup": statistics.median(ratios) if ratios and not config.noop else None,
                "speedup_min": min(ratios) if spread else None, "speedup_max": max(ratios) if spread else None,
                "baseline_s": statistics.median(base_times) if base_times else None,
                "patched_s": statistics.median(times) if times else None,
                "rel_diff": diff,
                "peak_mem_baseline": baseline.peak, "peak_mem_patched": baseline.peak if config.noop else config.peak,
                "repeats": args.repeats, "messages": config.notes,
            })
        return rows

    def write(self, run: Run | None = None) -> None:
        """Append the run to <tag>.runs.jsonl; rewrite <tag>.jsonl, .txt and .png from all runs."""
        rows = self.rows()
        if run is not None:
            with open(self.path + ".runs.jsonl", "a") as f:
                f.write(json.dumps(run.__dict__) + "\n")
        _replace(self.path + ".jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        status = "INTERRUPTED, partial result" if self.interrupted else f"{len(self.runs)} of {len(self.schedule())} runs"
        _replace(self.path + ".txt", f"{self.title()}\n{status}\n\n{table(rows)}\n")
        bench_chart.draw(rows, f"{self.title()}\n({status})", self.path + ".png")

    def title(self) -> str:
        a = self.args
        weights = os.path.basename(a.checkpoint) if a.checkpoint else "random weights"
        host = "" if a.host == "ldm" else f" on the {a.host} stand-in"
        return (f"{a.arch} UNet ({a.unet_size}, {weights}){host}, {a.width}x{a.height}, {a.steps} steps, batch {a.batch} "
                f"({2 * a.batch} UNet rows), {a.repeats} rounds, {a.device}, {torch.get_num_threads()} threads, "
                f"SDPA, fp32")


def host_unet(host: str, unet: nn.Module) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """The UNet to patch and its sampler on the chosen host (lab/hosts)."""
    if host == "ldm":
        return unet, euler_sample
    from .hosts import bench_host

    return bench_host(host, unet)


def _replace(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def file_tag(args: Namespace) -> str:
    """The settings in the file name, so runs with other settings do not overwrite each other."""
    parts = [f"bench_{args.arch}" + ("" if args.unet_size == "full" else f"-{args.unet_size}"),
             f"{args.width}x{args.height}", f"{args.steps}steps", f"{args.repeats}rounds", f"b{args.batch}",
             args.device.replace(":", "")]
    if args.host != "ldm":
        parts.append(args.host)
    if args.threads:
        parts.append(f"{args.threads}threads")
    if args.checkpoint:
        parts.append(os.path.splitext(os.path.basename(args.checkpoint))[0])
    if args.mods:
        parts.append("mods-" + hashlib.sha1("\n".join(args.mods).encode()).hexdigest()[:8])
    if args.compare:
        parts.append("vs-" + "-".join(args.compare))
    return "_".join(parts)


def make_configs(args: Namespace, family: str) -> list[Config]:
    configs = [Config("baseline", "none (the unpatched UNet)"), Config("all off", "every technique declared, off",
                                                                      Settings())]
    if args.configs:
        configs += [Config(text, s.to_text(), s, notes=list(notes)) for text, s, notes in args.configs]
    else:
        configs += [Config(tid, f"{tid} {spec.to_text(spec.recommended_values(family))}",
                           Settings({tid: spec.recommended_values(family)})) for tid, spec in SPECS.items()]
    for name in args.compare:
        configs += compare_configs(name, args, family, configs)
    return configs


def _ours(tid: str, args: Namespace, family: str, configs: list[Config]) -> Config:
    """Our configuration for technique `tid` in the comparison: the first --mods that enables it
    alone, else its recommended settings (added when not among the configurations already)."""
    for c in configs:
        if c.settings is not None and c.settings.enabled_ids() == [tid]:
            return c
    values = SPECS[tid].recommended_values(family)
    config = Config(tid, f"{tid} {SPECS[tid].to_text(values)}", Settings({tid: values}))
    configs.append(config)
    return config


def compare_configs(name: str, args: Namespace, family: str, configs: list[Config]) -> list[Config]:
    if name == "tomesd":
        ours = _ours("tome", args, family, configs)
        options = bench_compare.tomesd_options(ours.settings["tome"], family)
        text = " ".join(f"{k}={v}" for k, v in options.items())
        return [Config("tomesd", f"tomesd 0.1.3 {text}", wrap=lambda unet: bench_compare.tomesd_patch(unet, **options),
                       compare_with=ours.label)]
    ours = _ours("deepcache", args, family, configs)
    values = ours.settings["deepcache"]
    if values["schedule"] != "uniform":
        raise BenchError("--compare deepcache: the package's SD helper runs the uniform schedule only")
    timesteps = torch.tensor([sigma_to_t(float(s)) for s in sd_sigmas(args.steps)[:-1]])

    def helper(model: nn.Module) -> ContextManager[Any]:
        return bench_compare.deepcache_helper(model, timesteps, values["interval"], values["level"])

    return [Config("diffusers UNet", "the same weights as a diffusers UNet2DConditionModel, no mods", model="diffusers",
                   notes=["the DeepCache package's own baseline (a second copy of the weights)"]),
            Config("DeepCache pkg", f"DeepCache 0.1.1 uniform interval={values['interval']} branch={values['level']}",
                   wrap=helper, model="diffusers", reference="diffusers UNet", compare_with=ours.label)]


def table(rows: list[dict[str, Any]], heading: str = "") -> str:
    """Ranked configurations by speed-up, then the unranked (no-op, unchanged output) ones."""
    baseline = [r for r in rows if r["label"] == "baseline"]
    ranked = sorted((r for r in rows if r["ranked"]), key=lambda r: -r["speedup"])
    rest = [r for r in rows if r["label"] != "baseline" and not r["ranked"]]
    lines = [heading] if heading else []
    lines.append(f"{'config':<16} {'speed-up':>9} {'spread':>13} {'time s':>8} {'peak MB':>8} {'rel diff':>9}  mods")
    for r in baseline + ranked + rest:
        if r["noop"]:
            lines.append(f"{r['label']:<16} {'no-op':>9}   not timed: {r['noop']}")
            continue
        speed = f"{r['speedup']:.3f}x" if r["speedup"] is not None else "-"
        spread = f"{r['speedup_min']:.3f}-{r['speedup_max']:.3f}" if r["speedup_min"] is not None else "-"
        peak = f"{r['peak_mem_patched'] / 2**20:.0f}" if r["peak_mem_patched"] is not None else "-"
        diff = f"{r['rel_diff']:.2e}" if r["rel_diff"] is not None and r["label"] != "baseline" else "-"
        ref = "" if r["reference"] == "baseline" or r["label"] == "baseline" else f" [vs {r['reference']}]"
        same = " [output unchanged: not ranked]" if r["unchanged"] else ""
        lines.append(f"{r['label']:<16} {speed:>9} {spread:>13} {r['patched_s']:>8.2f} {peak:>8} {diff:>9}  "
                     f"{r['mods']}{ref}{same}")
        lines += [f"{'':<16} note: {m}" for m in r["messages"]]
    return "\n".join(lines)


def comparisons(bench: Bench) -> list[str]:
    """One line per --compare: both speed-ups and the difference between the two outputs."""
    rows = {r["label"]: r for r in bench.rows()}
    lines = []
    for config in bench.configs:
        ours_label = config.compare_with
        if ours_label is None or config.label not in rows or ours_label not in rows:
            continue
        ours, ref = bench.config(ours_label), rows[config.label]
        diff = float((config.output - ours.output).norm() / ours.output.norm()) if config.output is not None and \
            ours.output is not None else float("nan")
        speed = rows[ours_label]["speedup"]
        lines.append(f"{ours_label} (ours) {speed:.3f}x vs {config.label} {ref['speedup']:.3f}x"
                     f" (each against its own unpatched UNet); outputs differ by {diff:.2e} (relative)")
    return lines
