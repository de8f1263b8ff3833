"""KerasTuner search over normalization type x batch size: the library behind `recipes.tune`.

- `NormBatchHyperModel`: a `keras_tuner.HyperModel` whose `build(hp)` picks the model, the
  normalization, its placement and the base learning rate and compiles, and whose
  `fit(hp, model, x, y, validation_data=..., **kwargs)` picks the batch size, builds the
  trial's input pipeline at that batch size from the *unbatched* data it is given, scales the
  learning rate with the batch size as `recipes.training` does (a tuned learning rate is the
  rate at batch 128) and passes `**kwargs` (the tuner's callbacks) on to `model.fit`.
- `GridOracle` / `GridSearch`: every combination of the search space exactly once. It
  replaces KerasTuner's own `GridSearch`, whose oracle keeps its progress only in memory: in
  KerasTuner 1.4.8 a reloaded `GridSearch` either stops at once (nothing queued) or, when a
  trial was interrupted, fails with a `KeyError` in `populate_space` (the reloaded trial id
  is missing from its in-memory linked list). `GridOracle` keeps no state of its own: the next
  trial is the first combination, in a fixed order, whose values no trial has used yet
  (KerasTuner's saved `tried_so_far` hashes), so a reloaded search continues exactly.
- `BayesianOptimizationOracle` here is KerasTuner's, except that it never proposes a
  combination that was already tried (KerasTuner's returns the Gaussian process's optimum even
  when that point has been evaluated, which on a small discrete space repeats trials); it
  falls back to an untried random combination and stops when there is none.
- `HyperbandOracle` here is KerasTuner's, fitted to a small finite space: KerasTuner's stops the
  whole search as soon as a bracket's first round cannot get a configuration never tried
  before, which on a space of, say, 8 norm x batch-size pairs happens before any successive
  halving; here round sizes are capped by the number of combinations and each bracket draws
  its own (see the class).
- `make_tuner(...)`: the tuner of a given kind (`random`, `bayesian`, `hyperband`, `grid`),
  resumable (`overwrite=False` reloads the project), with hooks to stop after a number of
  trials (`stop_after_trials`) or to simulate Ctrl-C at a trial's start (`interrupt_trial`).
- `trial_rows`, `write_results`: one row per trial into `results.csv` and `results.md`, and the
  "validation accuracy vs batch size, one line per norm" picture.
- Distributed search (KerasTuner's chief/worker mode, `distributed_role`): every oracle here
  is a `SharedSearchOracle` (which tuner ran each trial; a lost worker's trial re-queued after
  `worker_timeout` seconds without a heartbeat; idle workers kept until the search is over),
  the chief serves it with `serve_search`, and the tuners' `_Controlled` mixin sends the
  workers' heartbeats.

Resuming, per tuner (all tested in `tests/test_recipes_tune.py`): KerasTuner saves every trial
(`trial_*/trial.json`) and the oracle's state (`oracle.json`) when a trial starts and ends.
Started again on the same folder, a tuner reloads them; a trial that was running when the
process died is put in KerasTuner's retry queue and run again first (under the same trial id),
and finished trials are never run again: random search and the oracles here skip values whose
hash is in the saved `tried_so_far`, and Hyperband continues its saved brackets (where, by
design, one combination may run in several brackets, at different budgets).
"""

import itertools
import math
import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np

from recipes import _tuner_compat, models, training

OBJECTIVE = "val_accuracy"
TUNERS = ("random", "bayesian", "hyperband", "grid")
#: Hyperparameter names, in the order of the grid and of the results table.
HP_NAMES = ("norm", "batch_size", "model", "placement", "lr")
#: Columns of `results.csv`.
RESULT_FIELDS = ("trial", "status", "norm", "batch_size", "model", "placement", "lr",
                 "learning_rate", "epochs", "val_accuracy", "best_epoch", "val_loss",
                 "accuracy", "steps", "replicas", "seconds", "worker", "attempts")
