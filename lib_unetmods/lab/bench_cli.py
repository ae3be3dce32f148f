"""The benchmark's command line: one table of options, and every check that can fail done
before a model is built. Errors are one line on stderr and exit code 2, as argparse's own.

torch is not imported until the options have been parsed, so `--help` is instant; the checks
that need it (--device, --mods) import it afterwards.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

from .bench_checkpoint import BenchError, inspect_checkpoint  # BenchError lives there: no cycle, no torch

ARCHS = ("sd15", "sd21", "sdxl")  # as lib_unetmods.lab.random_unets.ARCHS (importing it would import torch)
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}  # the unet_map family of each architecture
HOSTS = ("ldm", "forge", "controlnet")  # as lib_unetmods.lab.hosts.HOSTS (importing it would import torch)
COMPARE = {"tomesd": ("tomesd",), "deepcache": ("DeepCache", "diffusers")}  # --compare name: modules it needs
PROG = "python -m lib_unetmods.bench"

# The default run and --full (today's long run). The default's cost with the full-size SD1.5 UNet
# on a quiet 2-core CPU: about 15 run-equivalents x 3 steps x ~5 s per UNet call at 384x384, plus
# the build and a warm-up call: ~4.5 min (448x448 measured 50 min under a load of 10-15, i.e. too
# close to 6 min when quiet). 3 steps is the fewest at which every technique acts: Deep Shrink's
# recommended window (35 % of the steps) covers step 0 and DeepCache (interval 3) has cheap steps.
QUICK = {"size": (384, 384), "steps": 3, "repeats": 2}
FULL = {"size": (512, 512), "steps": 4, "repeats": 2}

DESCRIPTION = """\
Times a UNet over a short sampling schedule (cond + uncond rows, torch SDPA attention as in the
WebUI) without mods and with each technique at its recommended settings (or --mods), on the same
inputs, in interleaved rounds; prints the median speed-up with its spread, the peak memory and
the output's difference from the unpatched UNet, and writes them to --out as they come."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH in pixels, e.g. 512x512, got {text!r}") from None
    if w < 64 or h < 64 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"width and height must be multiples of 8 and at least 64, got {text}")
    return w, h


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str
    kwargs: dict[str, Any]


def opt(*flags: str, help: str, **kwargs: Any) -> Option:
    return Option(flags, help, kwargs)


