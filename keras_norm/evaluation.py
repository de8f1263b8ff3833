"""Evaluating a model with its batches' own statistics (batch structure, seed 000).

Hajaj & Gillies (2018) train with balanced batches and evaluate on balanced test batches
normalized with their own statistics (the "conditional" result), which needs the test labels.
These functions measure that and label-free alternatives, each beside the ordinary
population-statistics `model.evaluate`:

- `evaluate_batch_statistics`: random test batches, each normalized by its own statistics;
- `evaluate_balanced`: balanced test batches built with the test labels (conditional result);
- `evaluate_pseudo_balanced`: balanced batches formed without test labels from a first pass
  with population statistics: by the predicted labels (`method="argmax"`), or by an optimal
  assignment that gives every class its share of the test set (`method="assignment"`, see
  `balanced_assignment`).

Each takes an UNBATCHED `tf.data.Dataset` of `(x, y)` (preprocessed, not augmented) and a
compiled model, and returns a dict of metrics like `model.evaluate(return_dict=True)`.
"""

import math

import numpy as np
import tensorflow as tf

from keras_norm.data import balanced_batches
from keras_norm.population import batch_statistics


def _check_unbatched_pairs(function, dataset):
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"{function}: `dataset` must be an unbatched tf.data.Dataset of "
                        f"(x, y) pairs. Received: dataset={dataset!r}")
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise ValueError(f"{function}: `dataset` must yield (x, y) pairs. "
                         f"Received: element_spec={spec}")


def _check_model(function, model, dataset):
    if not getattr(model, "compiled", False):
        raise ValueError(f"{function}: the model must be compiled with a loss (and metrics) "
                         f"first. Received: model {model.name!r} is not compiled.")
    inputs = getattr(model, "inputs", None)
    x_spec = dataset.element_spec[0]
    if inputs and len(inputs) == 1 and isinstance(x_spec, tf.TensorSpec):
        # A batched dataset has the model input's rank; an unbatched one has one axis less.
        if len(x_spec.shape) == len(inputs[0].shape):
            raise ValueError(f"{function}: `dataset` must be unbatched (batches are formed "
                             f"here); its examples have shape {tuple(x_spec.shape)} but the "
                             f"model takes batches of {tuple(inputs[0].shape)}. Call "
                             "`.unbatch()` first.")


def _check_positive(function, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{function}: `{name}` must be a positive int. "
                         f"Received: {name}={value!r}")


def _evaluate_with_batch_statistics(model, batches):
    with batch_statistics(model):
        return model.evaluate(batches, verbose=0, return_dict=True)


def evaluate_batch_statistics(model, dataset, batch_size, seed=None, shuffle=True):
    """Evaluates on random test batches, each normalized with its own statistics.

    Args:
        model: A compiled Keras model.
        dataset: Unbatched `tf.data.Dataset` of `(x, y)`.
        batch_size: Positive int, the test batch size (statistics depend on it).
        seed: Optional int seeding the shuffle that forms the random batches.
        shuffle: If `False`, batches follow the dataset's order. Defaults to `True`.

    Returns:
        Dict of metrics, as `model.evaluate(return_dict=True)`.
    """
    _check_unbatched_pairs("evaluate_batch_statistics", dataset)
    _check_model("evaluate_batch_statistics", model, dataset)
    _check_positive("evaluate_batch_statistics", "batch_size", batch_size)
    if shuffle:
        size = int(dataset.cardinality())
        buffer = size if size > 0 else 10_000
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
    return _evaluate_with_batch_statistics(model, dataset.batch(batch_size))


