"""The benchmark's runs on a tiny UNet: honest rows (no-ops not timed or ranked, a spread only
from 2 rounds, peak memory per configuration), results on disk after every run, Ctrl-C leaving a
valid partial result, and --compare with tomesd and the DeepCache package."""
import io
import json
import re
import threading
import time

import pytest
import torch

from lib_unetmods.lab import bench, bench_cli, bench_run

TINY = ["--unet-size", "tiny", "--size", "64x64"]


def run_json(capsys, tmp_path, *argv):
    code = bench.main([*TINY, *argv, "--json", "--out", str(tmp_path)])
    rows = {r["label"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    return code, rows


HONEST = ("--steps", "3", "--repeats", "2", "--mods", "tome ratio=0.5", "--mods", "scalecrafter", "--mods",
          "deepcache interval=3", "--mods", "hypertile", "--mods", "freeu b1=1 b2=1 s1=1 s2=1")


def test_rows_are_honest(capsys, tmp_path):
    code, rows = run_json(capsys, tmp_path, *HONEST)
    assert code == 0
    # nothing installed: listed as a no-op with the technique's own reason (acts.py), not timed, not ranked
    assert "no layer splits into tiles" in rows["hypertile"]["noop"]
    assert "every backbone, skip and high-end scale is 1" in rows["freeu b1=1 b2=1 s1=1 s2=1"]["noop"]
    for label in ("all off", "scalecrafter", "hypertile", "freeu b1=1 b2=1 s1=1 s2=1"):
        row = rows[label]
        assert row["noop"] and row["speedup"] is None and not row["ranked"] and row["patched_s"] is None
    assert "not above the native" in rows["scalecrafter"]["noop"]
    for label in ("tome ratio=0.5", "deepcache interval=3"):
        row = rows[label]
        assert row["ranked"] and row["rounds"] == 2 and row["noop"] is None
        assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]
        assert row["rel_diff"] > 0
        assert row["peak_mem_patched"] > 0  # working memory of the run, not growth of the process
    assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["peak_mem_baseline"] > 0
    written = [json.loads(line) for line in open(tmp_path / (bench_run_tag(tmp_path, *HONEST) + ".jsonl"))]
    assert {r["label"] for r in written} == set(rows)


def bench_run_tag(tmp_path, *argv):
    return bench_run.file_tag(bench_cli.parse_args([*TINY, *argv, "--out", str(tmp_path)]))


def test_one_round_has_no_spread(capsys, tmp_path):
    code, rows = run_json(capsys, tmp_path, "--steps", "1", "--repeats", "1", "--mods", "freeu")
    assert code == 0
    assert rows["freeu"]["rounds"] == 1 and rows["freeu"]["speedup"] > 0
    assert rows["freeu"]["speedup_min"] is None and rows["freeu"]["speedup_max"] is None
    out_dir = tmp_path
    tag = bench_run_tag(tmp_path, "--steps", "1", "--repeats", "1", "--mods", "freeu")
    text = (out_dir / f"{tag}.txt").read_text()
    assert "64x64, 1 steps" in text and "freeu" in text
    assert (out_dir / f"{tag}.png").stat().st_size > 0


def test_peak_memory_is_per_run_not_process_growth():
    big = torch.empty(64 * 2**20 // 4)  # the process grows first, as after an earlier configuration
    del big
    _, _, small = bench_run.measured(lambda: torch.zeros(4), torch.device("cpu"))
    _, _, peak = bench_run.measured(lambda: torch.ones(32 * 2**20 // 4).sum(), torch.device("cpu"))
    assert peak >= 32 * 2**20 > 100 * small


def test_ctrl_c_leaves_a_valid_partial_result(capsys, tmp_path, monkeypatch):
    original = bench_run.Bench.run_config
    calls = []

    def interrupt_on_the_fourth(self, config):
        calls.append(config.label)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(self, config)

    monkeypatch.setattr(bench_run.Bench, "run_config", interrupt_on_the_fourth)
    argv = ["--steps", "1", "--repeats", "2", "--mods", "freeu", "--mods", "tome", "--mods", "cdtuner d1=1"]
    code = bench.main([*TINY, *argv, "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 130
    assert "interrupted after 3 runs" in captured.err
    tag = bench_run_tag(tmp_path, *argv)
    rows = [json.loads(line) for line in open(tmp_path / f"{tag}.jsonl")]
    timed = {r["label"]: r for r in rows if r["speedup"] is not None}
    assert set(timed) == {"baseline", "freeu", "tome"}  # the runs that finished, each against the baseline before it
    runs = [json.loads(line) for line in open(tmp_path / f"{tag}.runs.jsonl")]
    assert [r["label"] for r in runs] == ["baseline", "freeu", "tome"]
    assert "INTERRUPTED" in (tmp_path / f"{tag}.txt").read_text()
    assert "freeu" in captured.out  # the table so far on stdout


def compare(capsys, tmp_path, argv, ours):
    """(the comparison line's output difference, the rows written) of a --compare run."""
    code = bench.main([*TINY, *argv, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith(f"{ours} (ours)"))
    rows = {r["label"]: r for r in map(json.loads, open(tmp_path / (bench_run_tag(tmp_path, *argv) + ".jsonl")))}
    return line, float(line.rsplit("differ by ", 1)[1].split()[0]), rows


def test_compare_tomesd(capsys, tmp_path):
    pytest.importorskip("tomesd")
    argv = ["--steps", "2", "--repeats", "1", "--mods", "tome ratio=0.5", "--compare", "tomesd"]
    line, diff, rows = compare(capsys, tmp_path, argv, "tome ratio=0.5")
    assert " vs tomesd " in line
    assert diff < 1e-4  # the same algorithm: float rounding only (tomesd's unstable argsort order)
    assert rows["tomesd"]["rel_diff"] > 1e-3 and rows["tomesd"]["speedup"] > 0  # it did merge tokens
    assert "max_downsample=1" in rows["tomesd"]["mods"]


def test_compare_deepcache(capsys, tmp_path):
    pytest.importorskip("DeepCache")
    pytest.importorskip("diffusers")
    argv = ["--steps", "4", "--repeats", "1", "--mods", "deepcache interval=3 level=1", "--compare", "deepcache"]
    line, diff, rows = compare(capsys, tmp_path, argv, "deepcache interval=3 level=1")
    assert " vs DeepCache pkg " in line and diff < 1e-4
    package = rows["DeepCache pkg"]
    assert package["reference"] == "diffusers UNet" and "interval=3 branch=1" in package["mods"]
    assert package["rel_diff"] > 1e-4  # cheap steps changed the result


def test_compare_deepcache_refuses_sdxl(capsys, tmp_path):
    pytest.importorskip("DeepCache")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--arch", "sdxl", "--compare", "deepcache", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "SD1.x/SD2.x only" in capsys.readouterr().err


def test_ratio_interpolates_the_baseline_between_the_runs_around_it(tmp_path):
    bench_ = bench_run.Bench(bench_cli.parse_args([*TINY, "--out", str(tmp_path)]))
    base, a, b = (bench_run.Config(label, "") for label in ("baseline", "a", "b"))
    bench_.configs = [base, a, b]
    bench_.runs = [bench_run.Run(0, 0, "baseline", 10.0, 0), bench_run.Run(1, 0, "a", 5.0, 0),
                   bench_run.Run(2, 0, "b", 12.0, 0), bench_run.Run(3, 0, "baseline", 13.0, 0)]
    assert bench_.ratios(a) == [pytest.approx(11 / 5)]  # baseline 10 -> 13 over 3 places: 11 at the first
    assert bench_.ratios(b) == [pytest.approx(12 / 12)]
    bench_.runs = bench_.runs[:2]  # interrupted before the closing baseline: the one before
    assert bench_.ratios(a) == [pytest.approx(2.0)]



def test_long_runs_report_their_step_and_time_left(tmp_path):
    """The heartbeat names the run in progress, its step and its time left; silent between runs."""
    log = io.StringIO()
    bench_ = bench_run.Bench(bench_cli.parse_args([*TINY, "--steps", "4", "--repeats", "1", "--mods", "tome",
                                                   "--out", str(tmp_path)]), log=log)
    bench_.heartbeat_s = 0.005
    torch.set_grad_enabled(False)
    bench_.setup()
    stop = threading.Event()
    idle = threading.Thread(target=bench_._heartbeat, args=(stop,))
    idle.start()
    time.sleep(0.05)  # no run in progress: no line
    stop.set()
    idle.join()
    assert log.getvalue().count("so far") == 0
    bench_.models["ldm"].register_forward_pre_hook(lambda *_: time.sleep(0.03))  # slow steps, so beats land in runs
    bench_.run()
    beats = [line.strip() for line in log.getvalue().splitlines() if "so far" in line]
    assert any(re.fullmatch(r"tome: step [234]/4, 0m00s so far, about 0m00s left in this run", b) for b in beats), beats
    assert any(b.startswith("baseline: step 1/4, 0m00s so far") for b in beats), beats