# One row per option. Defaults of None are resolved in resolve() (they depend on --full or the checkpoint).
OPTIONS: tuple[Option, ...] = (
    opt("--arch", choices=ARCHS, default=None,
        help="UNet architecture (default: the checkpoint's, else sd15)"),
    opt("--size", type=image_size, default=None, metavar="WxH",
        help="image size in pixels; the latent is 1/8 of it (default: %dx%d; with --full %dx%d)"
             % (*QUICK["size"], *FULL["size"])),
    opt("--steps", type=positive_int, default=None,
        help=f"sampler steps per run (default: {QUICK['steps']}; with --full {FULL['steps']})"),
    opt("--repeats", "--rounds", dest="repeats", type=positive_int, default=None,
        help=f"rounds of interleaved runs; a spread needs 2 or more (default: {QUICK['repeats']}; "
             f"with --full {FULL['repeats']})"),
    opt("--full", action="store_true",
        help="the long run: %dx%d, %d steps, %d rounds (about 13 minutes on a quiet 2-core CPU)"
             % (*FULL["size"], FULL["steps"], FULL["repeats"])),
    opt("--batch", type=positive_int, default=1,
        help="images per batch; the UNet sees cond + uncond rows, 2 per image (default: 1)"),
    opt("--mods", action="append", default=[], metavar="TEXT",
        help='one configuration in the infotext\'s text form, e.g. "freeu b1=1.3; tome ratio=0.5"; repeat '
             "for several; a technique named twice is merged left to right (default: each technique at "
             "its recommended settings)"),
    opt("--compare", action="append", default=[], choices=tuple(COMPARE),
        help="also run a reference package next to ours on the same UNet and inputs: tomesd (with our "
             "ToMe) or deepcache (the DeepCache package on the same weights converted to diffusers)"),
    opt("--checkpoint", default=None, metavar="FILE",
        help="weights from a .safetensors checkpoint (full SD1.x/SD2.x/SDXL, or UNet only) instead of "
             "random ones; the architecture is read from its keys"),
    opt("--unet-size", choices=("full", "tiny"), default="full",
        help="tiny: 32 model channels, same layout, for quick checks (default: full)"),
    opt("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)"),
    opt("--host", choices=HOSTS, default="ldm",
        help="the UNet's host: ldm (A1111), forge (Forge's UNet and batch layout) or controlnet (ControlNet's "
             "forward, control inactive), on the lab's stand-ins of those hosts (lib_unetmods/lab/hosts; "
             "default: ldm)"),
    opt("--threads", type=positive_int, default=None,
        help="torch CPU threads (default: torch's choice, usually one per core)"),
    opt("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)"),
    opt("--json", action="store_true", help="print one JSON object per configuration on stdout at the end"),
    opt("--out", default="bench-out", metavar="DIR",
        help="folder for the results: <settings>.jsonl, .txt, .runs.jsonl and the .png chart (default: bench-out)"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        fail(message)


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="Expected time with the defaults: about 5 minutes on a quiet 2-core CPU (printed "
                        "before the runs start, from a measured warm-up call).")
    for option in OPTIONS:
        ap.add_argument(*option.flags, help=option.help, **option.kwargs)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check everything that needs no model; exits with code 2 and one line on error."""
    args = build_parser().parse_args(argv)
    try:
        resolve(args)
    except BenchError as e:
        fail(str(e))
    return args


def resolve(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on other options and check what the parser cannot."""
    preset = FULL if args.full else QUICK
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.width, args.height = args.size
    args.checkpoint_info = None
    if args.checkpoint:
        info = inspect_checkpoint(args.checkpoint)
        if args.arch is not None and args.arch != info.arch:
            raise BenchError(f"--arch {args.arch} does not match the checkpoint, whose keys are those of {info.arch} "
                             f"({info.reason})")
        args.arch, args.unet_size, args.checkpoint_info = info.arch, info.size, info
    args.arch = args.arch or "sd15"
    for name in args.compare:
        missing = [m for m in COMPARE[name] if importlib.util.find_spec(m) is None]
        if missing:
            raise BenchError(f"--compare {name} needs the {' and '.join(missing)} package(s): "
                             f"pip install -r dev/requirements-test.txt")
        if name == "deepcache" and args.arch == "sdxl":
            raise BenchError("--compare deepcache runs the DeepCache package's SD helper on a diffusers copy of "
                             "the UNet, which the benchmark converts for SD1.x/SD2.x only")
    if args.host != "ldm" and args.compare:
        raise BenchError("--compare runs on --host ldm only")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise BenchError(f"--out {args.out}: {e.strerror}") from None
    check_device(args.device)
    args.configs = parse_mods(args.mods, FAMILY[args.arch])


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BenchError(f"--device {device!r} is not a device name (cpu, cuda, cuda:N)") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise BenchError(f"--device {device}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise BenchError(f"--device {device}: no CUDA GPU available (torch {torch.__version__} is {build})")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def parse_mods(texts: list[str], family: str) -> list[tuple[str, Any, list[str]]]:
    """(text, Settings, notes) per --mods (`stack=NAME` expands for `family`); a bad text is a
    BenchError naming it."""
    from ..settings import Settings, SettingsError

    out = []
    for text in texts:
        try:
            settings = Settings.from_text(text, strict=True, family=family)
        except SettingsError as e:
            raise BenchError(f"--mods {text!r}: {e}") from None
        if not settings.enabled_ids():
            raise BenchError(f"--mods {text!r}: no technique switched on in it")
        out.append((text, settings, merged_notes(text)))
    return out


def merged_notes(text: str) -> list[str]:
    """Say which techniques were named more than once (Settings merges them left to right)."""
    names = [part.split()[0] for part in text.split(";") if part.strip()]
    twice = sorted({n for n in names if names.count(n) > 1}, key=names.index)
    return [f"{n} is named {names.count(n)} times: merged left to right (later values win)" for n in twice]

