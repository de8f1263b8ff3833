"""Tests for `python -m recipes.tune` (recipes/tune.py, recipes/tuning.py).

End to end on the shared cifar10-small.npz, kept tiny (around a hundred images, the smallest
model, 1-2 epochs): the quick grid search, resuming every tuner after a stop between trials
or in the middle of one (Ctrl-C simulated by wrapping `recipes.training`), a mirrored-strategy
trial, a trial being the `recipes.cifar` run of its hyperparameters, and the one-line errors
with exit status 2. Distributed search (KerasTuner's chief/worker mode) on 127.0.0.1:
every tuner through the real gRPC oracle with stand-in trials (a lost worker's trial re-run
by the other worker), and `python -m recipes.tune --quick` run by a chief and two worker
processes, one of them killed mid-trial and started again.
"""

import csv
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

# `recipes` is not installed: it is imported from the project root, whatever the working folder.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import keras  # noqa: E402
import keras_tuner as kt  # noqa: E402

from recipes import launch, oracles, outputs, training, tune, tuning  # noqa: E402

SMALL_NPZ = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-small.npz"
TINY = ["--data", str(SMALL_NPZ), "--train-size", "64", "--val-size", "32", "--epochs", "1",
        "--verbose", "0"]


def run(argv):
    """The exit status of `python -m recipes.tune argv`, run in this process."""
    try:
        return tune.main([str(arg) for arg in argv])
    except SystemExit as exit_:  # argparse errors
        return exit_.code


