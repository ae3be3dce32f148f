"""The long soak: randomized generations through the WebUI stand-in on the tiny real UNets.

    python -m lib_unetmods.soak --runs 1000 --seed 7
    python -m lib_unetmods.soak --seed 7 --start 412 --runs 1 -v     # replay one run

Each run draws techniques, parameters (inside their declared ranges and at the edges), size,
batch, hires, img2img, a model switch and an injected interrupt or exception, runs the real
script (scripts/unetmods.py) through the WebUI stand-in and checks that every model is exactly
as built and that the outcome is an image or a declared message. Ends with the line
`runs=N failures=F leaks=L`; exits 1 if F or L is not 0.

It drives lab/soak_runner.py on the A1111 stand-in in lab/hosts/webui, the same script and
stand-in as the test suite (tests/test_soak.py runs a short soak in CI).
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from types import ModuleType

import torch

from .hosts import use_webui_standin
from .progress import fmt_time
from .random_unets import ARCHS




def load_runner() -> ModuleType:
    """lab/soak_runner.py on the WebUI stand-in, or a clear message when a real WebUI's
    `modules` is already loaded in this process."""
    try:
        use_webui_standin()
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    return importlib.import_module(f"{__package__}.soak_runner")


def kind_of(problem: str) -> str:
    """A problem without its numbers, for the tally: the error line of a traceback, or the first line."""
    lines = [line for line in problem.strip().splitlines() if line.strip()]
    line = lines[-1] if "Traceback" in problem else lines[0]
    return re.sub(r"\d+", "N", line.strip())[:120]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lib_unetmods.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100, help="generations to run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the whole soak: run i is drawn from (seed, i)")
    ap.add_argument("--start", type=int, default=0, help="index of the first run (replay a run with --runs 1)")
    ap.add_argument("--arch", action="append", choices=ARCHS, help="only these families (repeatable; default all)")
    ap.add_argument("--no-large", action="store_true", help="skip the rare runs above the native size (seconds each)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run's settings and outcome")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.start < 0:
        ap.error("--runs must be at least 1 and --start at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = load_runner()
    torch.set_num_threads(1)  # tiny UNets: more threads only add overhead (the models need no grad)
    archs = tuple(args.arch or ARCHS)
    harness = runner.Soak(archs)
    failures = leaks = 0
    outcomes: dict[str, int] = {}
    applied: dict[str, int] = {}
    kinds: dict[str, list[int]] = {}  # problem kind -> run indices
    started = time.perf_counter()
    last_progress = started
    for done, index in enumerate(range(args.start, args.start + args.runs), 1):
        result = harness.run(runner.draw_case(args.seed, index, archs, large=not args.no_large))
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
        for problem in result.problems + result.leaks:
            kinds.setdefault(kind_of(problem), []).append(index)
        for tid in set(result.applied):
            applied[tid] = applied.get(tid, 0) + 1
        failures += bool(result.problems)
        leaks += bool(result.leaks)
        if args.verbose or result.problems or result.leaks:
            print(f"{'FAIL' if result.problems or result.leaks else 'ok  '} {result.outcome:<11} {result.case.describe()}")
            for line in result.problems + result.leaks:
                print("    " + line.rstrip().replace("\n", "\n    "))
            if args.verbose:
                print(f"    applied: {', '.join(dict.fromkeys(result.applied)) or 'nothing'}")
                for message in result.messages:
                    print(f"    message: {message}")
            sys.stdout.flush()
        now = time.perf_counter()
        if now - last_progress > 10 or done == args.runs:
            last_progress = now
            per_run = (now - started) / done
            print(f"[soak] {done}/{args.runs} runs, {failures} failures, {leaks} leaks, {per_run:.2f} s/run, "
                  f"eta {fmt_time(per_run * (args.runs - done))}", file=sys.stderr, flush=True)
    final = harness.finish()
    for line in final:
        print("LEAK " + line)
    leaks += bool(final)
    elapsed = time.perf_counter() - started
    print(f"outcomes: {', '.join(f'{k}={v}' for k, v in sorted(outcomes.items()))}; {elapsed:.0f} s, "
          f"{elapsed / args.runs:.2f} s/run")
    print(f"runs in which each technique was applied (not refused): {', '.join(f'{k}={v}' for k, v in sorted(applied.items()))}")
    for kind, indices in sorted(kinds.items(), key=lambda item: -len(item[1])):
        print(f"{len(indices):>5} x {kind}   (runs {', '.join(map(str, indices[:10]))}{' ...' if len(indices) > 10 else ''})")
    print(f"runs={args.runs} failures={failures} leaks={leaks}")
    return 1 if failures or leaks else 0


if __name__ == "__main__":
    sys.exit(main())