EVAL_BATCH_SIZE = 256
#: Distributed search: a worker tells the chief it is alive this often while it trains.
HEARTBEAT_SECONDS = 2.0
#: Distributed search: the chief gives a silent worker's trial to another worker after this.
DEFAULT_WORKER_TIMEOUT = 60.0
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

    Hyperparameters (a single value is recorded as `Fixed`, several are a `Choice`):
    `norm`, `model`, `placement` and `lr` (the base learning rate, at batch 128) are chosen in
    `build`; `batch_size` in `fit`. All of them are declared up front
    (`declare_hyperparameters`), so every oracle knows the whole space from the first trial.

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
        epochs: Epochs per trial when `fit` is not given `epochs`. Defaults to `1`.
        optimizer: `"sgd"` (momentum 0.9) or `"adamw"`. Defaults to `"sgd"`.
        weight_decay: Decoupled weight decay of conv and dense kernels. Defaults to `5e-4`.
        schedule: `"cosine"` (decay to 0 over the trial's epochs) or `"constant"`.
            Defaults to `"cosine"`.
        warmup_epochs: Linear warm-up epochs of the cosine schedule. Defaults to `0.0`.
        augment: Random crop and flip of array inputs. Defaults to `True`.
        seed: Seed of the weights' initialization and of the data order. Defaults to `0`.
    """

    def __init__(self, norms, batch_sizes, num_classes, input_shape=(32, 32, 3),
                 model_names=("small_cnn",), placements=("all",), learning_rates=(0.1,),
                 norm_kwargs=None, epochs=1, optimizer="sgd", weight_decay=5e-4,
                 schedule="cosine", warmup_epochs=0.0, augment=True, seed=0, **kwargs):
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
        self.epochs = epochs
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.augment = augment
        self.seed = seed

    def declare_hyperparameters(self, hp):
        for name in HP_NAMES:
            _choose(hp, name, self.space[name])

    def _run_config(self, hp, batch_size, schedule):
        """The `recipes.training.RunConfig` of a trial, for the shared optimizer code."""
        return training.RunConfig(
            model=hp.get("model"), norm=hp.get("norm"), placement=hp.get("placement"),
            batch_size=batch_size, optimizer=self.optimizer, lr=hp.get("lr"),
            weight_decay=self.weight_decay, schedule=schedule, warmup_epochs=self.warmup_epochs,
            seed=self.seed)

    def _compile(self, model, config, total_steps, steps_per_epoch, initial_step=0):
        """Compiles `model` with the optimizer of `recipes.training` for `config`."""
        with model.distribute_strategy.scope():
            # As recipes.training: no weight decay on normalization parameters and biases.
            optimizer = training.make_optimizer(config, total_steps, steps_per_epoch,
                                                model.trainable_variables)
            if initial_step:
                # A continued trial (Hyperband) resumes the schedule where it stopped.
                optimizer.iterations.assign(initial_step)
            model.compile(optimizer=optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"])

    def build(self, hp):
        """Builds and compiles the model of `hp` (optimizer at the reference batch size).

        `fit` compiles again with the learning rate and schedule of the trial's batch size.
        """
        for name in ("norm", "model", "placement", "lr"):
            _choose(hp, name, self.space[name])
        keras.utils.set_random_seed(self.seed)
        norm = hp.get("norm")
        model = models.build_model(
            hp.get("model"), norm=norm, norm_kwargs=self.norm_kwargs.get(norm),
            placement=hp.get("placement"), num_classes=self.num_classes,
            input_shape=self.input_shape)
        config = self._run_config(hp, training.REFERENCE_BATCH_SIZE, "constant")
        self._compile(model, config, total_steps=1, steps_per_epoch=1)
        return model

    def fit(self, hp, model, x, y=None, *, validation_data=None, epochs=None,
            initial_epoch=0, callbacks=None, verbose="auto", **kwargs):
        """Trains `model` at the batch size of `hp`; returns the trial's metrics.

        Args:
            hp: The trial's `HyperParameters`.
            model: The model `build(hp)` returned.
            x: Training images: a uint8 array `(N, H, W, 3)` (augmented and standardized here,
                as in `recipes.datasets.make_dataset`), or an *unbatched* `tf.data.Dataset`
                of preprocessed `(image, label)` pairs.
            y: Integer labels `(N,)` for array `x`; None for a dataset.
            validation_data: `(x_val, y_val)` arrays or an unbatched dataset, as `x`.
            epochs: Epochs to train to (Hyperband passes its own). Defaults to the
                hypermodel's `epochs`.
            initial_epoch: Epoch to start from (Hyperband's continued trials).
            callbacks: The tuner's callbacks, passed on to `model.fit`.
            verbose: Passed on to `model.fit`.
            **kwargs: Passed on to `model.fit`. `batch_size` is not accepted: it is tuned.

        Returns:
            A dict of metrics: `val_accuracy` (the best over the epochs, the objective) and,
            at that epoch, `val_loss` and `accuracy`, with `best_epoch` (1-based), `epochs`,
            `steps` (optimizer steps of this call), `learning_rate` (the scaled peak rate),
            `replicas` and `seconds` (wall time of `model.fit`).
        """
        if "batch_size" in kwargs:
            raise TypeError("NormBatchHyperModel.fit: `batch_size` is a hyperparameter of the "
                            f"search; do not pass it. Received: batch_size="
                            f"{kwargs['batch_size']!r}")
        if validation_data is None:
            raise ValueError("NormBatchHyperModel.fit: `validation_data` is required (the "
                             f"objective is {OBJECTIVE}).")
        batch_size = _choose(hp, "batch_size", self.space["batch_size"])
        train, examples = _batched(x, y, batch_size, training=True, augment=self.augment,
                                   seed=self.seed)
        if isinstance(validation_data, (tuple, list)):
            validation, _ = _batched(*validation_data, EVAL_BATCH_SIZE, training=False)
        else:
            validation, _ = _batched(validation_data, None, EVAL_BATCH_SIZE, training=False)
        steps_per_epoch = examples // batch_size
        epochs = int(epochs or self.epochs)
        config = self._run_config(hp, batch_size, self.schedule)
        self._compile(model, config, epochs * steps_per_epoch, steps_per_epoch,
                      initial_step=initial_epoch * steps_per_epoch)
        kwargs.setdefault("shuffle", False)  # the pipeline shuffles every epoch itself
        started = time.perf_counter()
        history = model.fit(train, validation_data=validation, epochs=epochs,
                            initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose,
                            **kwargs)
        seconds = time.perf_counter() - started
        scores = np.asarray(history.history[OBJECTIVE], dtype=np.float64)
        best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
        return {
            OBJECTIVE: float(scores[best]),
            "val_loss": float(history.history["val_loss"][best]),
            "accuracy": float(history.history["accuracy"][best]),
            "best_epoch": float(initial_epoch + best + 1),
            "epochs": float(epochs),
            "steps": float((epochs - initial_epoch) * steps_per_epoch),
            "learning_rate": float(training.scaled_learning_rate(config)),
            "replicas": float(model.distribute_strategy.num_replicas_in_sync),
            "seconds": float(seconds),
        }


def _batched(x, y, batch_size, training, augment=False, seed=None):
    """`(dataset of batches, number of examples)` from arrays or an unbatched dataset."""
    import tensorflow as tf

    from recipes import datasets

    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("NormBatchHyperModel.fit: give labels inside the dataset, not as "
                             "`y`, when `x` is a tf.data.Dataset")
        images_spec = x.element_spec[0]
        if images_spec.shape.rank != 3:
            raise ValueError(
                "NormBatchHyperModel.fit: the dataset must be unbatched (one (image, label) "
                "pair per element, image rank 3), since the trial batches it at its own batch "
                f"size; Keras ignores `batch_size` for a batched dataset. Received element "
                f"spec {x.element_spec}")
        examples = int(x.cardinality())
        if examples < 0:
            raise ValueError("NormBatchHyperModel.fit: the dataset must have a known, finite "
                             "length (tf.data cardinality)")
        if training:
            x = x.shuffle(examples, seed=seed, reshuffle_each_iteration=True)
        dataset = x.batch(batch_size, drop_remainder=training)
        return dataset.prefetch(tf.data.AUTOTUNE), examples
    if y is None:
        raise ValueError("NormBatchHyperModel.fit: array inputs need labels `y`")
    dataset = datasets.make_dataset(np.asarray(x), np.asarray(y), batch_size, training=training,
                                    augment=augment, seed=seed)
    return dataset, len(x)


# --------------------------------------------------------------------------------- oracles
def _enumerable_values(hp):
    """All values of a hyperparameter that the grid can enumerate."""
    if getattr(hp, "step", 0) is None:  # Int / Float without a step: a continuum
        raise ValueError(f"GridOracle: hyperparameter {hp.name!r} ({type(hp).__name__}) has no "
                         "finite set of values; give it a `step`, or use Choice or Fixed")
    return list(hp.values)


class SharedSearchOracle:
    """Mixin for the oracles here: one search shared by several worker tuners.

    KerasTuner's distributed mode runs the oracle in a chief process (`KERASTUNER_TUNER_ID`
    containing "chief") that serves worker tuners over gRPC (`serve_search`). KerasTuner
    alone re-runs a worker's trial only when a worker with the same tuner id asks again (the
    oracle hands a tuner its unfinished trial back), tells a worker to stop as soon as nothing
    is left to start (so a trial whose worker dies later has nobody left to re-run it) and
    waits forever for a worker that never comes back. This mixin adds:

    - the record of which tuner started each trial (`trial_workers`, saved with the oracle),
      for the `worker` and `attempts` columns of the results;
    - liveness: every request from a tuner (a trial request, or the heartbeat that
      `_Controlled` sends every `HEARTBEAT_SECONDS` while it trains) marks it alive, and
      `requeue_lost_workers` puts the trial of a tuner silent for `worker_timeout` seconds
      back in the retry queue, where the next tuner asking for a trial takes it;
    - no early stop: while other tuners still run trials, a tuner asking for one gets "idle"
      (ask again) instead of "stopped", so that it is still there to re-run a lost trial.

    In one process nothing changes: the only tuner never waits on another.
    """

    #: Seconds without a request after which a tuner's trial goes to another tuner.
    worker_timeout = DEFAULT_WORKER_TIMEOUT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trial_workers = {}  # trial id -> the tuner ids that started it, in order
        self._last_seen = {}  # tuner id -> time.monotonic() of its last request

    @kt.synchronized
    def create_trial(self, tuner_id):
        now = time.monotonic()
        self._last_seen[tuner_id] = now
        self._requeue_lost(now)
        trial = super().create_trial(tuner_id)
        if trial.status == kt.engine.trial.TrialStatus.RUNNING:
            self.trial_workers.setdefault(trial.trial_id, []).append(tuner_id)
            self.save()
        elif (trial.status == kt.engine.trial.TrialStatus.STOPPED
              and any(other != tuner_id for other in self.ongoing_trials)):
            # KerasTuner forgot this tuner as it stopped it; keep it for a lost trial.
            self.tuner_ids.add(tuner_id)
            trial.status = kt.engine.trial.TrialStatus.IDLE
        return trial

    @kt.synchronized
    def get_trial(self, trial_id):
        # Worker tuners call this as their heartbeat (any request marks a tuner alive).
        for tuner_id, trial in self.ongoing_trials.items():
            if trial.trial_id == trial_id:
                self._last_seen[tuner_id] = time.monotonic()
        return super().get_trial(trial_id)

    @kt.synchronized
    def end_trial(self, trial):
        if trial.trial_id in self.end_order:
            # A late report of a trial that was given to another tuner and already finished
            # there: keep the first result.
            self._forget_ongoing(trial.trial_id)
            return
        if (trial.status == kt.engine.trial.TrialStatus.COMPLETED
                and trial.trial_id in self._retry_queue):
            # A tuner thought lost finished after all: do not run the trial again.
            self._retry_queue.remove(trial.trial_id)
        super().end_trial(trial)

    def _forget_ongoing(self, trial_id):
        for tuner_id, ongoing in list(self.ongoing_trials.items()):
            if ongoing.trial_id == trial_id:
                self.ongoing_trials.pop(tuner_id)

    @kt.synchronized
    def requeue_lost_workers(self):
        """Gives the trials of tuners silent for `worker_timeout` seconds to the next tuner
        that asks; returns `[(tuner id, trial id or None)]` of the tuners given up on."""
        return self._requeue_lost(time.monotonic())

    def _requeue_lost(self, now):
        lost = []
        for tuner_id in sorted(set(self.tuner_ids) | set(self.ongoing_trials)):
            seen = self._last_seen.setdefault(tuner_id, now)  # e.g. after a chief restart
            if now - seen <= self.worker_timeout:
                continue
            trial = self.ongoing_trials.pop(tuner_id, None)
            if trial is not None and trial.trial_id not in self._retry_queue:
                self._retry_queue.append(trial.trial_id)
            self.tuner_ids.discard(tuner_id)
            self._last_seen.pop(tuner_id, None)
            lost.append((tuner_id, None if trial is None else trial.trial_id))
            print(f"Worker {tuner_id} silent for {now - seen:.0f} s: "
                  + (f"trial {trial.trial_id} goes to the next worker that asks."
                     if trial is not None else "no longer waited for."), flush=True)
        if lost:
            self.save()
        return lost

    @kt.synchronized
    def search_finished(self):
        """Whether no tuner holds a trial and every tuner has been told to stop."""
        return not self.ongoing_trials and not self.tuner_ids

    @kt.synchronized
    def trials_exhausted(self):
        """Whether `max_trials` trials exist and none runs or waits to run again (a reloaded,
        finished search: nothing is left to hand out)."""
        return bool(self.max_trials and len(self.trials) >= self.max_trials
                    and not self.ongoing_trials and not self._retry_queue)

    def get_state(self):
        state = super().get_state()
        state["trial_workers"] = self.trial_workers
        return state

    def set_state(self, state):
        super().set_state(state)
        # Searches saved before this record existed have none.
        self.trial_workers = {key: list(value)
                              for key, value in state.get("trial_workers", {}).items()}


class GridOracle(SharedSearchOracle, kt.Oracle):
    """Every combination of the search space exactly once, in a fixed order; resumable.

    The order is that of `itertools.product` over the hyperparameters in the order they were
    declared, each in the order of its values. The oracle keeps no state beyond KerasTuner's
    own (trials and the hashes of their values), so a reloaded search continues where it
    stopped, retries an interrupted trial first (KerasTuner's retry queue) and never runs a
    finished combination again. Conditional hyperparameters are not supported.

    Args:
        max_trials: Cap on the number of trials. Defaults to the size of the grid.
        **kwargs: `keras_tuner.Oracle` arguments (`objective`, `seed`, ...).
    """

    def _combinations(self):
        space = self.hyperparameters.space
        conditional = [hp.name for hp in space if hp.conditions]
        if conditional:
            raise ValueError(f"GridOracle: conditional hyperparameters {conditional} are not "
                             "supported")
        names = [hp.name for hp in space]
        for values in itertools.product(*[_enumerable_values(hp) for hp in space]):
            yield dict(zip(names, values))

    def grid_size(self):
        """The number of combinations."""
        return math.prod(len(_enumerable_values(hp)) for hp in self.hyperparameters.space)

    def populate_space(self, trial_id):
        for values in self._combinations():
            if not self._duplicate(values):
                return {"status": kt.engine.trial.TrialStatus.RUNNING, "values": values}
        if self.ongoing_trials:
            return {"status": kt.engine.trial.TrialStatus.IDLE, "values": None}
        return {"status": kt.engine.trial.TrialStatus.STOPPED, "values": None}


class RandomSearchOracle(SharedSearchOracle, kt.oracles.RandomSearchOracle):
    """KerasTuner's random search oracle, shareable by several workers."""


class BayesianOptimizationOracle(SharedSearchOracle, kt.oracles.BayesianOptimizationOracle):
    """KerasTuner's Bayesian optimization, never proposing a combination already tried."""

    def populate_space(self, trial_id):
        response = super().populate_space(trial_id)
        values = response.get("values")
        if response["status"] == kt.engine.trial.TrialStatus.RUNNING and self._duplicate(values):
            return self._random_populate_space()  # an untried combination, or STOPPED
        return response


class HyperbandOracle(SharedSearchOracle, kt.oracles.HyperbandOracle):
    """KerasTuner's Hyperband, fitted to a small, finite search space.

    KerasTuner's oracle fills a bracket's first round with configurations never tried in any
    bracket, and stops the whole search when it cannot: on a space smaller than the first
    round (27 random configurations for `max_epochs=27`, while norms x batch sizes is often 8
    to 16) it runs every combination once for a few epochs and stops before any successive
    halving. Here, on a finite space of N combinations, a bracket's round r holds at most
    `ceil(min(n_0, N) / factor**r)` trials (n_0 its usual first-round size), and a bracket
    draws its first round from the combinations not yet in *that bracket* (each bracket runs
    a configuration at a different budget, as in Li et al.'s algorithm). On an infinite space
    it is KerasTuner's oracle.
    """

    def _space_size(self):
        """The number of combinations, or None for an empty space or a continuous range."""
        if not self.hyperparameters.space:
            return None
        try:
            return math.prod(len(_enumerable_values(hp)) for hp in self.hyperparameters.space)
        except ValueError:
            return None

    def _get_size(self, bracket_num, round_num):
        size = super()._get_size(bracket_num, round_num)
        combinations = self._space_size()
        if not combinations:
            return size
        first = min(super()._get_size(bracket_num, 0), combinations)
        return min(size, max(1, math.ceil(first / self.factor ** round_num)))

    def _random_trial(self, trial_id, bracket):
        if self._space_size() is None or any(hp.conditions for hp in self.hyperparameters.space):
            return super()._random_trial(trial_id, bracket)
        rounds = bracket["rounds"]
        used = {self._compute_values_hash(self.trials[info["id"]].hyperparameters.values)
                for info in rounds[0] if info["id"] in self.trials}
        names = [hp.name for hp in self.hyperparameters.space]
        unused = [dict(zip(names, values)) for values in itertools.product(
            *[_enumerable_values(hp) for hp in self.hyperparameters.space])]
        unused = [values for values in unused if self._compute_values_hash(values) not in used]
        if not unused:  # cannot happen with the sizes above; KerasTuner's rule as a fallback
            return super()._random_trial(trial_id, bracket)
        values = unused[random.Random(self._seed_state).randrange(len(unused))]
        self._seed_state += 1
        values.update({"tuner/epochs": self._get_epochs(bracket["bracket_num"], 0),
                       "tuner/initial_epoch": 0, "tuner/bracket": self._current_bracket,
                       "tuner/round": 0})
        rounds[0].append({"past_id": None, "id": trial_id})
        return {"status": kt.engine.trial.TrialStatus.RUNNING, "values": values}


# ---------------------------------------------------------------------------------- tuners
class SearchInterrupted(KeyboardInterrupt):
    """Raised by the `interrupt_trial` testing aid, as a Ctrl-C at a trial's start would be."""


class StopSearch(Exception):
    """Raised after `stop_after_trials` trials of this process, once their state is saved."""


class _KillAfterFirstBatch(keras.callbacks.Callback):
    """Testing aid: the process dies (SIGKILL) after the first training batch."""

    def on_train_batch_end(self, batch, logs=None):
        os.kill(os.getpid(), signal.SIGKILL)


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


class _Controlled:
    """Mixin for the tuner classes: testing aids and KerasTuner's distributed mode.

    In a distributed search (`distributed_role()`), the chief's `search` serves the oracle
    (`serve_search`) instead of KerasTuner's loop; a worker sends a heartbeat to the chief
    while it runs a trial, and waits `IDLE_POLL_SECONDS` before asking again when the chief
    has no trial for it yet.

    Attributes:
        stop_after_trials: After this many trials finished in this process (and saved), the
            search raises `StopSearch`. None: no limit.
        interrupt_trial: The n-th trial started in this process raises `SearchInterrupted`
            (a `KeyboardInterrupt`) before it trains, leaving it "running" on disk, exactly
            as a Ctrl-C or a killed process would. None: never.
        kill_trial: The n-th trial started in this process kills the process (SIGKILL) after
            its first training batch. None: never.
    """

    stop_after_trials = None
    interrupt_trial = None
    kill_trial = None
    _started_here = 0
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

    def run_trial(self, trial, *args, **kwargs):
        self._started_here += 1
        if self.interrupt_trial and self._started_here == self.interrupt_trial:
            raise SearchInterrupted(f"interrupted at the start of trial {trial.trial_id}")
        if self.kill_trial and self._started_here == self.kill_trial:
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), _KillAfterFirstBatch()]
        return super().run_trial(trial, *args, **kwargs)

    def on_trial_end(self, trial):
        if self._heartbeat is not None:
            self._heartbeat.set()
            self._heartbeat = None
        super().on_trial_end(trial)  # saves the trial and the oracle
        self._finished_here += 1
        if self.stop_after_trials and self._finished_here >= self.stop_after_trials:
            raise StopSearch(f"stopped after {self._finished_here} trial(s)")