def evaluate_balanced(model, dataset, num_classes, examples_per_class=1, seed=None,
                      policy="drop"):
    """Seed 000's conditional evaluation: balanced test batches with their own statistics.

    Batches are built with the TEST LABELS (`keras_norm.data.balanced_batches`), so this is an
    analysis tool, not a deployable classifier.

    Args:
        model: A compiled Keras model.
        dataset: Unbatched `tf.data.Dataset` of `(x, y)` with integer or one-hot labels.
        num_classes: Number of classes.
        examples_per_class: Examples of each class per test batch. Defaults to 1.
        seed: Optional int for the batch composition.
        policy: Imbalance policy of `balanced_batches`. Defaults to `"drop"`.

    Returns:
        Dict of metrics, as `model.evaluate(return_dict=True)`.

    Example:

    >>> import numpy as np, tensorflow as tf, keras, keras_norm
    >>> from keras_norm.evaluation import evaluate_balanced
    >>> model = keras.Sequential([keras.Input((1,)),
    ...                           keras_norm.BatchNormalization(center=False, scale=False),
    ...                           keras.layers.Dense(1, activation="sigmoid")])
    >>> model.layers[-1].set_weights([np.ones((1, 1)), np.zeros(1)])
    >>> model.compile(loss="binary_crossentropy", metrics=["binary_accuracy"])
    >>> x = np.repeat([0.0, 1.0], 50).astype("float32")[:, None]
    >>> y = np.repeat([0, 1], 50)
    >>> data = tf.data.Dataset.from_tensor_slices((x, y))
    >>> evaluate_balanced(model, data, num_classes=2, examples_per_class=5)["binary_accuracy"]
    1.0
    """
    _check_unbatched_pairs("evaluate_balanced", dataset)
    _check_model("evaluate_balanced", model, dataset)
    batches = balanced_batches(dataset, num_classes, examples_per_class, policy=policy,
                               seed=seed)
    return _evaluate_with_batch_statistics(model, batches)


# ------------------------------------------------------------------ class-prior assignment
PSEUDO_BALANCED_METHODS = ("argmax", "assignment")


def class_shares(class_prior, total):
    """Integer class counts summing to `total`, proportional to `class_prior`.

    Largest-remainder rounding: each class gets `floor(prior * total)`, and the remaining
    examples go to the classes with the largest fractional parts (lower class index first on
    ties), so the shares are as close to the prior as integers allow.

    Args:
        class_prior: 1-D sequence of non-negative weights (normalized here).
        total: Non-negative int, the number of examples to share out.

    Returns:
        An int64 array of counts, one per class.

    Example:

    >>> class_shares([0.5, 0.25, 0.25], 10).tolist()
    [5, 3, 2]
    """
    prior = _check_prior("class_shares", class_prior, None)
    raw = prior * total
    shares = np.floor(raw).astype(np.int64)
    remainder = int(total - shares.sum())
    if remainder:
        # Stable sort on the negated fractional parts: ties go to the lower class index.
        order = np.argsort(-(raw - shares), kind="stable")
        shares[order[:remainder]] += 1
    return shares


def _check_prior(function, class_prior, num_classes):
    prior = np.asarray(class_prior, dtype=np.float64)
    if (prior.ndim != 1 or prior.size == 0 or not np.all(np.isfinite(prior))
            or np.any(prior < 0) or prior.sum() <= 0):
        raise ValueError(f"{function}: `class_prior` must be a 1-D sequence of non-negative, "
                         f"finite class weights with a positive sum. "
                         f"Received: class_prior={class_prior!r}")
    if num_classes is not None and prior.size != num_classes:
        raise ValueError(f"{function}: `class_prior` needs one weight per class "
                         f"({num_classes}). Received: class_prior={class_prior!r}")
    return prior / prior.sum()


