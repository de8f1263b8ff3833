"""KerasTuner search over normalization type x batch size: the library behind `recipes.tune`.

- `NormBatchHyperModel`: a `keras_tuner.HyperModel` over the model, the normalization, its
  placement, the base learning rate and the batch size. A trial is the `recipes.cifar` run of
  its hyperparameters (`trial_config`, a `recipes.config.RunConfig`), trained by
  `recipes.training.fit` (`train`): the same model building, learning-rate scaling and
  schedule, optimizer, augmentation, input pipeline, checkpoints, logs and divergence
  handling, on the search's training images, scored on its validation images.
- `GridSearch`, `RandomSearch`, `BayesianOptimization`, `Hyperband`: the tuners, over the
  oracles of `recipes.oracles` (`GridOracle`, `RandomSearchOracle`,
  `BayesianOptimizationOracle`, `HyperbandOracle`: every combination once and resumable, no
  repeated trials, Hyperband fitted to a small finite space; see there).
- `make_tuner(...)`: the tuner of a given kind (`random`, `bayesian`, `hyperband`, `grid`),
  resumable (`overwrite=False` reloads the project). Each tuner runs its trials through
  `NormBatchHyperModel.train`, in the trial's own folder (`search/trial_<id>/`).
- `trial_rows`: one row per trial, which `recipes.report.search.write_results` writes into
  `results.csv` and `results.md`, with the "validation accuracy vs batch size, one line per
  norm" picture.
- Distributed search (KerasTuner's chief/worker mode, `distributed_role`): every oracle of
  `recipes.oracles` is a `SharedSearchOracle` (which tuner ran each trial; a lost worker's
  trial re-queued after `worker_timeout` seconds without a heartbeat; idle workers kept until
  the search is over), the chief serves it with `serve_search`, and the tuners'
  `_SearchTuner` mixin sends the workers' heartbeats.

Resuming, per tuner (all tested in `tests/test_recipes_tune.py`): KerasTuner saves every trial
(`trial_*/trial.json`) and the oracle's state (`oracle.json`) when a trial starts and ends.
Started again on the same folder, a tuner reloads them; a trial that was running when the
process died is put in KerasTuner's retry queue and run again first (under the same trial id,
its training resuming after its last checkpointed epoch), and finished trials are never run
again: the oracles of `recipes.oracles` skip values whose hash is in the saved
`tried_so_far`, and Hyperband continues its saved brackets (where, by design, one combination
may run in several brackets, at different budgets).

Deprecated here (moved; `MOVED`): `SharedSearchOracle`, `GridOracle`, `RandomSearchOracle`,
`BayesianOptimizationOracle`, `HyperbandOracle`, `DEFAULT_WORKER_TIMEOUT` (now in
`recipes.oracles`); `OBJECTIVE`, `RESULT_FIELDS`, `write_results`, `best_row`, `describe`,
`markdown`, `plot_accuracy_vs_batch_size` (`recipes.report.search`). They still work from here
until the next release, with a DeprecationWarning naming their new module.
"""

import math
import os
import threading
import time
from pathlib import Path

import keras
import keras_tuner as kt

from recipes import _tuner_compat, models, oracles, training
from recipes.config import RunConfig
from recipes.report import search as search_report

#: Names that moved out of this module -> their module now (see `__getattr__`).
MOVED = {
    **dict.fromkeys(("DEFAULT_WORKER_TIMEOUT", "SharedSearchOracle", "GridOracle",
                     "RandomSearchOracle", "BayesianOptimizationOracle", "HyperbandOracle"),
                    "recipes.oracles"),
    **dict.fromkeys(("OBJECTIVE", "RESULT_FIELDS", "best_row", "describe", "markdown",
                     "plot_accuracy_vs_batch_size", "write_results"), "recipes.report.search"),
}


def __getattr__(name):
    """The old path of a moved name (`MOVED`) still works, with a DeprecationWarning."""
    if name not in MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from keras_norm import _deprecated

    return _deprecated.forward(__name__, name, MOVED)


TUNERS = ("random", "bayesian", "hyperband", "grid")
#: Hyperparameter names, in the order of the grid and of the results table.
HP_NAMES = ("norm", "batch_size", "model", "placement", "lr")
#: Distributed search: a worker tells the chief it is alive this often while it trains.
HEARTBEAT_SECONDS = 2.0
#: Distributed search: a worker that got no trial (the others still run theirs) asks again
#: after this long.
IDLE_POLL_SECONDS = 1.0


