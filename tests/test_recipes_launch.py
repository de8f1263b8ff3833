"""Tests for `python -m recipes.launch`, the one-machine launcher of multi-worker runs.

The process handling (environments, Ctrl-C forwarding, the chief's exit status, restarting a
dead search worker, killing what ignores Ctrl-C) is tested with a tiny stand-in module that
the launcher runs through `--module` (no TensorFlow, a second or two each); one end-to-end
test trains `recipes.cifar` on two workers through the launcher.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from recipes import launch  # noqa: E402

SMALL_NPZ = "../shared/data/cifar10-small.npz"  # relative to the project root
TIMEOUT = 300

# Stand-in for a recipe. A process named in FAKE_DIE_ONCE kills itself (SIGKILL) on its first
# start; the others print "ready NAME ARGS" and then, by FAKE_MODE:
#   wait: wait for SIGINT ("interrupted NAME", status 130); with FAKE_IGNORE=NAME that
#         process ignores SIGINT and has to be killed;
#   finish: the workers write FAKE_DIR/done-NAME and exit 0; the chief waits for
#         FAKE_WORKERS such files and exits with FAKE_CHIEF_STATUS.
# A tune chief listens on its port (the launcher starts the workers once it does).
FAKE = textwrap.dedent('''
    import json, os, signal, socket, sys, time
    env = os.environ
    task = json.loads(env.get("TF_CONFIG", "{}")).get("task", {})
    name = env.get("KERASTUNER_TUNER_ID") or "worker-%d" % task.get("index", -1)
    folder = env["FAKE_DIR"]
    if name == "chief":
        server = socket.socket()
        server.bind((env["KERASTUNER_ORACLE_IP"], int(env["KERASTUNER_ORACLE_PORT"])))
        server.listen()
    starts = os.path.join(folder, "starts-" + name)
    with open(starts, "a") as handle:
        handle.write("x")
    if name == env.get("FAKE_DIE_ONCE") and os.path.getsize(starts) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    def on_int(signum, frame):
        print("interrupted", name, flush=True)
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.SIG_IGN if env.get("FAKE_IGNORE") == name else on_int)
    print("ready", name, " ".join(sys.argv[1:]), flush=True)
    deadline = time.time() + 60
    if env["FAKE_MODE"] == "wait":
        while time.time() < deadline:
            time.sleep(0.05)
        sys.exit(1)
    if name == "chief":
        while time.time() < deadline:
            done = [f for f in os.listdir(folder) if f.startswith("done-")]
            if len(done) == int(env["FAKE_WORKERS"]):
                sys.exit(int(env["FAKE_CHIEF_STATUS"]))
            time.sleep(0.05)
        sys.exit(1)
    open(os.path.join(folder, "done-" + name), "w").close()
''')


@pytest.fixture
def fake(tmp_path):
    """`(environment, folder)` to launch the stand-in module `fake_recipe`."""
    (tmp_path / "fake_recipe.py").write_text(FAKE)
    folder = tmp_path / "state"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PROJECT_ROOT)]),
           "FAKE_DIR": str(folder)}
    return env, folder


def _launcher(argv, env):
    return subprocess.Popen([sys.executable, "-m", "recipes.launch", *argv], cwd=PROJECT_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(process, timeout=60):
    """The launcher's `(status, output)`; it (and its group) is killed if it hangs."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, output