class RandomSearch(_Controlled, kt.Tuner):
    """Random search with `RandomSearchOracle` and the hooks of `_Controlled`."""

    def __init__(self, hypermodel=None, objective=None, max_trials=10, seed=None, **kwargs):
        oracle = RandomSearchOracle(objective=objective, max_trials=max_trials, seed=seed)
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)


class Hyperband(_Controlled, kt.Hyperband):
    """Hyperband with `HyperbandOracle` and the stop/interrupt hooks of `_Controlled`.

    Trials run as in KerasTuner's `Hyperband` (whose `run_trial` and `_build_hypermodel` this
    inherits). A continued trial starts from the weights of the trial it continues (KerasTuner
    loads them) with a fresh optimizer state (momentum) whose step counter, and so its
    learning rate schedule, resumes at the epoch where that trial stopped
    (`NormBatchHyperModel.fit`).
    """

    def __init__(self, hypermodel=None, objective=None, max_epochs=100, factor=3,
                 hyperband_iterations=1, seed=None, **kwargs):
        oracle = HyperbandOracle(objective, max_epochs=max_epochs, factor=factor,
                                 hyperband_iterations=hyperband_iterations, seed=seed)
        kt.Tuner.__init__(self, oracle=oracle, hypermodel=hypermodel, **kwargs)

    def _build_hypermodel(self, hp):
        with warnings.catch_warnings():
            # Keras warns that the checkpoint's optimizer variables are not loaded into the
            # new, still unbuilt optimizer: intended, see above.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            return super()._build_hypermodel(hp)