# ------------------------------------------------------------------------------ hypermodel
def _choose(hp, name, values):
    """`hp.Fixed` for a single value (not tuned, but recorded), else `hp.Choice`."""
    values = list(values)
    if len(values) == 1:
        return hp.Fixed(name, values[0])
    return hp.Choice(name, values)


class NormBatchHyperModel(kt.HyperModel):
    """Searches the normalization and the batch size (and optionally model, placement, lr).

    Hyperparameters (a single value is recorded as `Fixed`, several are a `Choice`): `norm`,
    `batch_size`, `model`, `placement` and `lr` (the base learning rate, at batch 128). All
    of them are declared up front (`declare_hyperparameters`), so every oracle knows the whole
    space from the first trial.

    A trial is a `recipes.cifar` run: `trial_config` is the run's `RunConfig` (the `config`
    given here with the trial's hyperparameters), and `train` trains it through
    `recipes.training.fit`, the loop of `recipes.cifar`, on the search's training images,
    tested after every epoch on its validation images.

    Args:
        norms: Registered normalization names (`keras_norm.available()`, or `"none"`).
        batch_sizes: Global batch sizes.
        num_classes: Number of classes of the data.
        input_shape: Shape of one image. Defaults to `(32, 32, 3)`.
        model_names: Model names of `recipes.models.MODELS`. Defaults to `("small_cnn",)`.
        placements: Norm placements (`recipes.models.build_model`). Defaults to `("all",)`.
        learning_rates: Base learning rates at batch 128, scaled linearly with the batch size.
            Defaults to `(0.1,)`.
        norm_kwargs: Dict `{norm name: {constructor arguments}}`. Defaults to `None`.
        config: The `recipes.config.RunConfig` every trial shares (optimizer, schedule,
            epochs, augmentation, seed, verbosity, ...); the trial's hyperparameters, epochs
            and output folder replace its own. Defaults to `RunConfig()` with 1 epoch.
    """

    def __init__(self, norms, batch_sizes, num_classes, input_shape=(32, 32, 3),
                 model_names=("small_cnn",), placements=("all",), learning_rates=(0.1,),
                 norm_kwargs=None, config=None, **kwargs):
        super().__init__(**kwargs)
        self.space = {"norm": tuple(norms), "batch_size": tuple(int(b) for b in batch_sizes),
                      "model": tuple(model_names), "placement": tuple(placements),
                      "lr": tuple(float(lr) for lr in learning_rates)}
        empty = [name for name, values in self.space.items() if not values]
        if empty:
            raise ValueError(f"NormBatchHyperModel: empty search space for {empty}")
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.norm_kwargs = dict(norm_kwargs or {})
        self.config = config if config is not None else RunConfig().replace(epochs=1)

    def declare_hyperparameters(self, hp):
        for name in HP_NAMES:
            _choose(hp, name, self.space[name])

    def trial_config(self, hp, epochs=None, output=None):
        """The `RunConfig` of the trial of `hp`.

        Args:
            hp: The trial's `HyperParameters`.
            epochs: Epochs to train to (Hyperband's budget). Defaults to the config's.
            output: The trial's output folder (checkpoints, logs).
        """
        self.declare_hyperparameters(hp)
        norm = hp.get("norm")
        return self.config.replace(
            model=hp.get("model"), norm=norm, norm_kwargs=self.norm_kwargs.get(norm, {}),
            placement=hp.get("placement"), lr=hp.get("lr"), batch_size=hp.get("batch_size"),
            epochs=int(epochs or self.config.epochs), output=output)

    def build(self, hp):
        """The (uncompiled) model of `hp`, as the trial builds it; `train` trains its own."""
        config = self.trial_config(hp)
        keras.utils.set_random_seed(config.seed)
        return models.build_model(
            config.model, norm=config.norm, norm_kwargs=config.norm_kwargs,
            placement=config.placement, num_classes=self.num_classes,
            input_shape=self.input_shape, other_norm=config.other_norm,
            head_norm=config.head_norm)

    def fit(self, hp, model, *args, **kwargs):
        """Refused: KerasTuner's own tuners would train with `model.fit`, another training
        path than `recipes.cifar`'s (see `train`)."""
        raise TypeError("NormBatchHyperModel trains through recipes.training, not "
                        "`model.fit`: run it with a tuner of `recipes.tuning.make_tuner`, or "
                        "call `NormBatchHyperModel.train`")

    def train(self, hp, data, output, epochs=None, initial_epoch=0, strategy=None,
              start_from=None):
        """Trains the trial of `hp` with `recipes.training.fit`; returns its metrics.

        Run again on the same `output`, a trial resumes after its last finished epoch.

        Args:
            hp: The trial's `HyperParameters`.
            data: A `recipes.datasets.ImageData` whose test split holds the validation
                images (`recipes.training.split_validation`).
            output: The trial's folder (checkpoints, logs, `training_log.csv`).
            epochs: Epochs to train to (Hyperband passes its own). Defaults to the config's.
            initial_epoch: Epochs already trained by the trial this one continues
                (Hyperband); the metrics cover the epochs after it.
            strategy: A `tf.distribute.Strategy`, or None for the default one.
            start_from: The checkpoint of the trial this one continues (Hyperband).

        Returns:
            A dict of metrics: `val_accuracy` (the best over the epochs, the objective) and,
            at that epoch, `val_loss` and `accuracy`, with `best_epoch` (1-based), `epochs`,
            `steps` (optimizer steps after `initial_epoch`), `learning_rate` (the scaled peak
            rate), `replicas` and `seconds` (training wall time of those epochs).

        Raises:
            keras_tuner.errors.FailedTrialError: When training diverged before any epoch
                after `initial_epoch` finished (the trial then has no score).
        """
        import tensorflow as tf

        config = self.trial_config(hp, epochs, output)
        trained = training.fit(config, data, strategy or tf.distribute.get_strategy(),
                               start_from=start_from)
        rows = [row for row in trained.history if row["epoch"] > initial_epoch]
        if not rows:
            raise kt.errors.FailedTrialError(
                f"training diverged in epoch {trained.diverged_at} (a non-finite training "
                f"loss) before any epoch after epoch {initial_epoch} finished")
        best = max(rows, key=lambda row: row["test_accuracy"])
        return {
            search_report.OBJECTIVE: float(best["test_accuracy"]),
            "val_loss": float(best["test_loss"]),
            "accuracy": float(best["accuracy"]),
            "best_epoch": float(best["epoch"]),
            "epochs": float(config.epochs),
            "steps": float(len(rows) * trained.steps_per_epoch),
            "learning_rate": float(training.scaled_learning_rate(config)),
            "replicas": float(trained.replicas),
            "seconds": float(sum(row["seconds"] for row in rows)),
        }


