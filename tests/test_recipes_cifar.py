"""End-to-end tests of `python -m recipes.cifar`: outputs, resume, mirrored and multi-worker
runs, the evaluation modes, and bad arguments.

The distributed tests compare against one reference run on a single device: with synchronized
batch norm (`sync_batch`) and the same seed, a global batch split over two replicas (mirrored)
or two worker processes (multi-worker) trains exactly as one device on the whole batch, so the
final weights and moving statistics must agree. The reference run is itself killed after its
first epoch and resumed, so agreement also shows that resuming loses nothing.

Everything trains a few hundred images of the shared cifar10-small.npz for two short epochs.
"""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_norm  # noqa: F401  (registers the layers that saved models are loaded with)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from recipes import cifar, outputs, training  # noqa: E402
from recipes.config import RunConfig  # noqa: E402

SMALL_NPZ = "../shared/data/cifar10-small.npz"  # relative to the project root, as documented
# Two epochs of 10 random batches of 20 images; sync_batch, so that every strategy computes the
# statistics of the whole global batch.
RUN = ["--data", SMALL_NPZ, "--train-size", "200", "--test-size", "100", "--batch-size", "20",
       "--epochs", "2", "--norm", "sync_batch", "--seed", "3", "--verbose", "2"]
TIMEOUT = 300


KILLED_AFTER_EPOCH_1 = [str(PROJECT_ROOT / "tests" / "kill_points.py"), "after-checkpoint", "1"]


def _recipe(killed=False):
    """The command of `recipes.cifar`, or of it killed (SIGKILL) right after the checkpoint
    of epoch 1, as a killed job would be (tests/kill_points.py)."""
    return [sys.executable, *KILLED_AFTER_EPOCH_1, "recipes.cifar"] if killed else [
        sys.executable, "-m", "recipes.cifar"]


def _cli(args, env=None, killed=False):
    """Runs the recipe from the project root in a fresh process."""
    environment = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    environment.update({"TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    return subprocess.run([*_recipe(killed), *args], cwd=PROJECT_ROOT, env=environment,
                          capture_output=True, text=True, timeout=TIMEOUT)


def _results(output):
    return json.loads((Path(output) / "results.json").read_text())


def _weights(path):
    model = keras.models.load_model(path)
    return {variable.path: np.asarray(variable) for variable in model.weights}


def _assert_same_weights(actual, expected, atol):
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=atol, rtol=0, err_msg=name)


