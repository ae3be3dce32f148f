"""The benchmark's command line: --help imports no torch and shows defaults, every bad option or --mods
text is one line on stderr with exit code 2 before any model is built, --mods merges a technique
named twice."""
import os
import subprocess
import sys

import pytest
import torch

from lib_unetmods.lab import bench, bench_cli, bench_run
from lib_unetmods.lab.random_unets import ARCHS
from lib_unetmods.settings import Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lib_unetmods.bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_help_shows_defaults_and_imports_no_torch():
    """--help is instant because it imports no torch (checked by import, not by a clock: CI
    machines are shared)."""
    result = run_cli("--help")
    assert result.returncode == 0
    for option in bench_cli.OPTIONS:
        assert option.flags[0] in result.stdout
    for default in ("default: 384x384", "default: 3", "default: cpu", "default: bench-out", "default: 1)"):
        assert default in result.stdout, default
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom lib_unetmods.lab import bench\n"
                            "try:\n    bench.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
                            "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr


def test_archs_match_the_unet_builder():
    assert bench_cli.ARCHS == ARCHS


BAD = [
    (["--mods", "tome ratio=banana"], "tome.ratio"),
    (["--mods", "nosuch x=1"], "unknown technique 'nosuch'"),
    (["--mods", "tome enabled=false"], "no technique"),
    (["--steps", "-1"], "--steps: must be at least 1"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["--repeats", "0"], "--repeats/--rounds: must be at least 1"),
    (["--batch", "0"], "--batch: must be at least 1"),
    (["--batch", "two"], "expected a whole number"),
    (["--size", "500x500"], "multiples of 8"),
    (["--size", "big"], "expected WxH"),
    (["--arch", "sd3"], "invalid choice"),
    (["--compare", "nosuch"], "invalid choice"),
    (["--device", "tpu:x"], "--device"),
    (["--checkpoint", "/nonexistent/model.safetensors"], "no such file"),
    (["--nosuch"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_are_one_line_exit_2_before_any_model(argv, expected, capsys, monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(bench_run, "build_unet", lambda *a, **k: built.append(a))
    with pytest.raises(SystemExit) as exc:
        bench.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("python -m lib_unetmods.bench: error: ") and expected in lines[0], lines[0]
    assert not built


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_says_so(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "no CUDA GPU available" in capsys.readouterr().err


def test_subprocess_error_has_no_traceback(tmp_path):
    result = run_cli("--mods", "tome ratio=banana", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_full_and_explicit_values(tmp_path):
    quick = bench_cli.parse_args(["--out", str(tmp_path)])
    full = bench_cli.parse_args(["--full", "--out", str(tmp_path)])
    mine = bench_cli.parse_args(["--full", "--steps", "7", "--size", "640x512", "--out", str(tmp_path)])
    assert (quick.steps, quick.repeats, quick.width) == (bench_cli.QUICK["steps"], bench_cli.QUICK["repeats"],
                                                          bench_cli.QUICK["size"][0])
    assert (full.steps, full.repeats, full.width) == (bench_cli.FULL["steps"], bench_cli.FULL["repeats"],
                                                      bench_cli.FULL["size"][0])
    assert (mine.steps, mine.repeats, mine.width, mine.height) == (7, bench_cli.FULL["repeats"], 640, 512)


def test_file_name_carries_the_settings(tmp_path):
    a = bench_cli.parse_args(["--out", str(tmp_path)])
    b = bench_cli.parse_args(["--full", "--out", str(tmp_path)])
    c = bench_cli.parse_args(["--mods", "freeu", "--out", str(tmp_path)])
    tags = {bench_run.file_tag(x) for x in (a, b, c)}
    assert len(tags) == 3
    assert "384x384" in bench_run.file_tag(a) and "3steps" in bench_run.file_tag(a)


def test_mods_named_twice_merge_left_to_right_and_say_so(tmp_path):
    merged = Settings.from_text("freeu b1=1.3 s1=0.5; tome ratio=0.3; freeu s1=0.7 b2=1.1", strict=True)
    assert merged["freeu"]["b1"] == 1.3 and merged["freeu"]["s1"] == 0.7 and merged["freeu"]["b2"] == 1.1
    assert merged["tome"]["ratio"] == 0.3
    off = Settings.from_text("freeu b1=1.3; freeu enabled=false")
    assert not off["freeu"]["enabled"] and off["freeu"]["b1"] == 1.3
    once = Settings.from_text("freeu s1=0.7")
    assert once["freeu"]["b1"] == Settings.from_text("freeu")["freeu"]["b1"]  # a single part starts from defaults
    args = bench_cli.parse_args(["--mods", "freeu b1=1.3; freeu s1=0.7", "--out", str(tmp_path)])
    (text, settings, notes), = args.configs
    assert settings["freeu"]["b1"] == 1.3 and settings["freeu"]["s1"] == 0.7
    assert notes == ["freeu is named 2 times: merged left to right (later values win)"]