# ---------------------------------------------------------------------------------- tuners
def distributed_role():
    """`("chief" | "worker", tuner id)` in KerasTuner's distributed mode, else None.

    The mode is KerasTuner's: `KERASTUNER_ORACLE_IP` set means a distributed search, with
    `KERASTUNER_ORACLE_PORT` and `KERASTUNER_TUNER_ID` (a tuner id containing "chief" is the
    chief). Raises `ValueError` naming a missing or empty variable.
    """
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    for name in ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(name, "").strip():
            raise ValueError(f"distributed search: KERASTUNER_ORACLE_IP is set, so {name} must "
                             f"be set too; got {os.environ.get(name)!r}")
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"distributed search: KERASTUNER_ORACLE_PORT must be a port number, "
                         f"got {port!r}")
    tuner_id = os.environ["KERASTUNER_TUNER_ID"]
    return ("chief" if "chief" in tuner_id else "worker"), tuner_id


def oracle_address():
    """`ip:port` of the chief oracle (from `KERASTUNER_ORACLE_IP` / `_PORT`)."""
    return f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"


def serve_search(oracle, address, poll_seconds=0.2, stop_event=None):
    """Serves `oracle` to worker tuners over gRPC until the search is over.

    KerasTuner's own chief loop (`oracle_chief.start_server`) polls every 20 s once the first
    worker has been told to stop and never gives up on a dead worker; this one polls every
    `poll_seconds`, re-queues the trials of lost workers (`SharedSearchOracle`) and ends when
    every worker has been told to stop and no trial runs, or when `stop_event` is set.

    Args:
        oracle: A `SharedSearchOracle`.
        address: `ip:port` to listen on.
        poll_seconds: How often to check for lost workers and the end of the search.
        stop_event: Optional `threading.Event` that ends serving early (tests).

    Raises:
        OSError: When `address` cannot be listened on (e.g. the port is taken).
    """
    from concurrent import futures

    import grpc
    add_servicer_to_server, OracleServicer = _tuner_compat.oracle_service()

    if oracle.trials_exhausted():  # e.g. the chief of a finished search started again
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = OracleServicer(oracle)
    add_servicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # recent gRPC raises, older ones return 0
        bound = 0
    if not bound:
        raise OSError(f"the chief oracle cannot listen on {address} (KERASTUNER_ORACLE_IP / "
                      "KERASTUNER_ORACLE_PORT): address in use or not of this machine")
    server.start()
    try:
        while not (stop_event is not None and stop_event.is_set()):
            time.sleep(poll_seconds)
            oracle.requeue_lost_workers()
            if servicer.stop_triggered and oracle.search_finished():
                break
    finally:
        server.stop(grace=1.0).wait(5.0)