def _make_reference(output):
    """One device, killed right after epoch 1's checkpoint, then started again."""
    args = RUN + ["--output", str(output)]
    killed = _cli(args, killed=True)
    state = {
        "killed": [killed.returncode, killed.stdout, killed.stderr[-3000:]],
        # (Read defensively: a failed run must fail the tests, not this fixture.)
        "csv_after_kill": (output / outputs.CSV_NAME).read_text()
        if (output / outputs.CSV_NAME).exists() else "",
        "checkpoints_after_kill": sorted(p.name for p in (output / "checkpoints").glob("*")),
        "results_after_kill": (output / "results.json").exists(),
    }
    resumed = _cli(args)
    state["resumed"] = [resumed.returncode, resumed.stdout, resumed.stderr[-3000:]]
    state["output"] = str(output)
    return state


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The reference run, made once per test session even when pytest-xdist workers share it
    (the first worker to ask makes it; the others wait on a lock and read its record)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, common to all workers
    record = root / "cifar-reference.json"
    with open(root / "cifar-reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            output = root / "cifar-reference"
            output.mkdir()
            record.write_text(json.dumps(_make_reference(output)))
    state = json.loads(record.read_text())
    state["output"] = Path(state["output"])
    return state


def test_resume_continues_from_epoch_2(reference_run):
    (killed_status, killed_out, killed_err), (status, out, err) = (reference_run["killed"],
                                                                   reference_run["resumed"])
    assert killed_status == -signal.SIGKILL, killed_err
    assert "Epoch 1/2" in killed_out and "Epoch 2/2" not in killed_out
    assert reference_run["csv_after_kill"].count("\n") == 2  # header + epoch 1
    assert "ckpt-1.index" in reference_run["checkpoints_after_kill"]
    assert not reference_run["results_after_kill"]

    assert status == 0, err
    assert "Resuming from" in out and "1/2 epochs already done" in out
    assert "Epoch 2/2" in out and "Epoch 1/2" not in out
    output = reference_run["output"]
    lines = (output / outputs.CSV_NAME).read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch", "1", "2"]
    results = _results(output)
    assert results["training"]["resumed_at_epoch"] == 1
    assert [row["epoch"] for row in results["training"]["history"]] == [1, 2]
    # The learning-rate schedule continued from the restored step: cosine over 20 steps.
    assert results["training"]["history"][1]["learning_rate"] == pytest.approx(0.0, abs=1e-7)


def test_outputs_of_a_run(reference_run):
    output = reference_run["output"]
    results = _results(output)
    assert results["config"]["norm"] == "sync_batch"
    assert results["data"]["train_images"] == 200 and results["data"]["test_images"] == 100
    assert results["training"]["replicas"] == 1
    assert results["training"]["steps_per_epoch"] == 10
    assert results["training"]["learning_rate"] == pytest.approx(0.1 * 20 / 128)
    assert len(results["model"]["norm_layers"]) == 3
    # auto: population, batch and recomputed statistics for a batch-dependent norm.
    assert set(results["evaluation"]) == {"population", "batch", "recomputed"}
    for metrics in results["evaluation"].values():
        assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
    # The training loop's own test pass and the single-device evaluation copy agree.
    last = results["training"]["history"][-1]
    assert results["evaluation"]["population"]["accuracy"] == pytest.approx(
        last["test_accuracy"], abs=1e-6)
    assert results["evaluation"]["population"]["loss"] == pytest.approx(last["test_loss"],
                                                                        rel=1e-4)
    for name in ("curves.png", "evaluation.png"):
        data = (output / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    report = (output / "report.md").read_text()
    assert "| population |" in report and "| recomputed |" in report
    assert "![accuracy and loss per epoch](curves.png)" in report
    assert "resumed from its checkpoint after epoch 1" in report
    assert list((output / "logs" / "train").glob("events.out.tfevents.*"))
    summary = reference_run["resumed"][1]
    assert "test accuracy, population:" in summary and "report.md" in summary


def test_mirrored_two_replicas_match_one_device(reference_run, tmp_path):
    result = _cli(RUN + ["--output", str(tmp_path), "--strategy", "mirrored",
                         "--cpu-replicas", "2", "--eval", "population"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert _results(tmp_path)["training"]["replicas"] == 2
    _assert_same_weights(_weights(tmp_path / "model.keras"),
                         _weights(reference_run["output"] / "model.keras"), atol=1e-3)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _run_workers(args, output, count=2, killed=False):
    """Runs `count` worker processes of one multi-worker cluster on 127.0.0.1 (`killed`: each
    killed after epoch 1's checkpoint); returns `[(returncode, stdout, stderr)]`."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(count)]
    processes = []
    for index in range(count):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(tf_config)}
        processes.append(subprocess.Popen(
            [*_recipe(killed), *args, "--output", str(output),
             "--strategy", "multiworker"], cwd=PROJECT_ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [process.communicate(timeout=TIMEOUT) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [(process.returncode, *out) for process, out in zip(processes, outputs)]


def test_multiworker_two_processes_killed_and_resumed(reference_run, tmp_path):
    """Two workers train in lock step, are killed after epoch 1, resume from the chief's
    checkpoint, and end with the same weights as each other and as one device."""
    args = RUN + ["--eval", "population"]
    for returncode, _, stderr in _run_workers(args, tmp_path, killed=True):
        assert returncode == -signal.SIGKILL, stderr[-2000:]
    assert (tmp_path / "checkpoints" / "ckpt-1.index").exists()
    runs = _run_workers(args, tmp_path)
    for returncode, _, stderr in runs:
        assert returncode == 0, stderr[-2000:]
    chief_out, worker_out = runs[0][1], runs[1][1]
    assert "1/2 epochs already done" in chief_out and "Epoch 2/2" in chief_out
    assert "Epoch 1/2" not in chief_out and "Epoch" not in worker_out  # the chief reports
    chief, worker = _results(tmp_path), _results(tmp_path / "worker-1")
    assert chief["training"]["replicas"] == worker["training"]["replicas"] == 2
    assert chief["training"]["resumed_at_epoch"] == worker["training"]["resumed_at_epoch"] == 1
    chief_weights = _weights(tmp_path / "model.keras")
    _assert_same_weights(_weights(tmp_path / "worker-1" / "model.keras"), chief_weights, 0.0)
    assert len([name for name in chief_weights if "moving_" in name]) == 6
    _assert_same_weights(chief_weights, _weights(reference_run["output"] / "model.keras"),
                         atol=1e-3)
    # Only the chief keeps checkpoints and logs; the other worker's scratch copies are gone.
    assert not list(tmp_path.glob(".worker-*"))
    assert sorted(p.name for p in (tmp_path / "worker-1").iterdir()) == ["model.keras",
                                                                         "results.json"]


# --------------------------------------------------------------------------- in-process runs
def _main(argv, capsys):
    status = cifar.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_balanced_preset_with_mixed_precision_and_adamw(tmp_path, capsys):
    """Balanced batches and every balanced evaluation mode, under mixed precision + AdamW."""
    status, out, err = _main(["--preset", "balanced", "--data", SMALL_NPZ, "--train-size",
                              "100", "--test-size", "50", "--epochs", "1", "--mixed-precision",
                              "--optimizer", "adamw", "--verbose", "0", "--output",
                              str(tmp_path)], capsys)
    assert status == 0, err
    results = _results(tmp_path)
    assert results["config"]["batch_structure"] == "balanced"
    assert results["training"]["global_batch_size"] == 10  # 1 image per class
    assert results["training"]["steps_per_epoch"] == 10
    assert np.isfinite(results["training"]["history"][0]["loss"])
    done = set(results["evaluation"]) | set(results["skipped_evaluation"])
    assert done == {"population", "batch", "balanced", "pseudo_balanced"}
    assert {"population", "batch", "balanced"} <= set(results["evaluation"])
    # An untrained model may predict too few classes to fill pseudo-balanced batches; the
    # report then says why instead of failing the run.
    if "pseudo_balanced" in results["skipped_evaluation"]:
        assert "examples_per_class" in results["skipped_evaluation"]["pseudo_balanced"]
    else:
        assert 0 < results["evaluation"]["pseudo_balanced"]["coverage"] <= 1
    model = keras.models.load_model(tmp_path / "model.keras")
    assert model.get_layer("conv1").compute_dtype == "float16"
    assert model.get_layer("conv1_norm").moving_mean.dtype == "float32"


def test_head_norm_is_built_recorded_and_evaluated(tmp_path, capsys):
    """--head-norm batch: BN between the classifier's Dense and the logits, in the saved model,
    results.json and report.md; the assignment mode reports its decomposition."""
    status, out, err = _main(["--data", SMALL_NPZ, "--train-size", "100", "--test-size", "50",
                              "--batch-structure", "balanced", "--epochs", "1", "--head-norm",
                              "batch", "--eval", "population,assignment", "--verbose", "1",
                              "--output", str(tmp_path)], capsys)
    assert status == 0, err
    results = _results(tmp_path)
    assert results["config"]["head_norm"] == "batch"
    assert results["model"]["norm_layers"][-1] == "logits_norm"
    model = keras.models.load_model(tmp_path / "model.keras")
    assert [layer.name for layer in model.layers][-3:] == ["logits", "logits_norm",
                                                           "logits_float32"]
    assignment = results["evaluation"]["assignment"]
    assert assignment["coverage"] == 1.0  # 50 test images, 5 per class: 5 batches of 10
    assert 0 <= assignment["assignment_accuracy"] <= 1
    assert 0 <= assignment["population_accuracy"] <= 1
    report = (tmp_path / "report.md").read_text()
    assert "head norm (after the classifier's Dense) batch" in report
    assert "the assignment alone is" in report
    assert "head norm batch" in out
    # The default is no head norm, recorded as null, and a resumed run must keep it.
    _, args = cifar.parse_args([])
    assert cifar.to_config(args).head_norm is None
    status, _, err = _main(["--data", SMALL_NPZ, "--train-size", "100", "--test-size", "50",
                            "--batch-structure", "balanced", "--epochs", "1", "--output",
                            str(tmp_path)], capsys)
    assert status == 2 and "head_norm: 'batch' -> None" in err


def test_jit_compiles_the_steps(tmp_path, capsys, monkeypatch):
    """--jit reaches the training and evaluation steps: both are traced as XLA functions and
    run (a recorded flag alone would pass with --jit ignored)."""
    compiled = []
    original = tf.function

    def recording_function(func=None, **kwargs):
        if func is None:
            return lambda f: recording_function(f, **kwargs)
        if not kwargs.get("jit_compile") or func.__name__ not in ("train_fn", "test_fn"):
            return original(func, **kwargs)

        def traced(*args):
            compiled.append(func.__name__)
            return func(*args)
        return original(traced, **kwargs)

    monkeypatch.setattr(tf, "function", recording_function)
    status, _, err = _main(["--data", SMALL_NPZ, "--train-size", "60", "--test-size", "20",
                            "--batch-size", "20", "--epochs", "1", "--jit", "--eval",
                            "population", "--verbose", "0", "--output", str(tmp_path)], capsys)
    assert status == 0, err
    assert {"train_fn", "test_fn"} <= set(compiled), compiled
    assert _results(tmp_path)["config"]["jit"] is True


def test_a_diverging_run_stops_and_says_so(tmp_path, capsys):
    """No normalization and an absurd learning rate: the loss becomes NaN; the run stops in
    that epoch, says so, and records it instead of training on NaN."""
    status, out, err = _main(["--data", SMALL_NPZ, "--train-size", "60", "--test-size", "20",
                              "--batch-size", "20", "--norm", "none", "--epochs", "3", "--lr",
                              "1e30", "--eval", "population", "--verbose", "2", "--output",
                              str(tmp_path)], capsys)
    assert status == 0, err
    results = _results(tmp_path)
    assert "Training diverged in epoch" in out
    assert ("No epoch finished" in out) == (results["training"]["diverged_at_epoch"] == 1)
    diverged = results["training"]["diverged_at_epoch"]
    assert diverged is not None and len(results["training"]["history"]) == diverged - 1
    assert "Training diverged" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------- bad arguments
BAD_ARGUMENTS = [
    (["--norm", "btach"], "Unknown normalization 'btach'. Did you mean 'batch'?"),
    (["--batch-structure", "balanced", "--batch-size", "15"],
     "needs a batch size divisible by the 10 classes"),
    (["--batch-structure", "balanced", "--batch-size", "20", "--examples-per-class", "3"],
     "--examples-per-class 3 and --batch-size 20 disagree"),
    (["--examples-per-class", "2"], "only applies with --batch-structure balanced"),
    (["--placement", "sideways"], "must be one of"),
    (["--placement", "7"], "position 7, but 'small_cnn' has 3 norm positions"),
    (["--norm-kwargs", "momentum=2"], "BatchNormalization: argument `momentum` must be in"),
    (["--norm", "group", "--norm-kwargs", "groups=64"], "must be divisible by groups (64)"),
    (["--strategy", "mirrored", "--jit"], "not supported on CPU"),
    (["--strategy", "multiworker", "--jit"], "not supported on CPU"),
    (["--strategy", "multiworker"], "needs the TF_CONFIG environment variable"),
    (["--data", SMALL_NPZ, "--dataset", "cifar10"], "either --data or --dataset"),
    (["--train-size", "5000"], "train_size"),
    (["--head-norm", "btach"], "Unknown normalization 'btach'. Did you mean 'batch'?"),
    (["--head-norm", "cross_iteration"], "'cross_iteration' is a 'conv_wrapper' and needs a "
                                         "convolution"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    argv = ["--data", SMALL_NPZ, "--output", str(tmp_path), *extra]
    if "--dataset" in extra:
        argv = argv[2:]
    status, out, err = _main(argv, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m recipes.cifar: error: ")
    assert message in lines[0]
    assert not (tmp_path / "checkpoints").exists()


def test_invalid_tf_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    status, _, err = _main(["--strategy", "multiworker", "--output", str(tmp_path)], capsys)
    assert status == 2 and "TF_CONFIG is not valid JSON with 'cluster' and 'task'" in err


def test_missing_data_path(tmp_path, capsys):
    status, _, err = _main(["--data", str(tmp_path / "nowhere.npz")], capsys)
    assert status == 2
    assert "does not exist" in err and "--data PATH" in err and len(err.splitlines()) == 1


def test_parser_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cifar.main(["--epochs", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epochs: expected a positive integer, got '0'" in err


def test_resuming_with_other_settings_is_refused(tmp_path, capsys):
    (tmp_path / outputs.RUN_CONFIG_NAME).write_text(json.dumps(
        {**RunConfig().replace(model="resnet20").to_dict()}))
    status, _, err = _main(["--data", SMALL_NPZ, "--train-size", "100", "--output",
                            str(tmp_path)], capsys)
    assert status == 2
    assert "holds a run with other settings (model: 'resnet20' -> 'small_cnn'" in err


def test_run_config_groups_the_settings_and_reads_runs_recorded_flat(tmp_path):
    from recipes import config as run_config

    _, args = cifar.parse_args(["--data", SMALL_NPZ, "--model", "resnet20", "--lr", "0.05",
                                "--eval", "population", "--head-norm", "none",
                                "--train-size", "all", "--seed", "4"])
    config = cifar.to_config(args)
    assert (config.network.model, config.optimization.lr, config.data.source) == (
        "resnet20", 0.05, SMALL_NPZ)
    assert (config.evaluation.eval_modes, config.network.head_norm, config.data.train_size,
            config.run.seed) == (("population",), None, None, 4)
    assert config.output == os.path.join("runs", "cifar", "resnet20-batch-all-seed4")
    # A results.json / run_config.json written before the settings were grouped: flat, with
    # the retired stop_after_epochs; it loads unchanged and the run it records resumes.
    recorded = {**config.to_dict(), "eval_modes": ["population"], "stop_after_epochs": None}
    assert run_config.RunConfig.from_dict(recorded) == config
    assert set(config.to_dict()) == set(recorded) - {"stop_after_epochs"}
    (tmp_path / outputs.RUN_CONFIG_NAME).write_text(json.dumps(recorded))
    outputs.check_resumable(tmp_path / outputs.RUN_CONFIG_NAME, config.to_dict(),
                            training.RESUME_KEYS)
    # Flat names read and write their group; a typo is an error, not a new setting.
    changed = config.replace(lr=0.2)
    assert (changed.optimization.lr, config.lr) == (0.2, 0.05)
    changed.batch_size = 64
    assert changed.data.batch_size == 64 and config.batch_size is None
    with pytest.raises(AttributeError, match="no setting 'batchsize'"):
        changed.batchsize = 64
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['batchsize'\]"):
        run_config.RunConfig.from_dict({"batchsize": 64})


def test_run_config_takes_flat_settings_too():
    # As before the settings were grouped: RunConfig(lr=0.1) and dataclasses.replace.
    import dataclasses

    config = RunConfig(lr=0.1, epochs=3, batch_size=32)
    assert (config.optimization.lr, config.optimization.epochs, config.data.batch_size) == (
        0.1, 3, 32)
    assert config == RunConfig().replace(lr=0.1, epochs=3, batch_size=32)
    changed = dataclasses.replace(config, lr=0.2)
    assert (changed.lr, changed.epochs, config.lr) == (0.2, 3, 0.1)  # config stays as it was
    assert changed.optimization is not config.optimization
    # Groups and flat settings together: the settings apply to (a copy of) the given group.
    network = type(config.network)(model="resnet20")
    mixed = RunConfig(network=network, norm="group", seed=5)
    assert (mixed.model, mixed.norm, mixed.seed, network.norm) == (
        "resnet20", "group", 5, "batch")
    assert RunConfig(network=network).network is network
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['batchsize', 'lrr'\]"):
        RunConfig(lrr=0.1, batchsize=4)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['lrr'\]"):
        dataclasses.replace(config, lrr=0.1)


def test_presets_set_the_papers_settings_and_flags_override_them():
    _, args = cifar.parse_args(["--preset", "mn_cnn", "--epochs", "3"])
    config = cifar.to_config(args)
    assert (config.model, config.norm, config.placement, config.other_norm) == (
        "mn_cnn", "mixture", "2", "batch")
    assert (config.optimizer, config.lr, config.weight_decay, config.schedule) == (
        "adamw", 5e-4, 1e-4, "constant")
    assert (config.batch_size, config.epochs, config.train_size) == (256, 3, None)
    _, args = cifar.parse_args(["--preset", "balanced"])
    config = cifar.to_config(args)
    assert config.batch_structure == "balanced" and config.batch_size is None
    assert config.eval_modes == ("population", "batch", "balanced", "pseudo_balanced")


def test_learning_rate_scaling_and_schedule():
    config = RunConfig().replace(lr=0.1, batch_size=256, warmup_epochs=1.0)
    schedule = training.learning_rate_schedule(config, total_steps=100, steps_in_epoch=10)
    assert training.scaled_learning_rate(config) == pytest.approx(0.2)
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 100)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.1, 0.0], abs=1e-6)  # warm-up, then cosine
    constant = RunConfig().replace(lr=0.1, batch_size=64, schedule="constant")
    assert training.learning_rate_schedule(constant, 100, 10) == pytest.approx(0.05)


def test_weight_decay_applies_to_kernels_only():
    from recipes import models

    model = models.build_model("small_cnn", norm="batch")
    config = RunConfig().replace(lr=0.128, batch_size=128, weight_decay=0.5,
                                 schedule="constant", momentum=0.0)
    optimizer = training.make_optimizer(config, 10, 10, model.trainable_variables)
    before = {v.path: np.array(v) for v in model.trainable_variables}
    optimizer.apply_gradients([(np.zeros(v.shape, "float32"), v)
                               for v in model.trainable_variables])
    for variable in model.trainable_variables:
        factor = 1 - 0.128 * 0.5 if variable.name == "kernel" else 1.0
        np.testing.assert_allclose(np.array(variable), before[variable.path] * factor,
                                   rtol=1e-6, err_msg=variable.path)


def test_help_explains_the_default_and_the_modes():
    text = cifar.build_parser().format_help()
    for fragment in ("With no arguments: a small CNN with batch norm", "10,000 training images",
                     "--preset", "pseudo_balanced", "resuming:", "sync_batch",
                     "scaled linearly with the global batch"):
        assert fragment in " ".join(text.split()), fragment


def test_moved_names_still_work_from_training_and_warn():
    # The settings, the strategy, the output folder and the evaluation modes have their own
    # modules; recipes.training.<name> is the same object, with a DeprecationWarning.
    from recipes import config, distribution, evaluation_modes, outputs

    homes = {config: ("RunConfig", "ConfigError", "BATCH_STRUCTURES", "EVAL_MODES",
                      "OPTIMIZERS", "SCHEDULES", "STRATEGIES"),
             distribution: ("configure_cpu_replicas", "create_strategy"),
             outputs: ("CSV_NAME", "RUN_CONFIG_NAME", "CSV_FIELDS", "RUN_FOLDERS", "RUN_FILES",
                       "clear_outputs", "check_resumable"),
             evaluation_modes: ("resolve_eval_modes", "evaluate_modes")}
    assert {name: module.__name__ for module, names in homes.items() for name in names} == (
        training.MOVED)
    for module, names in homes.items():
        for name in names:
            with pytest.warns(DeprecationWarning,
                              match=rf"recipes\.training\.{name} is deprecated.*use "
                                    rf"{module.__name__}\.{name}\."):
                assert getattr(training, name) is getattr(module, name), name
    with pytest.warns(DeprecationWarning, match="recipes.training.RunConfig is deprecated"):
        namespace = {}
        exec("from recipes.training import RunConfig", namespace)
    assert namespace["RunConfig"] is config.RunConfig
    with pytest.raises(AttributeError, match="'recipes.training' has no attribute 'nothing'"):
        training.nothing  # noqa: B018
    assert not hasattr(training, "EVAL_BATCH_SIZE")  # the test pass batches with batch_size
