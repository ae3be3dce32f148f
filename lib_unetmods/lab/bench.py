"""The benchmark: a UNet over a short sampling schedule, without mods and with each technique at
its recommended settings (or --mods), on the same inputs, with the WebUI's default attention
kernel (SDPA). `python -m lib_unetmods.bench --help` lists the options.

    python -m lib_unetmods.bench                  # SD1.5-sized UNet, 384x384, 3 steps, 2 rounds: ~5 min on 2 cores
    python -m lib_unetmods.bench --full           # 512x512, 4 steps, 2 rounds: ~13 min
    python -m lib_unetmods.bench --checkpoint model.safetensors --size 768x768 --mods "tome ratio=0.5"
    python -m lib_unetmods.bench --compare tomesd --size 768x768

The baseline runs before the first configuration, between rounds and after the last; every other
round runs the configurations in reverse order. A configuration's ratio in a round is the
baseline time interpolated to its place (linear between the baseline runs around it, so a
machine that speeds up or slows down does not bias it) over its own time; the speed-up is the
median over rounds, with the min-max spread from 2 rounds on. A configuration in which every
technique had nothing to do (e.g. ScaleCrafter at the native size) is listed as a no-op and not
timed. Results are rewritten after every run (<out>/<settings>.jsonl, .txt, .png; raw runs in
.runs.jsonl), so Ctrl-C leaves a valid partial result.

torch is imported only after the options are parsed and checked (see bench_cli).
"""
from __future__ import annotations

import sys

from .bench_cli import BenchError, fail, parse_args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = None
    try:
        import torch

        from .bench_run import Bench, comparisons, table

        torch.set_grad_enabled(False)
        bench = Bench(args)
        bench.setup()
        bench.run()
    except BenchError as e:
        fail(str(e))
    except KeyboardInterrupt:
        if bench is None or not bench.runs:
            print("interrupted before the first run finished: no result", file=sys.stderr)
            return 130
        bench.interrupted = True
        bench.write()
        print(f"interrupted after {len(bench.runs)} runs: partial result below and in {bench.path}.*", file=sys.stderr)
    rows = bench.rows()
    if args.json:
        import json

        for row in rows:
            print(json.dumps(row))
    else:
        print(bench.title())
        print(table(rows))
        for line in comparisons(bench):
            print(line)
    print(f"results: {bench.path}.jsonl, .txt, .png (chart), .runs.jsonl", file=sys.stderr)
    return 130 if bench.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