class _SearchTuner:
    """Mixin for the tuner classes: trials trained by `recipes.training`, and KerasTuner's
    distributed mode.

    A trial is `NormBatchHyperModel.train` on the data given to `search`, in the trial's
    KerasTuner folder (`search/trial_<id>/`: checkpoints, logs, `training_log.csv`), so a
    trial run again (interrupted, or its worker lost) resumes after its last finished epoch,
    and a Hyperband trial that continues another starts from that trial's last checkpoint.

    In a distributed search (`distributed_role()`), the chief's `search` serves the oracle
    (`serve_search`) instead of KerasTuner's loop; a worker sends a heartbeat to the chief
    while it runs a trial, and waits `IDLE_POLL_SECONDS` before asking again when the chief
    has no trial for it yet.
    """

    _finished_here = 0
    _asked = False
    _heartbeat = None

    def search(self, *fit_args, **fit_kwargs):
        role = distributed_role()
        if role is None or role[0] != "chief":
            return super().search(*fit_args, **fit_kwargs)
        if "verbose" in fit_kwargs:
            self.oracle.verbose = fit_kwargs["verbose"]
        self.save()
        serve_search(self.oracle, oracle_address())

    def pre_create_trial(self):
        super().pre_create_trial()
        if self._asked:  # the last request got no trial: the others still run theirs
            time.sleep(IDLE_POLL_SECONDS)
        self._asked = True

    def on_trial_begin(self, trial):
        self._asked = False
        super().on_trial_begin(trial)
        if self._is_worker():
            stop = threading.Event()
            thread = threading.Thread(target=self._beat, args=(trial.trial_id, stop),
                                      name=f"heartbeat-{trial.trial_id}", daemon=True)
            thread.start()
            self._heartbeat = stop

    def _beat(self, trial_id, stop):
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                self.oracle.get_trial(trial_id)
            except Exception:  # noqa: BLE001  the chief may be restarting: beat again later
                pass

    def run_trial(self, trial, data, epochs=None, verbose=None):
        """Trains the trial (see the class); returns its metrics.

        Args:
            trial: The KerasTuner `Trial`.
            data: The `ImageData` of `search`: training images, and validation images as
                its test split.
            epochs: Epochs per trial (Hyperband's trials carry their own budget).
            verbose: KerasTuner's display (the trial's own progress follows the
                hypermodel's `config.verbose`).
        """
        values = trial.hyperparameters.values
        start_from = None
        if "tuner/trial_id" in values:
            start_from = self._last_checkpoint(values["tuner/trial_id"])
        # Each trial builds a new model: drop the previous one's graph and names.
        keras.backend.clear_session(free_memory=False)
        return self.hypermodel.train(
            trial.hyperparameters, data, output=self.get_trial_dir(trial.trial_id),
            epochs=values.get("tuner/epochs", epochs),
            initial_epoch=values.get("tuner/initial_epoch", 0),
            strategy=self.distribution_strategy, start_from=start_from)

    def _last_checkpoint(self, trial_id):
        import tensorflow as tf

        folder = Path(self.get_trial_dir(trial_id)) / "checkpoints"
        latest = tf.train.latest_checkpoint(str(folder))
        if latest is None:
            raise kt.errors.FailedTrialError(
                f"Hyperband continues trial {trial_id}, but {folder} holds no checkpoint of it "
                "(a distributed Hyperband search needs an --output every worker shares)")
        return latest

    def load_model(self, trial):
        """The trial's model with its weights after its last finished epoch, read from the
        checkpoint `recipes.training` wrote in the trial's folder (what KerasTuner's
        `get_best_models` returns). The last epoch rather than the best one: a trial keeps
        the checkpoint it would resume from, and with a cosine schedule the last is the one
        the learning rate decayed to.

        Raises:
            ValueError: The trial's folder holds no checkpoint (it never finished an epoch).
        """
        import tensorflow as tf

        folder = Path(self.get_trial_dir(trial.trial_id)) / "checkpoints"
        latest = tf.train.latest_checkpoint(str(folder))
        if latest is None:
            raise ValueError(f"load_model: trial {trial.trial_id} has no checkpoint in "
                             f"{folder} (it finished no epoch)")
        strategy = self.distribution_strategy or tf.distribute.get_strategy()
        with strategy.scope():
            model = self.hypermodel.build(trial.hyperparameters)
        # The optimizer and epoch counter of the checkpoint are not needed; every weight of
        # the model must be matched, so a model that no longer fits the checkpoint fails here.
        tf.train.Checkpoint(model=model).restore(latest).assert_existing_objects_matched()
        return model

    def on_trial_end(self, trial):
        if self._heartbeat is not None:
            self._heartbeat.set()
            self._heartbeat = None
        super().on_trial_end(trial)  # saves the trial and the oracle
        self._finished_here += 1


