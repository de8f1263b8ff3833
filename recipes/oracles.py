"""The KerasTuner oracles of the recipes' searches: which trial runs next, and who runs it.

- `GridOracle` (for `recipes.tuning.GridSearch`): every combination of the search space exactly
  once. It replaces KerasTuner's own `GridSearch`, whose oracle keeps its progress only in
  memory: in KerasTuner 1.4.8 a reloaded `GridSearch` either stops at once (nothing queued) or,
  when a trial was interrupted, fails with a `KeyError` in `populate_space` (the reloaded trial
  id is missing from its in-memory linked list). `GridOracle` keeps no state of its own: the
  next trial is the first combination, in a fixed order, whose values no trial has used yet
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
- `RandomSearchOracle`: KerasTuner's random search.
- `SharedSearchOracle`, the mixin of all four: one search shared by several worker tuners in
  KerasTuner's distributed mode (which tuner ran each trial; a lost worker's trial re-queued
  after `worker_timeout` seconds without a heartbeat, `DEFAULT_WORKER_TIMEOUT` by default;
  idle workers kept until the search is over).

The tuners that use them, and the chief's gRPC loop that serves them (`serve_search`), are
`recipes.tuning`'s; the old paths of the names here (`recipes.tuning.GridOracle`, ...) still
work until the next release, with a DeprecationWarning. The KerasTuner internals they override
are listed in `recipes._tuner_compat`.
"""

import itertools
import math
import random
import time

import keras_tuner as kt

#: Distributed search: the chief gives a silent worker's trial to another worker after this.
DEFAULT_WORKER_TIMEOUT = 60.0


def _enumerable_values(hp):
    """All values of a hyperparameter that the grid can enumerate."""
    if getattr(hp, "step", 0) is None:  # Int / Float without a step: a continuum
        raise ValueError(f"GridOracle: hyperparameter {hp.name!r} ({type(hp).__name__}) has no "
                         "finite set of values; give it a `step`, or use Choice or Fixed")
    return list(hp.values)


class SharedSearchOracle:
    """Mixin for the oracles here: one search shared by several worker tuners.

    KerasTuner's distributed mode runs the oracle in a chief process (`KERASTUNER_TUNER_ID`
    containing "chief") that serves worker tuners over gRPC (`recipes.tuning.serve_search`).
    KerasTuner alone re-runs a worker's trial only when a worker with the same tuner id asks
    again (the oracle hands a tuner its unfinished trial back), tells a worker to stop as soon
    as nothing is left to start (so a trial whose worker dies later has nobody left to re-run
    it) and waits forever for a worker that never comes back. This mixin adds:

    - the record of which tuner started each trial (`trial_workers`, saved with the oracle),
      for the `worker` and `attempts` columns of the results;
    - liveness: every request from a tuner (a trial request, or the heartbeat that the tuners
      of `recipes.tuning` send every `HEARTBEAT_SECONDS` while they train) marks it alive,
      and `requeue_lost_workers` puts the trial of a tuner silent for `worker_timeout` seconds
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