def read_rows(output):
    with open(Path(output) / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def trial_files(output):
    """{trial id: trial.json text} of the tuner's project."""
    return {path.parent.name: path.read_text()
            for path in sorted((Path(output) / "search").glob("trial_*/trial.json"))}


def pairs(rows):
    return [(row["norm"], int(row["batch_size"])) for row in rows]


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 200


# ------------------------------------------------------------------------------ end to end
def test_quick_search_tries_every_pair_and_writes_results(tmp_path, capsys):
    output = tmp_path / "quick"
    argv = ["--quick", "--output", output, *TINY]
    assert run(argv) == 0
    printed = capsys.readouterr().out

    rows = read_rows(output)
    expected = {(norm, size) for norm in ("batch", "group") for size in (2, 32)}
    assert sorted(pairs(rows)) == sorted(expected)  # every pair, exactly once
    for row in rows:
        size = int(row["batch_size"])
        assert row["status"] == "COMPLETED"
        assert int(row["epochs"]) == 1
        assert int(row["steps"]) == 64 // size  # the trial's own batch size
        assert float(row["learning_rate"]) == pytest.approx(0.1 * size / 128)
        assert 0.0 <= float(row["val_accuracy"]) <= 1.0
        assert float(row["seconds"]) > 0
        assert (row["worker"], row["attempts"]) == ("tuner0", "1")  # KerasTuner's default id
    table = (output / "results.md").read_text()
    for norm, size in expected:
        assert f"| {norm} | {size} | small_cnn |" in table
    assert "accuracy_vs_batch_size.png" in table
    assert_png(output / "accuracy_vs_batch_size.png")
    best = max(rows, key=lambda row: float(row["val_accuracy"]))
    assert f"Best: norm={best['norm']}, batch_size={best['batch_size']}" in printed

    # The same command again: the finished search stays finished (no new trial).
    before = trial_files(output)
    assert run(argv) == 0
    assert trial_files(output) == before
    # Other search settings in the same folder are refused, in one line.
    capsys.readouterr()
    assert run(["--quick", "--output", output, *TINY, "--norms", "batch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a search with other settings" in err[0]


# ------------------------------------------------------------------------------ resuming
def test_grid_resumes_an_interrupted_trial_where_its_training_stopped(tmp_path, monkeypatch):
    # KerasTuner 1.4.8's own GridSearch fails here (KeyError in populate_space on reload).
    output = tmp_path / "grid"
    argv = ["--grid", "--norms", "group", "--batch-sizes", "4,16", "--output", output, *TINY,
            "--epochs", "2"]
    saved = []
    save = training._save_checkpoint

    def save_then_interrupt(checkpoint, *args):
        save(checkpoint, *args)
        saved.append(int(checkpoint.finished_epochs.numpy()))
        if saved == [1, 2, 1]:  # trial 0's two epochs, then trial 1's first: Ctrl-C
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "_save_checkpoint", save_then_interrupt)
    assert run(argv) == 130
    monkeypatch.undo()
    first = trial_files(output)
    assert sorted(first) == ["trial_0", "trial_1"]
    assert json.loads(first["trial_0"])["status"] == "COMPLETED"
    assert json.loads(first["trial_1"])["status"] == "RUNNING"
    assert [row["status"] for row in read_rows(output)] == ["COMPLETED", "RUNNING"]
    log = output / "search" / "trial_1" / outputs.CSV_NAME
    epoch_1 = log.read_text().splitlines()[1]

    saved.clear()

    def save_and_record(checkpoint, *args):
        save(checkpoint, *args)
        saved.append(int(checkpoint.finished_epochs.numpy()))

    monkeypatch.setattr(training, "_save_checkpoint", save_and_record)
    assert run(argv) == 0
    assert saved == [2]  # only trial 1's epoch 2 was trained
    rows = read_rows(output)
    # Grid order; the interrupted trial 1 was rerun under its own id, trial 0 was not rerun.
    assert [row["trial"] for row in rows] == ["0", "1"]
    assert all(row["status"] == "COMPLETED" for row in rows)
    assert [row["attempts"] for row in rows] == ["1", "2"]  # trial 1 started twice
    assert pairs(rows) == [("group", 4), ("group", 16)]
    assert trial_files(output)["trial_0"] == first["trial_0"]
    # Trial 1 resumed after its checkpointed epoch 1 (kept as it was), as recipes.cifar does.
    lines = log.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch", "1", "2"]
    assert lines[1] == epoch_1
    assert int(rows[1]["steps"]) == 2 * (64 // 16)


@pytest.mark.parametrize("tuner, extra, total", [
    ("random", ["--max-trials", "2"], 2),
    ("bayesian", ["--max-trials", "2", "--initial-points", "1"], 2),  # trial 1: the GP's
    ("hyperband", ["--epochs", "2", "--hyperband-factor", "2", "--max-trials", "3"], 3),
])
def test_resume_after_a_stop_completes_the_rest(tmp_path, monkeypatch, tuner, extra, total):
    output = tmp_path / tuner
    argv = ["--tuner", tuner, "--norms", "batch,group", "--batch-sizes", "4,16",
            "--output", output, *TINY, *extra]
    end = tuning._SearchTuner.on_trial_end

    def end_then_interrupt(self, trial):
        end(self, trial)  # the trial and the oracle are saved
        raise KeyboardInterrupt  # Ctrl-C between trials

    monkeypatch.setattr(tuning._SearchTuner, "on_trial_end", end_then_interrupt)
    assert run(argv) == 130
    monkeypatch.undo()
    first = trial_files(output)
    assert list(first) == ["trial_0"]
    assert json.loads(first["trial_0"])["status"] == "COMPLETED"

    assert run(argv) == 0
    rows = read_rows(output)
    assert len(rows) == total and all(row["status"] == "COMPLETED" for row in rows)
    assert trial_files(output)["trial_0"] == first["trial_0"]  # not run again
    trials = [json.loads(text) for text in trial_files(output).values()]
    values = [trial["hyperparameters"]["values"] for trial in trials]
    fresh = [pair for pair, v in zip(pairs(rows), values) if "tuner/trial_id" not in v]
    assert len(set(fresh)) == len(fresh)  # no combination started twice
    if tuner == "hyperband":
        # Trials 0 and 1 train 1 epoch; trial 2 continues the better one to epoch 2.
        assert [int(row["epochs"]) for row in rows] == [1, 1, 2]
        scores = [float(row["val_accuracy"]) for row in rows[:2]]
        assert values[2]["tuner/trial_id"] == str(int(np.argmax(scores)))
        assert values[2]["tuner/initial_epoch"] == 1
        assert int(rows[2]["steps"]) == 64 // int(rows[2]["batch_size"])  # epoch 2 only
        # Trial 2 started from the checkpoint of the trial it continues, after its epoch 1.
        log = (output / "search" / "trial_2" / outputs.CSV_NAME).read_text().splitlines()
        assert [line.split(",")[0] for line in log] == ["epoch", "2"]
    # KerasTuner's `get_best_models`: the best trial's model after its last epoch, which
    # scores on the validation images what that epoch's log says.
    keras.backend.clear_session(free_memory=False)
    setup = tune.prepare([str(arg) for arg in argv])
    tuner = tune.build_tuner(setup)
    (best_model,) = tuner.get_best_models(1)
    best_trial = tuner.oracle.get_best_trials(1)[0]
    log = output / "search" / f"trial_{best_trial.trial_id}" / outputs.CSV_NAME
    with open(log, newline="") as handle:
        last_epoch = list(csv.DictReader(handle))[-1]
    images = training.test_examples(setup["split"]).batch(16)
    logits = best_model.predict(images, verbose=0).astype("float64")
    labels = setup["split"].y_test.reshape(-1)
    # The loss, a continuous value, cannot agree by chance as a near-chance accuracy could.
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    loss = -np.mean(log_softmax[np.arange(len(labels)), labels])
    assert loss == pytest.approx(float(last_epoch["test_loss"]), rel=1e-4)
    accuracy = np.mean(np.argmax(logits, -1) == labels)
    assert accuracy == pytest.approx(float(last_epoch["test_accuracy"]), abs=1e-6)


def test_mirrored_strategy_trains_each_trial_on_all_replicas(tmp_path):
    # In a fresh process, as a user runs it: TensorFlow's collective ops are process-wide, and
    # a second MirroredStrategy in the test worker could clash with the fixture's collectives.
    output = tmp_path / "mirrored"
    command = [sys.executable, "-m", "recipes.tune", "--strategy", "mirrored",
               "--cpu-replicas", "2", "--norms", "sync_batch", "--batch-sizes", "8",
               "--max-trials", "1", "--output", str(output), *TINY]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = read_rows(output)
    assert row["status"] == "COMPLETED" and row["norm"] == "sync_batch"
    assert int(row["replicas"]) == 2
    assert int(row["steps"]) == 64 // 8


# ------------------------------------------------------------------------------ hypermodel
def test_a_trial_is_the_recipes_cifar_run_of_its_hyperparameters(tmp_path):
    """A trial gets the `RunConfig` that `recipes.cifar` builds from the same flags and trains
    as that run: the same numbers, epoch for epoch, on the search's training and validation
    images; its metrics are that run's."""
    from recipes import cifar

    setup = tune.prepare(["--norms", "group", "--batch-sizes", "8", "--lrs", "0.2",
                          "--no-augment", "--output", str(tmp_path / "search"), *TINY])
    hypermodel = tune.build_tuner(setup).hypermodel
    hp = kt.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    trial = hypermodel.trial_config(hp, output=str(tmp_path / "trial"))
    _, args = cifar.parse_args(["--data", str(SMALL_NPZ), "--norm", "group", "--batch-size",
                                "8", "--lr", "0.2", "--no-augment", "--epochs", "1",
                                "--verbose", "0", "--output", str(tmp_path / "cifar")])
    same_run = cifar.to_config(args)
    differ = {key for key, value in same_run.to_dict().items()
              if trial.to_dict()[key] != value}
    assert differ == {"output", "eval_modes"}  # a trial needs no evaluation modes

    split = setup["split"]
    metrics = hypermodel.train(hp, split, output=str(tmp_path / "trial"))
    keras.backend.clear_session(free_memory=False)
    trained = training.fit(same_run, split, tf.distribute.get_strategy())
    (trial_row,) = (tmp_path / "trial" / outputs.CSV_NAME).read_text().splitlines()[1:]
    (row,) = trained.history
    trial_values = [float(value) for value in trial_row.split(",")[:-1]]  # but seconds
    np.testing.assert_allclose(trial_values, [row[key] for key in outputs.CSV_FIELDS[:-1]],
                               rtol=1e-5)
    assert metrics["val_accuracy"] == pytest.approx(row["test_accuracy"])
    assert metrics["accuracy"] == pytest.approx(row["accuracy"])
    assert metrics["steps"] == len(split.y_train) // 8 == trained.steps_per_epoch
    assert metrics["learning_rate"] == pytest.approx(0.2 * 8 / 128)
    assert len(split.y_test) == 32  # scored on the validation images
    with pytest.raises(TypeError, match="trains through recipes.training"):
        hypermodel.fit(hp, None)


def test_grid_oracle_order_and_size():
    hp = kt.HyperParameters()
    hp.Choice("norm", ["batch", "group"])
    hp.Choice("batch_size", [2, 8, 32])
    hp.Fixed("lr", 0.1)
    oracle = oracles.GridOracle(objective=kt.Objective("val_accuracy", "max"), hyperparameters=hp)
    assert oracle.grid_size() == 6
    combos = [(v["norm"], v["batch_size"], v["lr"]) for v in oracle._combinations()]
    assert combos == [("batch", 2, 0.1), ("batch", 8, 0.1), ("batch", 32, 0.1),
                      ("group", 2, 0.1), ("group", 8, 0.1), ("group", 32, 0.1)]
    hp.Float("wd", 0.0, 1.0)
    with pytest.raises(ValueError, match="no finite set of values"):
        oracle.grid_size()


def _drive(oracle, score):
    """Runs `oracle` to the end with `score(values)` as every trial's result; returns the
    trials' values in order."""
    oracle.verbose = 0
    seen = []
    while True:
        trial = oracle.create_trial("tuner0")
        if trial.status == "STOPPED":
            return seen
        values = dict(trial.hyperparameters.values)
        seen.append(values)
        oracle.update_trial(trial.trial_id, {"val_accuracy": score(values)})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)


def test_bayesian_oracle_never_proposes_a_tried_combination(tmp_path):
    # KerasTuner's own oracle proposes the GP's optimum again and again on this space.
    hp = kt.HyperParameters()
    hp.Choice("norm", ["batch", "group"])
    hp.Choice("batch_size", [2, 8])
    oracle = oracles.BayesianOptimizationOracle(
        objective=kt.Objective("val_accuracy", "max"), max_trials=8, num_initial_points=1,
        hyperparameters=hp, seed=3)
    oracle._set_project_dir(str(tmp_path), "p")
    seen = [(v["norm"], v["batch_size"]) for v in _drive(
        oracle, lambda v: 0.5 + 0.1 * (v["norm"] == "group") + 0.01 * v["batch_size"])]
    assert sorted(seen) == [("batch", 2), ("batch", 8), ("group", 2), ("group", 8)]


def test_hyperband_oracle_halves_successively_on_a_small_space(tmp_path):
    # KerasTuner's own oracle wants 9 new configurations for the first bracket of
    # max_epochs=9, finds only these 4, and stops after 4 one-epoch trials.
    hp = kt.HyperParameters()
    hp.Choice("norm", ["batch", "group"])
    hp.Choice("batch_size", [2, 8])
    oracle = oracles.HyperbandOracle(kt.Objective("val_accuracy", "max"), max_epochs=9,
                                     factor=3, hyperparameters=hp, seed=5)
    oracle._set_project_dir(str(tmp_path), "p")
    assert tuning.hyperband_plan(oracle) == (3, 16)  # brackets of 4+2+1, 4+2 and 3 trials
    seen = _drive(oracle, lambda v: 0.5 + 0.1 * (v["norm"] == "group") - 0.01 * v["batch_size"])
    assert len(seen) == 16
    epochs = [(v["tuner/bracket"], v["tuner/round"], v["tuner/epochs"]) for v in seen]
    assert sorted(epochs) == sorted([(2, 0, 1)] * 4 + [(2, 1, 3)] * 2 + [(2, 2, 9)]
                                    + [(1, 0, 3)] * 4 + [(1, 1, 9)] * 2 + [(0, 0, 9)] * 3)
    for bracket in (2, 1, 0):
        first = [(v["norm"], v["batch_size"]) for v in seen
                 if v["tuner/bracket"] == bracket and v["tuner/round"] == 0]
        assert len(set(first)) == len(first)  # no combination twice in a bracket's round 0
    # Halving keeps the best: bracket 2's last round continues ("group", 2).
    (last,) = [v for v in seen if (v["tuner/bracket"], v["tuner/round"]) == (2, 2)]
    assert (last["norm"], last["batch_size"]) == ("group", 2) and "tuner/trial_id" in last


# ------------------------------------------------------------------------------ distributed
SPACE = {"norm": ("batch", "group"), "batch_size": (2, 8), "model": ("small_cnn",),
         "placement": ("all",), "lr": (0.1,)}
TUNER_CLASSES = {"random": tuning.RandomSearch, "bayesian": tuning.BayesianOptimization,
                 "grid": tuning.GridSearch, "hyperband": tuning.Hyperband}


class SpaceOnly(kt.HyperModel):
    """The search space of `NormBatchHyperModel`, without models (trials are stand-ins)."""

    space = SPACE

    def declare_hyperparameters(self, hp):
        for name, values in SPACE.items():
            tuning._choose(hp, name, values)

    def build(self, hp):
        self.declare_hyperparameters(hp)


class WorkerDied(BaseException):
    """A stand-in trial's process "dies": no result, no end of trial, no more heartbeats."""


class StandInTrials:
    """Mixin: a trial sleeps a little and scores its values; `die_in_trial` = n makes this
    tuner's n-th trial die (see `WorkerDied`)."""

    die_in_trial = None
    started = 0

    def run_trial(self, trial, *args, **kwargs):
        self.started += 1
        if self.started == self.die_in_trial:
            self._heartbeat.set()
            raise WorkerDied(trial.trial_id)
        time.sleep(0.3)
        values = trial.hyperparameters.values
        return {"val_accuracy": 0.5 + 0.1 * (values["norm"] == "group")
                - 0.01 * values["batch_size"] + 0.001 * values.get("tuner/epochs", 0)}


def _stand_in_tuner(kind, directory):
    cls = type(f"StandIn{kind}", (StandInTrials, TUNER_CLASSES[kind]), {})
    common = dict(hypermodel=SpaceOnly(), objective=kt.Objective("val_accuracy", "max"),
                  directory=str(directory), project_name="search", seed=2)
    if kind == "hyperband":
        return cls(max_epochs=3, factor=3, **common)
    return cls(max_trials=None if kind == "grid" else 4, **common)


@pytest.mark.parametrize("kind", tuning.TUNERS)
def test_every_tuner_shares_its_search_over_grpc(kind, tmp_path, monkeypatch):
    """A chief oracle served over gRPC on 127.0.0.1 and two worker tuners in threads: every
    combination runs once (Hyperband: its whole plan), and the trial of a worker that dies
    mid-trial is given to the other worker once the chief stops hearing from it."""
    monkeypatch.setattr(tuning, "IDLE_POLL_SECONDS", 0.05)
    monkeypatch.setattr(tuning, "HEARTBEAT_SECONDS", 0.1)
    (port,) = launch.free_ports(1)
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(port))
    tuners = {}
    for tuner_id in ("chief", "tuner0", "tuner1"):
        monkeypatch.setenv("KERASTUNER_TUNER_ID", tuner_id)
        tuners[tuner_id] = _stand_in_tuner(kind, tmp_path)
    chief = tuners["chief"].oracle
    assert isinstance(chief, oracles.SharedSearchOracle)
    assert type(tuners["tuner0"].oracle).__name__ == "OracleClient"  # KerasTuner's gRPC proxy
    chief.worker_timeout = 1.0
    tuners["tuner1"].die_in_trial = 1
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")  # not the chief, for the threads

    stop = threading.Event()
    errors = []

    def guarded(target, *args, **kwargs):
        def run():
            try:
                target(*args, **kwargs)
            except WorkerDied:
                pass
            except BaseException as err:  # noqa: BLE001  reported below
                errors.append(err)
        return threading.Thread(target=run, daemon=True)

    server = guarded(tuning.serve_search, chief, f"127.0.0.1:{port}", poll_seconds=0.05,
                     stop_event=stop)
    server.start()
    workers = [guarded(tuners[tuner_id].search) for tuner_id in ("tuner0", "tuner1")]
    for thread in workers:
        thread.start()
    for thread in [*workers, server]:
        thread.join(timeout=120)
    stop.set()  # (only matters when the search hangs)
    server.join(timeout=10)
    assert not errors, errors
    assert not server.is_alive(), "the chief did not end the search"

    trials = [chief.trials[trial_id] for trial_id in sorted(chief.trials, key=int)]
    assert all(trial.status == "COMPLETED" for trial in trials)
    starts = chief.trial_workers
    died = [trial_id for trial_id, ids in starts.items() if ids[0] == "tuner1"]
    assert len(died) == 1  # tuner1 ran one trial only, and died in it ...
    assert starts[died[0]] == ["tuner1", "tuner0"]  # ... which tuner0 ran again
    assert all(ids == ["tuner0"] for trial_id, ids in starts.items() if trial_id != died[0])
    values = [trial.hyperparameters.values for trial in trials]
    combos = [(v["norm"], v["batch_size"]) for v in values]
    if kind == "hyperband":
        assert len(trials) == tuning.hyperband_plan(chief)[1]
        for bracket in {v["tuner/bracket"] for v in values}:
            first = [c for c, v in zip(combos, values)
                     if (v["tuner/bracket"], v["tuner/round"]) == (bracket, 0)]
            assert len(set(first)) == len(first)
    else:
        assert sorted(combos) == [("batch", 2), ("batch", 8), ("group", 2), ("group", 8)]
        # The chief of the finished search, started again, has nothing to serve.
        started = time.monotonic()
        tuning.serve_search(chief, f"127.0.0.1:{port}")
        assert time.monotonic() - started < 5


def test_a_search_started_on_one_machine_continues_distributed(tmp_path, monkeypatch):
    # KerasTuner alone would reload nothing under the new tuner id and start again.
    kwargs = dict(hypermodel=SpaceOnly(), directory=tmp_path, max_trials=2, seed=1)
    tuner = tuning.make_tuner("random", **kwargs)  # one machine: tuner id "tuner0"
    oracle = tuner.oracle
    for _ in range(2):
        trial = oracle.create_trial("tuner0")
        oracle.update_trial(trial.trial_id, {"val_accuracy": 0.5})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "1")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    chief = tuning.make_tuner("random", **kwargs)
    assert sorted(chief.oracle.trials) == ["0", "1"]
    assert {trial.status for trial in chief.oracle.trials.values()} == {"COMPLETED"}
    assert chief.oracle.trial_workers == {"0": ["tuner0"], "1": ["tuner0"]}