class RandomSearch(_SearchTuner, kt.Tuner):
    """Random search with `RandomSearchOracle`, trials trained by `recipes.training`."""

    def __init__(self, hypermodel=None, objective=None, max_trials=10, seed=None, **kwargs):
        oracle = oracles.RandomSearchOracle(objective=objective, max_trials=max_trials, seed=seed)
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)


class Hyperband(_SearchTuner, kt.Tuner):
    """Hyperband with `HyperbandOracle`, trials trained by `recipes.training`.

    A continued trial (`tuner/trial_id`) starts from the last checkpoint of the trial it
    continues: its weights, optimizer state and step counter, so that its learning-rate
    schedule, stretched over the new budget of `tuner/epochs`, resumes where that trial
    stopped.
    """

    def __init__(self, hypermodel=None, objective=None, max_epochs=100, factor=3,
                 hyperband_iterations=1, seed=None, **kwargs):
        oracle = oracles.HyperbandOracle(objective, max_epochs=max_epochs, factor=factor,
                                         hyperband_iterations=hyperband_iterations, seed=seed)
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)


class BayesianOptimization(_SearchTuner, kt.Tuner):
    """Bayesian optimization with `BayesianOptimizationOracle` (no repeated trials)."""

    def __init__(self, hypermodel=None, objective=None, max_trials=10, num_initial_points=None,
                 alpha=1e-4, beta=2.6, seed=None, **kwargs):
        oracle = oracles.BayesianOptimizationOracle(
            objective=objective, max_trials=max_trials, num_initial_points=num_initial_points,
            alpha=alpha, beta=beta, seed=seed)
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)


class GridSearch(_SearchTuner, kt.Tuner):
    """Grid search with `GridOracle`: every combination once, resumable."""

    def __init__(self, hypermodel=None, objective=None, max_trials=None, seed=None, **kwargs):
        oracle = oracles.GridOracle(objective=objective, max_trials=max_trials, seed=seed)
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)
        if oracle.max_trials is None:
            oracle.max_trials = oracle.grid_size()


def grid_size(hypermodel):
    """The number of combinations of `hypermodel`'s search space."""
    return math.prod(len(values) for values in hypermodel.space.values())


def hyperband_plan(oracle):
    """`(brackets, trials per Hyperband iteration)` of a `HyperbandOracle`."""
    return _tuner_compat.hyperband_plan(oracle)  # KerasTuner's private sizing hooks