# ------------------------------------------------------------------------------ commands
def test_print_gives_every_worker_its_tf_config(capsys):
    assert launch.main(["--print", "--workers", "3", "--", "--norm", "sync_batch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::2] == ["# worker 0", "# worker 1", "# worker 2"]
    configs = []
    for line in lines[1::2]:
        assert line.endswith("-m recipes.cifar --norm sync_batch --strategy multiworker")
        configs.append(json.loads(line.split("TF_CONFIG='", 1)[1].split("'", 1)[0]))
    cluster = configs[0]["cluster"]["worker"]
    assert len(set(cluster)) == 3 and all(a.startswith("127.0.0.1:") for a in cluster)
    assert [c["cluster"]["worker"] for c in configs] == [cluster] * 3
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]


def test_print_gives_the_search_chief_and_workers_one_oracle_address(capsys):
    assert launch.main(["--print", "--recipe", "tune", "--workers", "2", "--", "--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::2] == ["# chief", "# tuner0", "# tuner1"]
    ports = set()
    for name, line in zip(("chief", "tuner0", "tuner1"), lines[1::2]):
        assert "KERASTUNER_ORACLE_IP=127.0.0.1 " in line
        assert f"KERASTUNER_TUNER_ID={name} " in line
        assert line.endswith("-m recipes.tune --quick")
        ports.add(line.split("KERASTUNER_ORACLE_PORT=", 1)[1].split()[0])
    assert len(ports) == 1


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = launch.free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_another_strategy_is_refused_in_one_line(capsys):
    assert launch.main(["--workers", "2", "--", "--strategy", "mirrored"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs --strategy multiworker" in err[0]


@pytest.mark.parametrize("argv, fragment", [
    (["--workers", "0"], "expected a positive integer"),
    (["--recipe", "train"], "invalid choice: 'train'"),
    (["--restarts", "-1"], "expected an integer >= 0, got '-1'"),
    (["--restarts", "x"], "expected an integer, got 'x'"),
])
def test_bad_arguments_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        launch.main(argv)
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err


def test_exit_status_of_a_killed_process():
    assert launch.exit_status(-signal.SIGKILL) == 137
    assert launch.exit_status(3) == 3


# ------------------------------------------------------------------------------ processes
def test_ctrl_c_is_forwarded_once_and_what_ignores_it_is_killed(fake):
    env, folder = fake
    env = {**env, "FAKE_MODE": "wait", "FAKE_IGNORE": "tuner1"}
    process = _launcher(["--recipe", "tune", "--workers", "2", "--grace", "2", "--module",
                         "fake_recipe", "--", "--some", "arg"], env)
    try:
        deadline = time.time() + 60
        while (len(list(folder.glob("starts-*"))) < 3 and time.time() < deadline
               and process.poll() is None):
            time.sleep(0.1)
        time.sleep(1.0)  # each has set its SIGINT handler and printed "ready"
        os.kill(process.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches the launcher only
    finally:
        status, output = _finish(process)
    assert status == 130, output  # the chief's status
    for name in ("chief", "tuner0", "tuner1"):
        assert f"[{name}] ready {name} --some arg" in output
        assert (folder / f"starts-{name}").read_text() == "x"  # started once
    assert output.count("[chief] interrupted chief") == 1
    assert output.count("[tuner0] interrupted tuner0") == 1
    assert "interrupted tuner1" not in output  # it ignores SIGINT ...
    assert "killing tuner1" in output  # ... and was killed after the grace period


def test_a_dead_search_worker_is_started_again_and_the_chief_status_returned(fake):
    env, folder = fake
    env = {**env, "FAKE_MODE": "finish", "FAKE_DIE_ONCE": "tuner1", "FAKE_WORKERS": "2",
           "FAKE_CHIEF_STATUS": "3"}
    status, output = _finish(_launcher(["--recipe", "tune", "--workers", "2", "--module",
                                        "fake_recipe"], env))
    assert status == 3, output
    assert (folder / "starts-tuner1").read_text() == "xx"  # killed once, started again
    assert (folder / "starts-tuner0").read_text() == "x"
    assert "tuner1 ended with status 137" in output
    assert "starting tuner1 again (1/2 restarts)" in output
    assert sorted(p.name for p in folder.glob("done-*")) == ["done-tuner0", "done-tuner1"]


def test_a_failed_training_worker_stops_the_others(fake):
    env, folder = fake
    # worker-1 dies on its first start; training is not restarted: the others are stopped.
    env = {**env, "FAKE_MODE": "wait", "FAKE_DIE_ONCE": "worker-1"}
    status, output = _finish(_launcher(["--workers", "2", "--grace", "2", "--module",
                                        "fake_recipe"], env))
    assert "worker 1 ended with status 137" in output, output
    assert "a worker failed: stopping the others" in output
    assert status == 128 + signal.SIGTERM  # worker 0, the chief, was stopped
    assert (folder / "starts-worker-1").read_text() == "x"  # not started again


def test_a_lost_worker_is_reported_with_what_to_do():
    """TensorFlow's health check aborts the collectives of the workers left when one dies;
    the training loop says so in one line instead of a collective-op traceback."""
    import tensorflow as tf

    from recipes import training

    message = ("{{function_node __wrapped__CollectiveReduceV2}} Collective ops is aborted by: "
               "Error reported from /job:worker/task:1: The following tasks are unhealthy "
               "(stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have "
               "crashed. [Op:CollectiveReduceV2]")

    def step(batch):
        raise tf.errors.UnavailableError(None, None, message)

    with pytest.raises(training.WorkerLostError) as lost:
        training._run_epoch(step, [(1, 2)])
    assert str(lost.value) == (
        "another worker of the cluster stopped (TensorFlow's health check: "
        "/job:worker/replica:0/task:1 stopped sending heartbeats); start every worker again "
        "with the same command: they resume from the chief's last checkpoint")


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_two_training_workers_through_the_launcher(tmp_path):
    """`recipes.cifar` on two workers: the chief's status, outputs where documented, and
    synchronized statistics identical on both workers."""
    import keras
    import numpy as np

    import keras_norm  # noqa: F401  (registers the layers of the saved models)

    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    argv = ["--workers", "2", "--", "--data", SMALL_NPZ, "--train-size", "100", "--test-size",
            "50", "--batch-size", "20", "--epochs", "1", "--norm", "sync_batch", "--eval",
            "population", "--verbose", "2", "--output", str(tmp_path)]
    status, output = _finish(_launcher(argv, env), timeout=TIMEOUT)
    assert status == 0, output[-3000:]
    assert "[worker 0] Epoch 1/1" in output and "[worker 1] Epoch" not in output
    chief = json.loads((tmp_path / "results.json").read_text())
    other = json.loads((tmp_path / "worker-1" / "results.json").read_text())
    assert chief["training"]["replicas"] == other["training"]["replicas"] == 2
    assert chief["training"]["global_batch_size"] == 20
    assert (tmp_path / "checkpoints" / "ckpt-1.index").exists()
    weights = [{v.path: np.asarray(v) for v in keras.models.load_model(path).weights}
               for path in (tmp_path / "model.keras", tmp_path / "worker-1" / "model.keras")]
    moving = [name for name in weights[0] if "moving_" in name]
    assert len(moving) == 6
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