def test_a_silent_worker_loses_its_trial_to_the_next_one(tmp_path):
    """The oracle side of a lost worker, without gRPC: its trial goes back to the queue after
    `worker_timeout` seconds without a request; a worker asking meanwhile waits ("idle")
    instead of being told to stop, and the search ends once the trial is done."""
    hp = kt.HyperParameters()
    hp.Choice("norm", ["batch", "group"])
    oracle = oracles.GridOracle(objective=kt.Objective("val_accuracy", "max"), hyperparameters=hp)
    oracle._set_project_dir(str(tmp_path), "p")
    oracle.verbose = 0
    oracle.max_trials = oracle.grid_size()
    oracle.worker_timeout = 60.0
    first, second = oracle.create_trial("a"), oracle.create_trial("b")
    assert (first.status, second.status) == ("RUNNING", "RUNNING")
    oracle.update_trial(first.trial_id, {"val_accuracy": 0.5})
    first.status = "COMPLETED"
    oracle.end_trial(first)
    assert oracle.create_trial("a").status == "IDLE"  # b still runs: a stays for it
    assert oracle.requeue_lost_workers() == []
    assert oracle.create_trial("b").trial_id == second.trial_id  # b restarted: its own trial
    oracle._last_seen["b"] -= 61  # b silent for longer than worker_timeout
    assert oracle.requeue_lost_workers() == [("b", second.trial_id)]
    again = oracle.create_trial("a")
    assert again.trial_id == second.trial_id and again.status == "RUNNING"
    assert oracle.trial_workers == {first.trial_id: ["a"], second.trial_id: ["b", "b", "a"]}
    oracle.update_trial(again.trial_id, {"val_accuracy": 0.6})
    again.status = "COMPLETED"
    oracle.end_trial(again)
    late = kt.engine.trial.Trial(oracle.get_space(), trial_id=second.trial_id,
                                 status="COMPLETED")
    oracle.end_trial(late)  # b's late report changes nothing
    assert oracle.end_order == [first.trial_id, second.trial_id]
    assert oracle.create_trial("a").status == "STOPPED"
    assert oracle.search_finished()
    # The record survives a reload (oracle.json).
    reloaded = oracles.GridOracle(objective=kt.Objective("val_accuracy", "max"),
                                  hyperparameters=hp)
    reloaded._set_project_dir(str(tmp_path), "p")
    reloaded.reload()
    assert reloaded.trial_workers == oracle.trial_workers


