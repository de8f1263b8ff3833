"""`python -m recipes.experiments`: every run's flags are valid recipe flags, finished runs are
not repeated, and the tables and plots are computed correctly from results.json files.

Training itself is `recipes.cifar`'s (tested in test_recipes_cifar.py); here the results are
synthetic dicts with the fields a real results.json has, so the summaries can be checked
against numbers computed by hand.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from recipes import cifar, experiments  # noqa: E402
from recipes.report import experiments as experiment_report  # noqa: E402


def _results(run, accuracies, modes=None, steps_per_epoch=40, epochs=None, seconds=60.0):
    """A results.json-shaped dict for `run` with the given per-epoch test accuracies."""
    epochs = epochs or len(accuracies)
    history = [{"epoch": i + 1, "test_accuracy": a, "loss": 2.0 - a, "accuracy": a}
               for i, a in enumerate(accuracies)]
    config = {"model": "small_cnn", "epochs": epochs, "batch_size": 64}
    return {"config": config, "data": {"train_images": 4000, "test_images": 2000},
            "model": {"norm_layers": ["a_norm", "b_norm"]},
            "training": {"steps_per_epoch": steps_per_epoch, "history": history},
            "evaluation": modes or {"population": {"accuracy": accuracies[-1]}},
            "seconds": seconds, "versions": {"tensorflow": "x"}}


@pytest.mark.parametrize("name", sorted(experiments.EXPERIMENTS))
def test_every_run_is_a_valid_recipe_command(name, tmp_path):
    runs = experiments.EXPERIMENTS[name].runs
    assert len({run.name for run in runs}) == len(runs), "run folders must be distinct"
    for run in runs:
        _, args = cifar.parse_args([*run.args, "--output", str(tmp_path / run.name)])
        config = cifar.to_config(args)
        cifar._check_norms(config)  # unknown norms and bad layer arguments fail here
        assert args.verbose == 1 and config.output == str(tmp_path / run.name)


def test_the_issue_settings():
    small = experiments.EXPERIMENTS["small_batch"].runs
    assert {(r.fields["norm"], r.fields["batch"]) for r in small} >= {
        ("BN", 64), ("BN", 2), ("BN", 4), ("GN", 2), ("CBN", 4), ("MABN", 2),
        ("BN + renorm", 4)}
    assert {r.fields["seed"] for r in small} == {2, 4}
    epochs = {r.name: cifar.parse_args(list(r.args))[1].epochs for r in small}
    assert epochs["batch-b64-16epochs-seed2"] == 16 and epochs["batch-b64-seed2"] == 4
    mixture = experiments.EXPERIMENTS["mixture"].runs
    assert len({r.fields["seed"] for r in mixture}) >= 3
    _, args = cifar.parse_args(list(mixture[1].args))
    assert (args.model, args.norm, args.placement, args.other_norm) == (
        "mn_cnn", "mixture", "2", "batch")
    placements = [cifar.parse_args(list(r.args))[1].placement
                  for r in experiments.EXPERIMENTS["placement"].runs]
    assert placements == ["all", "first", "none"] * 3


def test_finished_runs_are_not_repeated(tmp_path, monkeypatch):
    experiment = experiments.EXPERIMENTS["placement"]
    for index, run in enumerate(experiment.runs):
        folder = tmp_path / experiment.name / run.name
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(
            json.dumps(_results(run, [0.1 * (index + 1)], epochs=5)))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(experiments.subprocess, "run", no_training)
    pairs, trained = experiments.run_experiment(experiment, tmp_path, jobs=2)
    assert trained == 0
    assert [run.name for run, _ in pairs] == [run.name for run in experiment.runs]
    assert [r["evaluation"]["population"]["accuracy"] for _, r in pairs] == pytest.approx(
        [0.1 * (index + 1) for index in range(len(experiment.runs))])


def test_a_run_whose_epochs_were_raised_is_resumed(tmp_path, monkeypatch):
    experiment = experiments.EXPERIMENTS["placement"]
    run = experiment.runs[0]
    folder = tmp_path / run.name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(_results(run, [0.2, 0.3], epochs=2)))
    started = []

    def resume(command, **kwargs):
        started.append(command)
        (folder / "results.json").write_text(json.dumps(_results(run, [0.2] * 5, epochs=5)))

        class Done:
            returncode = 0
        return Done()

    monkeypatch.setattr(experiments.subprocess, "run", resume)
    results, trained = experiments._run_one(run, folder, threads=1)
    assert trained and len(started) == 1 and "--overwrite" not in started[0]
    assert results["config"]["epochs"] == 5 == experiments._planned_epochs(run)


def test_a_failed_run_is_reported(tmp_path, monkeypatch):
    experiment = experiments.EXPERIMENTS["placement"]

    class Failed:
        returncode = 3

    monkeypatch.setattr(experiments.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match=r"run placement-all failed \(exit 3\).*log.txt"):
        experiments.run_experiment(experiment, tmp_path, jobs=1)


def test_mixture_summary_counts_updates_to_bns_best(tmp_path):
    experiment = experiments.EXPERIMENTS["mixture"]
    bn = {1: [0.30, 0.40, 0.50, 0.47], 2: [0.32, 0.42, 0.55, 0.50], 3: [0.28, 0.38, 0.49, 0.52]}
    mn = {1: [0.40, 0.52, 0.55, 0.56], 2: [0.35, 0.45, 0.50, 0.53], 3: [0.41, 0.50, 0.54, 0.54]}
    pairs = [(run, _results(run, (bn if run.fields["norm"] == "BN" else mn)[run.fields["seed"]]))
             for run in experiment.runs]
    lines = experiment.summarize(pairs, tmp_path / "plot.png")
    # BN's seed-mean curve: 0.30, 0.40, 0.5133, 0.4967 -> target 0.5133 at 3 x 40 updates.
    assert "BN's best (51.33%)" in lines[0]
    bn_row = next(line for line in lines if line.startswith("| BN |"))
    mn_row = next(line for line in lines if line.startswith("| MN"))
    assert bn_row.split("|")[5].strip() == "120"
    assert bn_row.split("|")[6].strip() == "not reached, 120, 160"
    # MN's mean curve 0.3867, 0.49, 0.53, 0.5433: first above the target at 120 updates;
    # per seed after 2, 4 and 3 evaluations.
    assert mn_row.split("|")[5].strip() == "120"
    assert mn_row.split("|")[6].strip() == "80, 160, 120"
    final = [0.56, 0.53, 0.54]
    assert f"{100 * np.mean(final):.2f} ± {100 * np.std(final, ddof=1):.2f}" in mn_row
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_batch_structure_grid_and_ablations():
    runs = experiments.EXPERIMENTS["batch_structure"].runs
    grid = [run for run in runs if run.fields["recipe"] == "issue"]
    assert {(r.fields["head"], r.fields["training"]) for r in grid} == {
        ("none", "balanced"), ("none", "random"), ("batch", "balanced"), ("batch", "random")}
    assert len({r.fields["seed"] for r in grid}) >= 2 and len(grid) == 8
    for run in runs:
        _, args = cifar.parse_args(list(run.args))
        config = cifar.to_config(args)
        assert config.batch_size == 10 and config.epochs == 10 and config.test_size == 2000
        assert config.head_norm == (None if run.fields["head"] == "none" else "batch")
        assert set(config.eval_modes) == {"population", "recomputed", "batch", "balanced",
                                          "pseudo_balanced", "assignment"}
        assert (config.batch_structure == "balanced") == (run.fields["training"] == "balanced")
        if run in grid:  # the issue's recipe: 0.02 = 0.256 x 10 / 128, constant, no augment
            assert (config.augment, config.lr, config.schedule, config.weight_decay,
                    config.train_size) == (False, 0.256, "constant", 0.0, 10000)
    reference = cifar.to_config(cifar.parse_args(list(grid[0].args))[1])
    settings = ("augment", "lr", "schedule", "weight_decay", "train_size")
    for run in runs[len(grid):]:
        config = cifar.to_config(cifar.parse_args(list(run.args))[1])
        changed = [k for k in settings if getattr(config, k) != getattr(reference, k)]
        assert len(changed) == (4 if "earlier" in run.name else 1), (run.name, changed)


def test_batch_structure_summary_means_spreads_and_decomposition(tmp_path):
    experiment = experiments.EXPERIMENTS["batch_structure"]
    modes = ("population", "recomputed", "batch", "balanced", "pseudo_balanced", "assignment")
    pairs = []
    for run in experiment.runs:
        # Seed s adds 2s points: seeds 0 and 1 give mean +1, sample std 1.41 points.
        base = 0.4 + 0.02 * run.fields["seed"] + (0.1 if run.fields["head"] == "batch" else 0)
        accuracies = {mode: {"accuracy": base + 0.05 * m} for m, mode in enumerate(modes)}
        accuracies["assignment"]["assignment_accuracy"] = base + 0.03
        pairs.append((run, _results(run, [0.5], modes=accuracies)))
    lines = experiment.summarize(pairs, tmp_path / "plot.png")
    row = next(line for line in lines if line.startswith("| batch | balanced, k=1 | 2 |"))
    cells = [cell.strip() for cell in row.split("|")[4:-1]]
    # head batch, seeds 0/1: population 50 and 52 -> 51.00 ± 1.41; assignment alone +3.
    assert cells == ["51.00 ± 1.41", "56.00 ± 1.41", "61.00 ± 1.41", "66.00 ± 1.41",
                     "71.00 ± 1.41", "54.00 ± 1.41", "76.00 ± 1.41", "15.00 ± 0.00",
                     "10.00 ± 0.00"]
    ablation_rows = [line for line in lines if line.startswith("| the recipe above")
                     or line.startswith("| +") or line.startswith("| earlier")
                     or line.startswith("| lr") or line.startswith("| 5,000")]
    assert len(ablation_rows) == 1 + len(experiments.BATCH_STRUCTURE_ABLATIONS)
    assert ablation_rows[0].split("|")[2:10] == [" 40.00 ", " 45.00 ", " 50.00 ", " 55.00 ",
                                                 " +15.00 ", " 60.00 ", " 43.00 ", " 65.00 "]
    assert (tmp_path / "plot.png").exists()
    # With only some runs finished the table has what there is.
    lines = experiment.summarize(pairs[:3], tmp_path / "plot.png")
    assert sum(line.startswith("| none |") or line.startswith("| batch |")
               for line in lines) == 3


def test_small_batch_and_population_summaries(tmp_path):
    small = experiments.EXPERIMENTS["small_batch"]
    pairs = [(run, _results(run, [0.3 + run.fields["batch"] / 1000 + run.fields["seed"] / 100]))
             for run in small.runs]
    lines = small.summarize(pairs, tmp_path / "small.png")
    bn_row = next(line for line in lines if line.startswith("| BN |"))
    # Seeds 2 and 4 give 0.302 + 0.02/0.04 at batch 2: mean 33.20, std 1.41.
    assert bn_row.split("|")[2].strip() == "33.20 ± 1.41"
    assert bn_row.split("|")[4].strip() == "39.40 ± 1.41"
    gn_row = next(line for line in lines if line.startswith("| GN |"))
    assert gn_row.split("|")[4].strip() == "—"

    population = experiments.EXPERIMENTS["population"]
    pairs = [(run, _results(run, [0.4], modes={"population": {"accuracy": 0.40},
                                               "recomputed": {"accuracy": 0.45}},
                            steps_per_epoch=10, epochs=5)) for run in population.runs]
    lines = population.summarize(pairs, tmp_path / "population.png")
    assert "| 128 | 0.999 | 50 | 40.00 | 45.00 | +5.00 |" in lines


def test_placement_summary_has_a_row_and_a_panel_per_model(tmp_path):
    experiment = experiments.EXPERIMENTS["placement"]
    pairs = [(run, _results(run, [0.2, 0.3 + 0.01 * index]))
             for index, run in enumerate(experiment.runs)]
    pairs[5][1]["training"]["diverged_at_epoch"] = 2
    lines = experiment.summarize(pairs, tmp_path / "placement.png")
    rows = [line for line in lines if line.startswith("| small_cnn") or
            line.startswith("| resnet20")]
    assert len(rows) == 9
    assert rows[5].split("|")[4] == " diverged in epoch 2 "
    assert rows[6].startswith("| resnet20, lr 0.02 | after every conv |")
    assert rows[4].split("|")[4:6] == [" 34.00 ", " 34.00 "]
    assert (tmp_path / "placement.png").stat().st_size > 0


def test_write_section_replaces_only_its_own_block(tmp_path):
    path = tmp_path / "EXPERIMENTS.md"
    path.write_text("intro\n<!-- a:begin -->\nold\n<!-- a:end -->\nmiddle\n"
                    "<!-- b:begin -->\nkeep\n<!-- b:end -->\n")
    experiment_report.write_section("a", "new table", path)
    experiment_report.write_section("c", "appended", path)
    text = path.read_text()
    assert "old" not in text and "new table" in text and "keep" in text
    assert text.index("middle") < text.index("<!-- b:begin -->") < text.index("appended")


def test_write_section_defaults_to_the_projects_experiments_md(tmp_path, monkeypatch):
    # The old call form, recipes.experiments.write_section(name, text), without a path.
    assert experiment_report.MARKDOWN == experiments.ROOT / "EXPERIMENTS.md" == (
        experiments.MARKDOWN)
    path = tmp_path / "EXPERIMENTS.md"
    path.write_text("intro\n<!-- a:begin -->\nold\n<!-- a:end -->\n")
    monkeypatch.setattr(experiment_report, "MARKDOWN", path)
    with pytest.warns(DeprecationWarning, match="recipes.experiments.write_section is deprec"):
        write_section = experiments.write_section
    write_section("a", "new table")
    assert path.read_text() == "intro\n<!-- a:begin -->\nnew table\n<!-- a:end -->\n"


def test_summarize_writes_the_section_and_the_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "MARKDOWN", tmp_path / "EXPERIMENTS.md")
    monkeypatch.setattr(experiments, "PLOTS", tmp_path / "plots")
    (tmp_path / "EXPERIMENTS.md").write_text("<!-- placement:begin -->\n<!-- placement:end -->\n")
    experiment = experiments.EXPERIMENTS["placement"]
    pairs = []
    for run in experiment.runs:
        results = _results(run, [0.2, 0.3])
        for row in results["training"]["history"]:
            row["seconds"] = 60.0
        results["evaluation"]["population"]["seconds"] = 30.0
        pairs.append((run, results))
    text = experiments.summarize(experiment, pairs, jobs=2, wall_seconds=600, trained=2)
    # 9 runs x (2 epochs x 1 min + 0.5 min of evaluation) = 22.5 run-minutes.
    assert "Runs: 9, 22 run-minutes" in text
    assert "this command trained 2 of them in 10 minutes wall-clock" in text
    assert text in (tmp_path / "EXPERIMENTS.md").read_text()
    assert (tmp_path / "plots" / "placement.png").exists()


def test_summarize_only_leaves_out_unfinished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "MARKDOWN", tmp_path / "EXPERIMENTS.md")
    monkeypatch.setattr(experiments, "PLOTS", tmp_path / "plots")
    experiment = experiments.EXPERIMENTS["batch_structure"]
    modes = ("population", "recomputed", "batch", "balanced", "pseudo_balanced", "assignment")
    for run in experiment.runs[:3]:
        folder = tmp_path / "runs" / "batch_structure" / run.name
        folder.mkdir(parents=True)
        accuracies = {mode: {"accuracy": 0.5} for mode in modes}
        accuracies["assignment"]["assignment_accuracy"] = 0.5
        (folder / "results.json").write_text(json.dumps(_results(run, [0.5],
                                                                 modes=accuracies)))
    assert experiments.main(["batch_structure", "--summarize-only", "--output",
                             str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "not finished, left out: " + experiment.runs[3].name in out
    assert "Runs: 3," in (tmp_path / "EXPERIMENTS.md").read_text()


def test_dry_run_prints_the_commands(capsys):
    assert experiments.main(["placement", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9 and all(line.startswith("-m recipes.cifar") for line in lines)
    assert "--placement first" in lines[1]


def test_bad_jobs_is_refused(capsys):
    with pytest.raises(SystemExit) as raised:
        experiments.main(["placement", "--jobs", "0"])
    assert raised.value.code == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