def make_tuner(kind, hypermodel, directory, project_name="search", max_trials=None,
               epochs=1, seed=1, overwrite=False, distribution_strategy=None,
               num_initial_points=None, hyperband_factor=3, hyperband_iterations=1,
               worker_timeout=oracles.DEFAULT_WORKER_TIMEOUT):
    """The tuner of `kind` over `hypermodel`, reloading `directory/project_name` if present.

    With KerasTuner's distributed environment variables set (`distributed_role`), the tuner
    of the chief serves the search from its `search` and a worker's tuner asks the chief for
    its trials (KerasTuner replaces a worker's oracle with a gRPC client; the oracle built
    here then only describes the search space).

    Args:
        kind: One of `TUNERS`.
        hypermodel: A `NormBatchHyperModel`.
        directory: The tuner's folder.
        project_name: Its project sub-folder. Defaults to `"search"`.
        max_trials: Cap on the number of trials. `None`: 10 for random and bayesian, the grid
            size for grid, and for Hyperband no cap beyond its own plan (which follows from
            `epochs`, `hyperband_factor` and `hyperband_iterations`).
        epochs: Hyperband's `max_epochs` (other tuners take the epochs from `search`).
        seed: Oracle seed (KerasTuner treats 0 as "no seed": pass a positive value).
        overwrite: Start again instead of reloading.
        distribution_strategy: A `tf.distribute.Strategy` each trial runs under, or None.
        num_initial_points: Bayesian: random trials before the Gaussian process.
        hyperband_factor: Hyperband's reduction factor.
        hyperband_iterations: Hyperband iterations.
        worker_timeout: Distributed search: seconds of silence after which the chief gives a
            worker's trial to another worker (`SharedSearchOracle`).

    Returns:
        The tuner.
    """
    if not worker_timeout > 0:
        raise ValueError(f"make_tuner: worker_timeout must be > 0 seconds, got {worker_timeout!r}")
    objective = kt.Objective(search_report.OBJECTIVE, direction="max")
    if not overwrite:
        _reload_under_this_tuner_id(Path(directory) / project_name)
    common = dict(hypermodel=hypermodel, objective=objective, directory=str(directory),
                  project_name=project_name, overwrite=overwrite, seed=seed,
                  distribution_strategy=distribution_strategy)
    if kind == "random":
        tuner = RandomSearch(max_trials=max_trials or 10, **common)
    elif kind == "bayesian":
        tuner = BayesianOptimization(max_trials=max_trials or 10,
                                     num_initial_points=num_initial_points, **common)
    elif kind == "grid":
        tuner = GridSearch(max_trials=max_trials, **common)
    elif kind == "hyperband":
        tuner = Hyperband(max_epochs=epochs, factor=hyperband_factor,
                          hyperband_iterations=hyperband_iterations, **common)
    else:
        raise ValueError(f"make_tuner: unknown tuner {kind!r}; choose from {', '.join(TUNERS)}")
    oracle = local_oracle(tuner)
    if kind == "hyperband":
        # KerasTuner's Hyperband has no `max_trials`, but the base oracle honours one; its
        # reloaded state also carries the old iteration count: the command line's wins.
        oracle.max_trials = max_trials
        oracle.hyperband_iterations = hyperband_iterations
    oracle.worker_timeout = float(worker_timeout)
    return tuner


def _reload_under_this_tuner_id(project):
    """Makes KerasTuner reload a saved search whatever tuner id saved it.

    KerasTuner reloads the oracle only when it finds the state file of *this* tuner id
    (`<tuner id>.json`), so a search started on one machine (id `tuner0`) and continued as a
    distributed search (the chief, id `chief`), or the other way round, would start again from
    nothing and overwrite the saved trials. A tuner's own state is empty (`{}`): where the
    oracle was saved and this process's tuner has no file yet, an empty one is written.
    """
    role = distributed_role()
    if role is not None and role[0] == "worker":
        return  # a worker never loads the oracle: the chief's serves it
    tuner_id = role[1] if role else "tuner0"
    state = project / f"{tuner_id}.json"
    if (project / "oracle.json").exists() and not state.exists():
        state.write_text("{}")


def local_oracle(tuner):
    """The oracle object in this process: on a distributed worker, the one KerasTuner's gRPC
    client wraps (it describes the search space; the chief's oracle runs the search)."""
    return _tuner_compat.local_oracle(tuner.oracle)


# --------------------------------------------------------------------------------- results
def trial_rows(tuner):
    """One dict per trial (in trial order) with the `RESULT_FIELDS`."""
    rows = []
    for trial_id in sorted(tuner.oracle.trials, key=lambda t: (len(t), t)):
        trial = tuner.oracle.trials[trial_id]
        values = trial.hyperparameters.values
        row = {"trial": trial_id, "status": trial.status}
        for name in HP_NAMES:
            row[name] = values.get(name)
        for name in ("learning_rate", "epochs", search_report.OBJECTIVE, "best_epoch", "val_loss",
                     "accuracy", "steps", "replicas", "seconds"):
            row[name] = (trial.metrics.get_last_value(name)
                         if trial.metrics.exists(name) else None)
        if row["epochs"] is None and "tuner/epochs" in values:
            row["epochs"] = values["tuner/epochs"]
        # Which tuner ran the trial (the last one that started it) and how many times it was
        # started (more than once after an interruption, a lost worker or a failure).
        starts = getattr(tuner.oracle, "trial_workers", {}).get(trial_id, [])
        row["worker"] = starts[-1] if starts else None
        row["attempts"] = len(starts) or None
        for name in ("epochs", "best_epoch", "steps", "replicas"):
            if row[name] is not None:
                row[name] = int(row[name])
        rows.append(row)
    return rows