def _start(argv, tuner_id, port, log, killed=False):
    """A `recipes.tune` process with this tuner id (`killed`: it dies, SIGKILL, after the first
    batch it trains; tests/kill_points.py)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERASTUNER_ORACLE_IP": "127.0.0.1",
           "KERASTUNER_ORACLE_PORT": str(port), "KERASTUNER_TUNER_ID": tuner_id}
    recipe = ([str(PROJECT_ROOT / "tests" / "kill_points.py"), "after-batch", "1"] if killed
              else ["-m"])
    return subprocess.Popen([sys.executable, *recipe, "recipes.tune", *map(str, argv)],
                            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_distributed_quick_search_survives_a_killed_worker(tmp_path):
    """`--quick` by a chief and two worker processes on 127.0.0.1, worker tuner0 training each
    of its trials on two replicas (`--strategy mirrored`); worker tuner1 is killed (SIGKILL)
    in the middle of its first trial and started again with its tuner id: it runs that trial
    again, every combination runs exactly once, and the chief writes the results with the
    worker of each trial."""
    output = tmp_path / "search"
    argv = ["--quick", "--output", output, *TINY]
    (port,) = launch.free_ports(1)
    names = ("chief", "tuner0", "tuner1", "tuner1-again")
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in names}
    processes = []
    try:
        chief = _start(argv, "chief", port, logs["chief"])
        worker0 = _start([*argv, "--strategy", "mirrored", "--cpu-replicas", "2"], "tuner0",
                         port, logs["tuner0"])
        killed = _start(argv, "tuner1", port, logs["tuner1"], killed=True)
        processes += [chief, worker0, killed]
        assert killed.wait(timeout=300) == -signal.SIGKILL
        again = _start(argv, "tuner1", port, logs["tuner1-again"])
        processes.append(again)
        statuses = [process.wait(timeout=300) for process in (worker0, again, chief)]
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        text = {}
        for name, log in logs.items():
            log.seek(0)
            text[name] = log.read()
            log.close()
    assert statuses == [0, 0, 0], {name: value[-2000:] for name, value in text.items()}

    rows = read_rows(output)
    assert sorted(pairs(rows)) == [("batch", 2), ("batch", 32), ("group", 2), ("group", 32)]
    assert all(row["status"] == "COMPLETED" for row in rows)
    assert {row["worker"] for row in rows} <= {"tuner0", "tuner1"}
    assert all(int(row["replicas"]) == (2 if row["worker"] == "tuner0" else 1) for row in rows)
    rerun = [row for row in rows if row["attempts"] == "2"]
    assert len(rerun) == 1 and rerun[0]["worker"] == "tuner1"  # its own trial, run again
    assert all(row["attempts"] == "1" for row in rows if row is not rerun[0])
    oracle = json.loads((output / "search" / "oracle.json").read_text())
    assert oracle["trial_workers"][rerun[0]["trial"]] == ["tuner1", "tuner1"]
    assert "| worker | runs |" in (output / "results.md").read_text()
    assert_png(output / "accuracy_vs_batch_size.png")
    assert "Results:" in text["chief"] and "trial(s) run here" in text["tuner1-again"]


def test_a_chief_that_cannot_listen_exits_2(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
        monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(port))
        monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
        assert run(["--quick", "--output", tmp_path, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"python -m recipes.tune: error: the chief oracle cannot listen on "
                       f"127.0.0.1:{port} (KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT): "
                       "address in use or not of this machine")


def test_oracles_still_work_from_tuning_and_warn():
    # recipes.oracles holds them; recipes.tuning.GridOracle etc. are the same objects, with a
    # DeprecationWarning naming recipes.oracles.
    for name in ("SharedSearchOracle", "GridOracle", "RandomSearchOracle",
                 "BayesianOptimizationOracle", "HyperbandOracle", "DEFAULT_WORKER_TIMEOUT"):
        assert tuning.MOVED[name] == "recipes.oracles"
        with pytest.warns(DeprecationWarning,
                          match=rf"recipes\.tuning\.{name} is deprecated.*use "
                                rf"recipes\.oracles\.{name}\."):
            assert getattr(tuning, name) is getattr(oracles, name), name
    with pytest.raises(AttributeError, match="'recipes.tuning' has no attribute "):
        tuning._enumerable_values  # noqa: B018 (private: not forwarded)


def test_documented_paths_do_not_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from recipes.oracles import GridOracle, HyperbandOracle  # noqa: F401
        from recipes.tuning import NormBatchHyperModel, make_tuner  # noqa: F401


def test_command_line_and_library_agree_on_the_heartbeat():
    # recipes.tune keeps its own copies (it imports no Keras before parsing).
    assert tune.DEFAULT_WORKER_TIMEOUT == oracles.DEFAULT_WORKER_TIMEOUT
    assert tune.HEARTBEAT_SECONDS == tuning.HEARTBEAT_SECONDS


def test_distributed_search_needs_every_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.delenv("KERASTUNER_ORACLE_PORT", raising=False)
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    assert run(["--quick", "--output", tmp_path, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KERASTUNER_ORACLE_PORT must be set too" in err[0]
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "http")
    assert run(["--quick", "--output", tmp_path, *TINY]) == 2
    assert "KERASTUNER_ORACLE_PORT must be a port number, got 'http'" in capsys.readouterr().err


def test_split_validation_is_disjoint_and_stratified():
    from recipes import datasets

    data = datasets.load_data(SMALL_NPZ)
    split = training.split_validation(data, 300, 100, seed=3)
    x_train, y_train, x_val, y_val = split.x_train, split.y_train, split.x_test, split.y_test
    assert len(y_train) == 300 and len(y_val) == 100
    assert np.bincount(y_val, minlength=10).tolist() == [10] * 10
    assert np.bincount(y_train, minlength=10).tolist() == [30] * 10
    train_keys = {image.tobytes() for image in x_train}
    assert not any(image.tobytes() in train_keys for image in x_val)


# ------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("argv, fragment", [
    (["--norms", "batch,no_such_norm"], "Unknown normalization 'no_such_norm'"),
    (["--tuner", "annealing"], "invalid choice: 'annealing'"),
    (["--norms", ""], "expected a comma-separated list"),
    (["--norms", " , "], "expected a comma-separated list"),
    (["--batch-sizes", ""], "expected a comma-separated list"),
    (["--batch-sizes", "8,0"], "batch sizes must be positive integers, got '0'"),
    (["--batch-sizes", "-4"], "batch sizes must be positive integers, got '-4'"),
    (["--batch-sizes", "8,x"], "batch sizes must be positive integers, got 'x'"),
    (["--lrs", "0.1,-1"], "learning rates must be numbers > 0"),
    (["--models", "vgg"], "unknown model(s) ['vgg']"),
    (["--placements", "sideways"], "placement"),
    (["--max-trials", "0"], "expected a positive integer"),
    (["--grid", "--tuner", "bayesian"], "--grid and --tuner bayesian exclude each other"),
    (["--tuner", "hyperband", "--hyperband-factor", "1"], "must be at least 2"),
    (["--norm-kwargs", '{"group": {"groups": 8}}', "--norms", "batch"],
     "names norms not searched"),
    (["--norm-kwargs", '{"batch": {"no_such_argument": 1}}'], "norm 'batch'"),
    (["--norms", "group", "--norm-kwargs", '{"group": {"groups": 5}}'],
     "must be divisible by groups (5)"),
    (["--placements", "all", "7"], "'small_cnn' has 3 norm positions"),
    (["--batch-sizes", "8,128"], "--batch-sizes [128] exceed the 64 training images"),
    (["--data", "/no/such/data.npz"], "does not exist"),
    (["--worker-timeout", "3"], "expected at least 10 seconds (workers beat every 2 s)"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, fragment):
    base = ["--data", str(SMALL_NPZ), "--train-size", "64", "--val-size", "32",
            "--output", str(tmp_path / "out")]
    assert run(base + argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m recipes.tune: error:")
    assert fragment in lines[0]
    assert not (tmp_path / "out" / "search").exists()  # nothing started
