"""recipes.report: one matplotlib set-up for every figure, the search's results files, the
experiment summaries on partial results, and the old import paths of the moved functions.

The run report (report.md, curves.png) is checked end to end in test_recipes_cifar.py, the
experiment tables against hand-computed numbers in test_recipes_experiments.py.
"""

import csv
import struct
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from recipes import report  # noqa: E402
from recipes.report import experiments as experiment_report  # noqa: E402
from recipes.report import search  # noqa: E402


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _row(trial, norm, batch_size, score, status="COMPLETED"):
    row = dict.fromkeys(search.RESULT_FIELDS)
    row.update(trial=trial, status=status, norm=norm, batch_size=batch_size, model="small_cnn",
               placement="all", lr=0.1, learning_rate=0.1 * batch_size / 128, epochs=1,
               steps=10, seconds=1.25, worker="tuner0", attempts=1)
    row[search.OBJECTIVE] = score
    return row


def test_figures_use_agg_and_save_closes_the_figure(tmp_path):
    plt = report.pyplot()
    assert plt.get_backend().lower() == "agg"
    figure, axis = plt.subplots(figsize=(3, 2))
    axis.plot([1, 2], [3, 4], label="a line")
    report.label(axis, "x", "a title", ylabel="y", legend_title="legend")
    assert (axis.get_xlabel(), axis.get_ylabel(), axis.get_title()) == ("x", "y", "a title")
    assert axis.get_legend().get_title().get_text() == "legend"
    report.save(figure, tmp_path / "figure.png")
    assert _png_size(tmp_path / "figure.png") == (300, 200)  # 3 x 2 inches at 100 dpi
    assert not plt.fignum_exists(figure.number)


def test_search_results_files(tmp_path):
    rows = [_row("00", "batch", 2, 0.25), _row("01", "group", 2, 0.5),
            _row("02", "group", 32, 0.75), _row("03", "batch", 32, None, status="FAILED")]
    paths = search.write_results(rows, tmp_path / "out", title="A search",
                                 settings={"epochs": 1})
    with open(paths["csv"], newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["trial"] for r in written] == ["00", "01", "02", "03"]
    assert written[3][search.OBJECTIVE] == "" and written[2]["seconds"] == "1.25"
    page = paths["markdown"].read_text()
    assert page.startswith("# A search\n") and "| epochs | 1 |" in page
    assert "**Best:** norm=group, batch_size=32" in page and "75.00% (trial 02)" in page
    assert "| 02 | COMPLETED | group | 32 | small_cnn | all | 0.1 | 0.025 | 1 | 75.00 |" in page
    assert _png_size(paths["plot"]) == (640, 440)

    # Nothing completed: no best line, and an empty picture rather than an error.
    failed = [_row("00", "batch", 2, None, status="FAILED")]
    assert search.best_row(failed) is None
    paths = search.write_results(failed, tmp_path / "failed")
    assert "**Best:**" not in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 0


def test_small_batch_summary_of_one_seed_and_missing_norms(tmp_path):
    """Mid-experiment (`--summarize-only`): one seed, some norms not run yet. The table has the
    norms that ran, the seed that ran, and the figure draws without a spread."""

    class Run:
        def __init__(self, **fields):
            self.fields = fields

    def results(accuracy, epochs=4):
        return {"config": {"model": "small_cnn", "epochs": epochs},
                "data": {"train_images": 4000, "test_images": 2000},
                "training": {"steps_per_epoch": 10, "history": []},
                "evaluation": {"population": {"accuracy": accuracy}}}

    pairs = [(Run(norm="BN", batch=64, seed=2), results(0.5)),
             (Run(norm="BN, 4x the epochs", batch=64, seed=2), results(0.6, epochs=16)),
             (Run(norm="BN", batch=2, seed=2), results(0.3)),
             (Run(norm="GN", batch=2, seed=2), results(0.4))]
    lines = experiment_report.summarize_small_batch(pairs, tmp_path / "small.png")
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| BN | 30.00 ± 0.00 | — | 50.00 ± 0.00 |",
                    "| GN | 40.00 ± 0.00 | — | — |",
                    "| BN, 4x the epochs | — | — | 60.00 ± 0.00 |"]
    note = lines[-1]
    assert "over seeds 2;" in note and '("BN, 4x the epochs": 16)' in note
    assert "40 for BN at batch 64, 160 for BN, 4x the epochs at batch 64, 40 for BN at batch 2" \
        in note and "for GN" not in note
    assert (tmp_path / "small.png").stat().st_size > 0


def test_summarize_links_the_figure_relative_to_the_page(tmp_path):
    class Experiment:
        name, title = "demo", "Demo"

        @staticmethod
        def summarize(pairs, plot_path):
            Path(plot_path).write_bytes(b"png")
            return ["| a table |"]

    results = {"training": {"history": [{"seconds": 120.0}]},
               "evaluation": {"population": {"seconds": 60.0}}, "versions": {"tensorflow": "x"}}
    page = tmp_path / "EXPERIMENTS.md"
    page.write_text("top\n<!-- demo:begin -->\nold\n<!-- demo:end -->\nbottom\n")
    text = experiment_report.summarize(Experiment, [(None, results)], jobs=1,
                                       markdown=page, plots=tmp_path / "docs" / "figures")
    assert text.startswith("| a table |\n\nRuns: 1, 3 run-minutes")
    assert text.endswith("![Demo](docs/figures/demo.png)")
    assert page.read_text() == f"top\n<!-- demo:begin -->\n{text}\n<!-- demo:end -->\nbottom\n"


def test_moved_functions_keep_their_old_import_paths():
    pytest.importorskip("keras_tuner")
    from recipes import experiments, tuning

    for name in ("write_results", "markdown", "describe", "best_row",
                 "plot_accuracy_vs_batch_size", "RESULT_FIELDS", "OBJECTIVE"):
        with pytest.warns(DeprecationWarning,
                          match=rf"recipes\.tuning\.{name} is deprecated.*use "
                                rf"recipes\.report\.search\.{name}\."):
            assert getattr(tuning, name) is getattr(search, name), name
    for name in ("write_section", "BATCH_STRUCTURE_MODES"):
        with pytest.warns(DeprecationWarning,
                          match=rf"recipes\.experiments\.{name} is deprecated.*use "
                                rf"recipes\.report\.experiments\.{name}\."):
            assert getattr(experiments, name) is getattr(experiment_report, name), name
    assert set(tuning.MOVED) == {"write_results", "markdown", "describe", "best_row",
                                 "plot_accuracy_vs_batch_size", "RESULT_FIELDS", "OBJECTIVE",
                                 "SharedSearchOracle", "GridOracle", "RandomSearchOracle",
                                 "BayesianOptimizationOracle", "HyperbandOracle",
                                 "DEFAULT_WORKER_TIMEOUT"}
    assert set(experiments.MOVED) == {"write_section", "BATCH_STRUCTURE_MODES"}
    assert experiments.EXPERIMENTS["mixture"].summarize is experiment_report.summarize_mixture
    assert report.write is report.runs.write and report.summary is report.runs.summary