def _log_probabilities(scores, function):
    """`(n, C)` float64 log-probabilities of a classifier's outputs.

    Probabilities (rows in [0, 1] summing to 1) are logged; anything else is read as logits
    and log-softmaxed (a per-row shift, which changes no assignment). A single output column
    is a sigmoid probability (or logit if outside [0, 1]) of class 1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or not np.all(np.isfinite(scores)):
        raise ValueError(f"{function}: `scores` must be a non-empty, finite (examples, "
                         f"classes) array. Received: scores of shape {scores.shape}")
    tiny = np.finfo(np.float64).tiny
    if scores.shape[1] == 1:
        p = scores[:, 0]
        if p.min() < 0 or p.max() > 1:
            p = 1 / (1 + np.exp(-p))
        return np.log(np.maximum(np.stack([1 - p, p], axis=1), tiny))
    probabilities = (scores.min() >= 0 and scores.max() <= 1
                     and np.allclose(scores.sum(axis=1), 1, atol=1e-3))
    if probabilities:
        return np.log(np.maximum(scores, tiny))
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _initial_prices(cost, capacities, sweeps=4):
    """Class prices under which the cheapest classes nearly match `capacities`.

    Coordinate ascent on the transportation problem's dual: for one class at a time, its
    price is set so that exactly its capacity of examples find it cheapest, given the other
    prices (the midpoint between the capacity-th and the next example's price threshold).
    Not exact by itself (ties, and the dual is not smooth), which is why
    `_min_cost_transport` only starts from it.
    """
    n, num_classes = cost.shape
    prices = np.zeros(num_classes)
    for _ in range(sweeps):
        for j in range(num_classes):
            reduced = cost - prices
            reduced[:, j] = np.inf
            # Example i prefers class j iff cost[i, j] - prices[j] < its best other class.
            threshold = cost[:, j] - reduced.min(axis=1)
            capacity = int(capacities[j])
            if capacity == 0:
                prices[j] = threshold.min() - 1.0
            elif capacity >= n:
                prices[j] = threshold.max() + 1.0
            else:
                low, high = np.partition(threshold, (capacity - 1, capacity))[
                    [capacity - 1, capacity]]
                prices[j] = 0.5 * (low + high)
    return prices


def _min_cost_transport(cost, capacities):
    """Exact minimum-cost assignment of `n` examples to `C` classes with `capacities`.

    The transportation problem `min sum_i cost[i, a(i)]` subject to class `j` receiving exactly
    `capacities[j]` examples, solved by successive shortest paths on the C-node class graph
    (a primal-dual method, exact for real costs up to floating-point rounding):

    - Class prices `v` (the LP duals) start at 0 and every example starts in its cheapest
      class. Invariant: every example sits in a class minimizing `cost[i, j] - v[j]`, so the
      assignment is optimal for its own class counts.
    - Moving the best example of class `j` to class `k` costs
      `W[j, k] = min_{i in j} (cost[i, k] - cost[i, j]) + v[j] - v[k] >= 0`. A Dijkstra search
      from the over-full classes finds the cheapest chain of such moves to an under-full class;
      raising the prices by the distances keeps the invariant and makes that chain free, and
      the moves along it hand one unit of surplus on.

    Any prices are a valid start (each example then goes to its cheapest class at those
    prices), and each round moves one example of surplus, so the rounds are the surplus
    `sum(max(count - capacity, 0))` of the start, each costing O(C^2 + (examples in the
    touched classes) * C) NumPy work. The start's prices come from a few sweeps of
    coordinate ascent on the dual (`_initial_prices`), which leave only a small surplus.

    Returns:
        `(labels, prices)`: the class of each example and the final class prices.
    """
    n, num_classes = cost.shape
    prices = _initial_prices(cost, capacities)
    labels = np.argmin(cost - prices, axis=1)
    excess = np.bincount(labels, minlength=num_classes) - capacities
    # gap[j, k], mover[j, k]: the cheapest cost[i, k] - cost[i, j] over the examples i of
    # class j, and that example. Only the classes a move touches need recomputing.
    gap = np.full((num_classes, num_classes), np.inf)
    mover = np.zeros((num_classes, num_classes), dtype=np.int64)
    columns = np.arange(num_classes)

    def refresh(j):
        members = np.flatnonzero(labels == j)
        gap[j] = np.inf
        if members.size:
            delta = cost[members] - cost[members, j][:, None]
            best = np.argmin(delta, axis=0)
            gap[j] = delta[best, columns]
            mover[j] = members[best]
        gap[j, j] = np.inf

    for j in range(num_classes):
        refresh(j)
    while np.any(excess > 0):
        # Rounding can leave a reduced cost a hair below 0; Dijkstra needs them >= 0.
        weights = np.maximum(gap + prices[:, None] - prices[None, :], 0.0)
        distance = np.where(excess > 0, 0.0, np.inf)
        previous = np.full(num_classes, -1)
        finished = np.zeros(num_classes, dtype=bool)
        while True:
            j = int(np.argmin(np.where(finished, np.inf, distance)))
            finished[j] = True
            if excess[j] < 0:
                target = j
                break
            candidate = distance[j] + weights[j]
            better = (candidate < distance) & ~finished
            distance[better] = candidate[better]
            previous[better] = j
        prices += np.minimum(distance, distance[target])
        k, touched = target, [target]
        while previous[k] >= 0:
            j = int(previous[k])
            labels[mover[j, k]] = k
            touched.append(j)
            k = j
        excess[k] -= 1
        excess[target] += 1
        for j in touched:
            refresh(j)
    return labels, prices


def balanced_assignment(scores, class_prior=None):
    """Assigns every example a class so that each class gets its share: optimal, label-free.

    Solves exactly (up to floating-point rounding) the transportation problem

        maximize   sum_i log p(a(i) | x_i)
        subject to class j receiving round(class_prior[j] * n) of the n examples,

    i.e. the most probable labelling of the whole set under the constraint that its class
    counts match the prior. This is `scipy.optimize.linear_sum_assignment` on the negative
    log-probabilities with each class repeated for its share, but solved on the C-class
    graph (a dual start plus successive shortest paths), so it needs no SciPy and scales to
    large sets: about 0.1 s for 10,000 examples of 10 classes on one CPU core
    (`python benchmarks/bench_assignment.py`).

    Args:
        scores: `(n, C)` class probabilities or logits of `n` examples (e.g. `model.predict`
            with population statistics); a single column is a sigmoid output.
        class_prior: Optional length-C class weights (normalized here); the shares are their
            largest-remainder rounding (`class_shares`). Defaults to equal shares.

    Returns:
        An int64 array of `n` class indices.

    Example:

    >>> import numpy as np
    >>> from keras_norm.evaluation import balanced_assignment
    >>> p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    >>> balanced_assignment(p).tolist()   # argmax would say [0, 0, 0, 1]
    [0, 0, 1, 1]
    """
    log_p = _log_probabilities(scores, "balanced_assignment")
    num_classes = log_p.shape[1]
    prior = (np.full(num_classes, 1.0 / num_classes) if class_prior is None
             else _check_prior("balanced_assignment", class_prior, num_classes))
    labels, _ = _min_cost_transport(-log_p, class_shares(prior, log_p.shape[0]))
    return labels


# ---------------------------------------------------------------------- pseudo-balanced
def _balanced_index_batches(labels, num_classes, examples_per_class, policy, rng):
    """`(batches, batch size)` example indices, each row `examples_per_class` of every class.

    Same policies as `keras_norm.data.balanced_batches`: `"drop"` makes as many batches as the
    smallest class fills, `"oversample"` as many as the largest needs, repeating the examples
    of smaller classes as whole reshuffled passes plus a partial one.
    """
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    counts = [len(m) for m in members]
    if min(counts) == 0:
        empty = [c for c, count in enumerate(counts) if count == 0]
        raise ValueError(f"evaluate_pseudo_balanced: no test example was given class(es) "
                         f"{empty} (first-pass counts per class: {counts}; every batch needs "
                         f"examples_per_class={examples_per_class} of each class), so no "
                         "balanced batch can be formed; method='assignment' gives every class "
                         "its share")
    if policy == "drop":
        num_batches = min(counts) // examples_per_class
    else:
        num_batches = math.ceil(max(counts) / examples_per_class)
    if num_batches == 0:
        raise ValueError(f"evaluate_pseudo_balanced: some class got fewer than "
                         f"examples_per_class={examples_per_class} examples (counts per "
                         f"class: {counts}), so no balanced batch can be formed")
    slots = num_batches * examples_per_class
    columns = []
    for m in members:
        if len(m) < slots:
            passes = [m] + [rng.permutation(m) for _ in range(math.ceil(slots / len(m)) - 1)]
            m = np.concatenate(passes)
        columns.append(m[:slots].reshape(num_batches, examples_per_class))
    return rng.permuted(np.concatenate(columns, axis=1), axis=1)


def _materialize(dataset):
    """The examples and labels of a finite unbatched dataset as NumPy structures."""
    parts_x, parts_y = [], []
    for x, y in dataset.batch(1024).as_numpy_iterator():
        parts_x.append(x)
        parts_y.append(y)
    if not parts_x:
        raise ValueError("evaluate_pseudo_balanced: `dataset` is empty.")
    x = tf.nest.map_structure(lambda *a: np.concatenate(a), *parts_x)
    return x, np.concatenate(parts_y)


def _true_classes(y):
    y = np.asarray(y)
    if y.ndim > 1 and y.shape[-1] > 1:
        return np.argmax(y, axis=-1)
    return y.reshape(len(y)).astype(np.int64)


def _predicted_classes(scores):
    scores = np.asarray(scores).reshape(len(scores), -1)
    if scores.shape[1] == 1:
        # A sigmoid output (or its logit): class 1 above 0.5 (logit 0).
        threshold = 0.0 if scores.min() < 0 or scores.max() > 1 else 0.5
        return (scores[:, 0] > threshold).astype(np.int64)
    return np.argmax(scores, axis=1)


def evaluate_pseudo_balanced(model, dataset, num_classes, examples_per_class=1, seed=None,
                             policy="drop", prediction_batch_size=256, method="argmax",
                             class_prior=None, iterations=1, return_predictions=False):
    """Label-free balanced evaluation: balanced test batches formed from the model's own scores.

    A first pass with population statistics scores every test example. The examples are then
    given a class without reading any test label, grouped into batches of
    `examples_per_class` examples of every class, and evaluated, against the TRUE labels, with
    each batch's own statistics. How the classes are given (`method`):

    - `"argmax"` (default): each example's predicted class. Predicted classes are rarely
      balanced: under `policy="drop"` examples of over-predicted classes that do not fill a
      balanced batch are left out (`"coverage"` is the fraction evaluated).
    - `"assignment"`: the optimal assignment under the constraint that every class gets its
      share of the test set (`class_prior`, equal by default): `balanced_assignment` on the
      first pass's scores. Every example then fills a batch (coverage 1 when the shares divide
      into batches). With `iterations > 1` the classes are re-assigned from the last
      batch-statistics pass's scores and the batches evaluated again.

    The test labels are read only to score the result, never to form the batches: permuting
    them gives the same batches and predictions.

    Args:
        model: A compiled Keras classifier whose outputs are per-class scores (probabilities
            or logits; a single sigmoid output counts as two classes).
        dataset: Unbatched `tf.data.Dataset` of `(x, y)`, finite (it is read into memory).
        num_classes: Number of classes.
        examples_per_class: Examples of each class per batch. Defaults to 1.
        seed: Optional int for the batch composition.
        policy: `"drop"` or `"oversample"`, for classes with more examples than fill whole
            batches (as `keras_norm.data.balanced_batches`). Defaults to `"drop"`.
        prediction_batch_size: Batch size of the first (population statistics) pass.
        method: `"argmax"` or `"assignment"`. Defaults to `"argmax"`.
        class_prior: Optional length-`num_classes` class weights for `method="assignment"`
            (the test set's class proportions); defaults to equal shares.
        iterations: Positive int, how many times classes are given and batches evaluated; the
            first time from the population-statistics pass, later ones from the previous
            batch-statistics pass. Defaults to 1.
        return_predictions: If `True`, also return the predicted class of every example.

    Returns:
        Dict of metrics, as `model.evaluate(return_dict=True)` on the balanced batches (an
        example repeated by `"oversample"` counts each time), plus `"coverage"` (fraction of
        the examples evaluated), `"population_accuracy"` (the first pass's argmax accuracy)
        and `"assignment_accuracy"` (fraction of the examples whose given class, from which
        the batches were formed, is their true class: the accuracy of the assignment alone).
        With `return_predictions=True`, `(metrics, predictions)`: `predictions` is an int64
        array with the batch-statistics pass's predicted class of every example, in dataset
        order (an example's first batch under `"oversample"`; -1 for examples in no batch).

    Example:

    >>> import numpy as np, tensorflow as tf, keras, keras_norm
    >>> from keras_norm.evaluation import evaluate_pseudo_balanced
    >>> model = keras.Sequential([keras.Input((1,)),
    ...                           keras_norm.BatchNormalization(center=False, scale=False),
    ...                           keras.layers.Dense(1, activation="sigmoid")])
    >>> model.layers[0].set_weights([np.array([-5.0]), np.ones(1)])  # stale statistics
    >>> model.layers[-1].set_weights([np.full((1, 1), 10.0), np.zeros(1)])
    >>> model.compile(loss="binary_crossentropy", metrics=["binary_accuracy"])
    >>> x = np.repeat([0.0, 1.0], 50).astype("float32")[:, None]
    >>> y = np.repeat([0, 1], 50)
    >>> data = tf.data.Dataset.from_tensor_slices((x, y))
    >>> metrics, predictions = evaluate_pseudo_balanced(
    ...     model, data, num_classes=2, examples_per_class=5, method="assignment", seed=0,
    ...     return_predictions=True)
    >>> metrics["population_accuracy"], metrics["binary_accuracy"]
    (0.5, 1.0)
    """
    function = "evaluate_pseudo_balanced"
    _check_unbatched_pairs(function, dataset)
    _check_model(function, model, dataset)
    _check_positive(function, "num_classes", num_classes)
    _check_positive(function, "examples_per_class", examples_per_class)
    _check_positive(function, "prediction_batch_size", prediction_batch_size)
    _check_positive(function, "iterations", iterations)
    if policy not in ("drop", "oversample"):
        raise ValueError(f"{function}: `policy` must be 'drop' or 'oversample' "
                         f"(predicted classes are rarely exactly balanced). "
                         f"Received: policy={policy!r}")
    if method not in PSEUDO_BALANCED_METHODS:
        raise ValueError(f"{function}: `method` must be one of {PSEUDO_BALANCED_METHODS}. "
                         f"Received: method={method!r}")
    if class_prior is not None:
        if method != "assignment":
            raise ValueError(f"{function}: `class_prior` only applies to "
                             f"method='assignment'. Received: method={method!r}")
        class_prior = _check_prior(function, class_prior, num_classes)

    x, y = _materialize(dataset)
    total = len(y)
    scores = np.asarray(model.predict(x, batch_size=prediction_batch_size, verbose=0))
    scores = scores.reshape(total, -1)
    width = max(scores.shape[1], 2)
    if width != num_classes:
        raise ValueError(f"{function}: the model scores {width} classes but "
                         f"num_classes={num_classes}.")
    truth = _true_classes(y)
    population_accuracy = float(np.mean(_predicted_classes(scores) == truth))
    rng = np.random.default_rng(seed)
    batch_size = examples_per_class * num_classes
    for _ in range(iterations):
        if method == "assignment":
            given = balanced_assignment(scores, class_prior)
        else:
            given = _predicted_classes(scores)
        batches = _balanced_index_batches(given, num_classes, examples_per_class, policy, rng)
        order = batches.reshape(-1)
        x_batches = tf.nest.map_structure(lambda a: a[order], x)
        with batch_statistics(model):
            batch_scores = np.asarray(model.predict(x_batches, batch_size=batch_size,
                                                    verbose=0)).reshape(len(order), -1)
            metrics = model.evaluate(x_batches, y[order], batch_size=batch_size, verbose=0,
                                     return_dict=True)
        # Each example's scores from its first batch; examples in no batch keep theirs.
        first = np.unique(order, return_index=True)[1]
        scores = scores.copy()
        scores[order[first]] = batch_scores[first]
    covered = np.zeros(total, dtype=bool)
    covered[order] = True
    predictions = np.where(covered, _predicted_classes(scores), -1)
    metrics = {key: float(value) for key, value in metrics.items()}
    metrics["coverage"] = float(covered.mean())
    metrics["population_accuracy"] = population_accuracy
    metrics["assignment_accuracy"] = float(np.mean(given == truth))
    if return_predictions:
        return metrics, predictions
    return metrics