class BayesianOptimization(_Controlled, kt.Tuner):
    """Bayesian optimization with `BayesianOptimizationOracle` (no repeated trials)."""

    def __init__(self, hypermodel=None, objective=None, max_trials=10, num_initial_points=None,
                 alpha=1e-4, beta=2.6, seed=None, **kwargs):
        oracle = BayesianOptimizationOracle(
            objective=objective, max_trials=max_trials, num_initial_points=num_initial_points,
            alpha=alpha, beta=beta, seed=seed)
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)


class GridSearch(_Controlled, kt.Tuner):
    """Grid search with `GridOracle`: every combination once, resumable."""

    def __init__(self, hypermodel=None, objective=None, max_trials=None, seed=None, **kwargs):
        oracle = GridOracle(objective=objective, max_trials=max_trials, seed=seed)
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
               stop_after_trials=None, interrupt_trial=None, kill_trial=None,
               worker_timeout=DEFAULT_WORKER_TIMEOUT):
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
        stop_after_trials: See `_Controlled`.
        interrupt_trial: See `_Controlled`.
        kill_trial: See `_Controlled`.
        worker_timeout: Distributed search: seconds of silence after which the chief gives a
            worker's trial to another worker (`SharedSearchOracle`).

    Returns:
        The tuner.
    """
    if not worker_timeout > 0:
        raise ValueError(f"make_tuner: worker_timeout must be > 0 seconds, got {worker_timeout!r}")
    objective = kt.Objective(OBJECTIVE, direction="max")
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
    tuner.stop_after_trials = stop_after_trials
    tuner.interrupt_trial = interrupt_trial
    tuner.kill_trial = kill_trial
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
        for name in ("learning_rate", "epochs", OBJECTIVE, "best_epoch", "val_loss",
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


def best_row(rows):
    """The completed row with the highest validation accuracy, or None."""
    done = [row for row in rows if row["status"] == "COMPLETED" and row[OBJECTIVE] is not None]
    return max(done, key=lambda row: row[OBJECTIVE]) if done else None


def _format(name, value):
    if value is None:
        return ""
    if name in (OBJECTIVE, "accuracy"):
        return f"{100 * value:.2f}"
    if name == "val_loss":
        return f"{value:.4f}"
    if name == "seconds":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def write_results(rows, output, title="KerasTuner search: normalization x batch size",
                  settings=None):
    """Writes `results.csv`, `results.md` and `accuracy_vs_batch_size.png` into `output`.

    Args:
        rows: `trial_rows(tuner)`.
        output: The folder.
        title: Heading of `results.md`.
        settings: Optional dict of search settings listed in `results.md`.

    Returns:
        A dict of the paths written.
    """
    import csv

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"csv": output / "results.csv", "markdown": output / "results.md",
             "plot": output / "accuracy_vs_batch_size.png"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, RESULT_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in RESULT_FIELDS})
    plot_accuracy_vs_batch_size(rows, paths["plot"])
    paths["markdown"].write_text(markdown(rows, paths, title, settings))
    return paths


def markdown(rows, paths, title, settings=None):
    """The results page: settings, the best configuration, the picture, a row per trial."""
    headers = {"trial": "trial", "status": "status", "norm": "norm", "batch_size": "batch",
               "model": "model", "placement": "placement", "lr": "lr @128",
               "learning_rate": "lr", "epochs": "epochs", OBJECTIVE: "val acc (%)",
               "best_epoch": "best epoch", "val_loss": "val loss", "accuracy": "train acc (%)",
               "steps": "steps", "replicas": "replicas", "seconds": "s", "worker": "worker",
               "attempts": "runs"}
    lines = [f"# {title}", ""]
    if settings:
        lines += ["| setting | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in settings.items()]
        lines.append("")
    best = best_row(rows)
    if best is not None:
        lines += [f"**Best:** {describe(best)}.", ""]
    lines += [f"![validation accuracy vs batch size]({paths['plot'].name})", "",
              f"{len(rows)} trial(s); `val acc` is the best validation accuracy over the "
              "trial's epochs, `lr` the learning rate used (`lr @128` scaled by batch / 128), "
              "`steps` the optimizer steps of the trial (a Hyperband continuation counts only "
              "its own), `s` its training wall time, `worker` the tuner that ran it and `runs` "
              "how many times it was started (more than once after an interruption or a lost "
              "worker).", "",
              "| " + " | ".join(headers[key] for key in RESULT_FIELDS) + " |",
              "| " + " | ".join("---:" if key not in ("status", "norm", "model", "placement",
                                                      "worker")
                                else "---" for key in RESULT_FIELDS) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_format(key, row[key]) for key in RESULT_FIELDS) + " |")
    lines.append("")
    return "\n".join(lines)


def describe(row):
    """One line for a trial: its hyperparameters and validation accuracy."""
    return (f"norm={row['norm']}, batch_size={row['batch_size']}, model={row['model']}, "
            f"placement={row['placement']}, lr={row['lr']:g} at batch 128 "
            f"({row['learning_rate']:g} used) -> validation accuracy "
            f"{100 * row[OBJECTIVE]:.2f}% (trial {row['trial']})")


def plot_accuracy_vs_batch_size(rows, path):
    """Validation accuracy against batch size (log2 axis), one line per norm.

    Where several trials share a norm and batch size (other hyperparameters, or Hyperband's
    longer runs), the best of them is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {}
    for row in rows:
        if row["status"] != "COMPLETED" or row[OBJECTIVE] is None:
            continue
        key = (row["norm"], row["batch_size"])
        best[key] = max(best.get(key, -1.0), row[OBJECTIVE])
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    norms = sorted({norm for norm, _ in best})
    for norm in norms:
        points = sorted((size, 100 * acc) for (name, size), acc in best.items() if name == norm)
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label=norm)
    sizes = sorted({size for _, size in best})
    axis.set_xscale("log", base=2)
    if sizes:
        axis.set_xticks(sizes)
        axis.set_xticklabels([str(size) for size in sizes])
    axis.set_xlabel("batch size (log2 scale)")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title("Validation accuracy vs batch size")
    axis.grid(alpha=0.3)
    if norms:
        axis.legend(title="normalization")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
