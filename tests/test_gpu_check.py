"""Tests for `benchmarks/gpu_check.py`, the one-command GPU check.

No GPU is needed: `--dry-run` runs the whole plan (layer checks, mirrored check, benchmark,
tuner) on the CPU at tiny sizes, so that the script works the day a GPU slot comes; the
orchestration (time limits, skipped parts, the summary of failures) is tested without
TensorFlow, and a run without `--dry-run` on this CPU machine must fail cleanly.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def _run(argv, timeout):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_the_summary(tmp_path):
    done = _run(["--dry-run", "--output", tmp_path], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "passed" and summary["dry_run"] is True
    parts = summary["parts"]
    assert sorted(parts) == sorted(gpu_check.PARTS)
    assert all(part["status"] == "passed" for part in parts.values())

    layers = parts["layers"]["checks"]
    assert sorted((c["check"], c["name"]) for c in layers) == sorted(
        (check, name) for check in gpu_check.LAYER_CHECKS for name in gpu_check.DRY_NAMES)
    assert parts["sync"]["replicas"] == 2
    assert [c["name"] for c in parts["sync"]["checks"]] == list(gpu_check.DRY_SYNC_NAMES)
    rows = parts["bench"]["rows"]
    assert {(row["layer"], row["xla"]) for row in rows} == {
        (label, xla) for label in gpu_check.DRY_BENCH_LAYERS for xla in (False, True)}
    for row in rows:
        assert row["ms_per_step"] > 0
        median, low, high = row["vs_keras_bn"]
        assert low <= median <= high
    assert [r["status"] for r in parts["tune"]["rows"]] == ["COMPLETED"] * 2

    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("## GPU check (dry run on the CPU: not GPU figures)")
    assert "`python benchmarks/gpu_check.py --dry-run`" in text
    assert "| layers | passed |" in text and "| tune | passed |" in text
    assert "| group | yes |" in text  # the benchmark table, with XLA rows
    assert "| 0 | COMPLETED | batch | 32 |" in text  # the tuner's trials
    for part in ("layers", "sync", "bench"):
        assert (tmp_path / f"part-{part}.json").exists()
    assert (tmp_path / "tune" / "results.csv").exists()


@pytest.mark.slow
def test_without_a_gpu_the_real_run_fails_cleanly(tmp_path):
    """This machine has no GPU: the first part says so, the rest is skipped, status 1."""
    done = _run(["--parts", "sync,tune", "--output", tmp_path], timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parts"]["sync"]["status"] == "failed"
    assert "no GPU visible to TensorFlow" in summary["parts"]["sync"]["message"]
    assert summary["parts"]["tune"] == {"part": "tune", "status": "skipped",
                                        "message": "no GPU"}
    assert "| sync | failed |" in (tmp_path / "summary.md").read_text()


def test_parts_beyond_the_time_budget_are_skipped_and_fail_the_run(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--total-seconds", "1", "--output", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert {part["status"] for part in summary["parts"].values()} == {"skipped"}
    assert "| bench | skipped | 0 | no time left in --total-seconds |" in (
        tmp_path / "summary.md").read_text()


def test_a_part_that_hangs_is_killed_at_its_limit(tmp_path):
    started = time.monotonic()
    code, seconds = gpu_check._run_process(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
        tmp_path / "hang.log", timeout=2)
    assert code is None and 2 <= seconds < 30 and time.monotonic() - started < 30
    assert (tmp_path / "hang.log").read_text().strip() == "started"


def test_summary_lists_failed_checks_and_timeouts():
    summary = {"dry_run": False, "command": "python benchmarks/gpu_check.py", "seconds": 400,
               "started": "2026-01-01 00:00:00 UTC", "status": "failed", "parts": {
                   "layers": {"part": "layers", "status": "failed", "seconds": 100,
                              "devices": {"kind": "GPU", "gpus": ["NVIDIA H200"]},
                              "versions": {"tensorflow": "2.21.0", "keras": "3.15.1"},
                              "checks": [
                                  {"check": "xla", "name": "frn", "status": "failed",
                                   "seconds": 1.0, "message": "AssertionError: outputs"},
                                  {"check": "xla", "name": "batch", "status": "passed",
                                   "seconds": 1.0, "message": ""}]},
                   "bench": {"part": "bench", "status": "timed out", "seconds": 130,
                             "message": "killed after 130 s; the results so far are kept"}}}
    text = gpu_check.markdown(summary)
    assert "on NVIDIA H200, TensorFlow 2.21.0, Keras 3.15.1" in text
    assert "Overall: **failed**" in text
    assert "| layers | failed | 100 | 1/2 checks passed |" in text
    assert "- layers xla `frn`: AssertionError: outputs" in text
    assert "| bench | timed out | 130 | killed after 130 s; the results so far are kept |" in text


def test_budgets_fit_the_slot():
    # Under 8 minutes of a 15-minute GPU slot, whatever each part does.
    assert sum(gpu_check.BUDGETS.values()) <= 8 * 60
    assert set(gpu_check.BUDGETS) == set(gpu_check.DRY_BUDGETS) == set(gpu_check.PARTS)


@pytest.mark.parametrize("argv, fragment", [
    (["--parts", "layers,nothing"], "unknown part(s) ['nothing']"),
    (["--total-seconds", "0"], "expected a positive number, got '0'"),
    (["--rounds", "x"], "expected a positive number, got 'x'"),
])
def test_bad_arguments_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(argv)
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err
