"""`python -m recipes.evaluation_spread` on a finished (tiny) recipes.cifar run."""

import re
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from recipes import cifar, evaluation_spread  # noqa: E402

SMALL_NPZ = "../shared/data/cifar10-small.npz"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    status = cifar.main(["--data", SMALL_NPZ, "--train-size", "100", "--test-size", "40",
                         "--batch-size", "10", "--epochs", "1", "--eval", "population",
                         "--head-norm", "batch", "--verbose", "0", "--output", str(output)])
    assert status == 0
    return output


def _percentages(line):
    return [float(value) for value in re.findall(r"(\d+\.\d+)", line)]


@pytest.mark.slow
def test_spread_table_over_seeds(finished_run, capsys):
    assert evaluation_spread.main([str(finished_run), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): _percentages(line)
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {"random test batches", "conditional (balanced, labels)",
                         "pseudo-balanced, argmax", "assignment alone", "assignment batches"}
    for name, values in rows.items():
        if name == "evaluation" or (name == "pseudo-balanced, argmax" and "n/a" in out):
            continue  # argmax batches need every class predicted; a 1-epoch model may not
        mean, std, low, high = values
        assert 0 <= low <= mean <= high <= 100 and std >= 0, (name, values)


@pytest.mark.slow
def test_counts_only_reports_every_class(finished_run, capsys):
    assert evaluation_spread.main([str(finished_run), "--counts-only"]) == 0
    out = capsys.readouterr().out
    counts = re.search(r"predicted images per class \[([\d, ]+)\] \(test images per class "
                       r"\[([\d, ]+)\]", out)
    assert counts, out
    predicted = [int(v) for v in counts.group(1).split(",")]
    actual = [int(v) for v in counts.group(2).split(",")]
    assert len(predicted) == len(actual) == 10 and sum(predicted) == sum(actual) == 40
    assert "one-to-one matching" in out and "recomputed statistics" in out
