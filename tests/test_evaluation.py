"""Batch-statistics evaluation modes on a model where batch structure decides the answer,
and the class-prior assignment behind `evaluate_pseudo_balanced(method="assignment")`.

The assignment's speed target (10,000 examples in under 30 s on one core) is measured by
`benchmarks/bench_assignment.py`, not asserted here; these tests check that it is optimal.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import linear_sum_assignment

import keras_norm
from keras_norm import evaluation
from keras_norm.evaluation import (balanced_assignment, class_shares, evaluate_balanced,
                                   evaluate_batch_statistics, evaluate_pseudo_balanced)


def _threshold_model(moving_mean=0.0, moving_variance=1.0):
    """sigmoid((x - mean) / std): class 1 iff x is above the statistics' mean."""
    model = keras.Sequential([
        keras.Input((1,)),
        keras_norm.BatchNormalization(center=False, scale=False, epsilon=1e-6),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.layers[0].set_weights([np.array([moving_mean]), np.array([moving_variance])])
    model.layers[1].set_weights([np.full((1, 1), 10.0), np.zeros(1)])
    model.compile(loss="binary_crossentropy", metrics=["binary_accuracy"])
    return model


def _two_classes(n=40, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n)
    x = (y + rng.normal(0, noise, 2 * n)).astype("float32")[:, None]
    return tf.data.Dataset.from_tensor_slices((x, y)), x, y


def test_balanced_batches_give_the_conditional_result():
    data, x, y = _two_classes()
    model = _threshold_model(moving_mean=-5.0)  # population statistics call everything 1
    population = model.evaluate(x, y, verbose=0, return_dict=True)["binary_accuracy"]
    balanced = evaluate_balanced(model, data, num_classes=2, examples_per_class=4, seed=0)
    assert population == pytest.approx(0.5)
    assert balanced["binary_accuracy"] == pytest.approx(1.0)
    assert set(balanced) >= {"loss", "binary_accuracy"}


def test_random_batches_use_their_own_statistics():
    data, x, y = _two_classes()
    model = _threshold_model(moving_mean=-5.0)
    ordered = evaluate_batch_statistics(model, data, batch_size=40, shuffle=False)
    # In file order each batch holds one class: its own mean splits it in half.
    expected = []
    for batch in (x[:40], x[40:]):
        logits = 10 * (batch[:, 0] - batch.mean()) / np.sqrt(batch.var() + 1e-6)
        expected.append((logits > 0) == (batch[:, 0] > 0.5))
    assert ordered["binary_accuracy"] == pytest.approx(np.mean(expected))
    shuffled = evaluate_batch_statistics(model, data, batch_size=40, seed=1)
    assert shuffled["binary_accuracy"] > ordered["binary_accuracy"]


def test_pseudo_balanced_uses_predictions_not_labels():
    data, x, y = _two_classes(noise=0.3, seed=2)
    model = _threshold_model(moving_mean=0.3, moving_variance=0.25)
    result = evaluate_pseudo_balanced(model, data, num_classes=2, examples_per_class=2, seed=0)
    # The first pass (population statistics) predicts class 1 iff x > 0.3. The true classes
    # are balanced (40 + 40) and would fill every batch; the predicted ones are not, so under
    # "drop" the batches of 2 + 2 take the rarer predicted class's examples in whole pairs.
    predicted = np.bincount((x[:, 0] > 0.3).astype(int), minlength=2)
    assert predicted.min() // 2 < 20, predicted
    assert result["coverage"] == pytest.approx(2 * 2 * (predicted.min() // 2) / len(y))
    assert set(result) >= {"loss", "binary_accuracy", "coverage"}
    # A model whose first pass predicts one class only leaves no balanced batch to form.
    with pytest.raises(ValueError, match=r"no test example was given class\(es\) \[0\]"):
        evaluate_pseudo_balanced(_threshold_model(moving_mean=-5.0), data, num_classes=2)


def test_evaluation_leaves_the_model_unchanged():
    data, x, y = _two_classes()
    model = _threshold_model(moving_mean=0.3)
    before = [w.numpy().copy() for w in model.weights]
    evaluate_balanced(model, data, num_classes=2, examples_per_class=2)
    evaluate_batch_statistics(model, data, batch_size=8)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())
    assert model.layers[0].inference_statistics == "moving"


@pytest.mark.parametrize("call, fragment", [
    (lambda m, d: evaluate_batch_statistics(m, d, batch_size=0),
     r"`batch_size` must be a positive int. Received: batch_size=0"),
    (lambda m, d: evaluate_batch_statistics(m, d.batch(2), batch_size=2),
     r"must be unbatched.*\.unbatch\(\)"),
    (lambda m, d: evaluate_pseudo_balanced(m, d, 2, policy="strict"), r"policy='strict'"),
    (lambda m, d: evaluate_balanced(m, d.map(lambda x, y: x), 2), r"must yield \(x, y\)"),
])
def test_argument_errors(call, fragment):
    data, _, _ = _two_classes()
    with pytest.raises(ValueError, match=fragment):
        call(_threshold_model(), data)


def test_uncompiled_model_is_an_error():
    data, _, _ = _two_classes()
    model = keras.Sequential([keras.Input((1,)), keras_norm.BatchNormalization()])
    with pytest.raises(ValueError, match="must be compiled"):
        evaluate_balanced(model, data, num_classes=2)


# ------------------------------------------------------------------ class-prior assignment
def _log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _brute_force_best(log_p, shares):
    """The highest total log-probability over every labelling with these class counts."""
    n, classes = log_p.shape
    best = -np.inf
    for labels in itertools.product(range(classes), repeat=n):
        if np.array_equal(np.bincount(labels, minlength=classes), shares):
            best = max(best, log_p[np.arange(n), labels].sum())
    return best


@pytest.mark.parametrize("n, classes, prior", [
    (6, 2, None), (6, 3, None), (8, 3, [0.5, 0.25, 0.25]), (7, 3, [0.2, 0.3, 0.5]),
    (8, 4, None), (5, 2, [0.9, 0.1]),
])
def test_assignment_is_the_brute_force_optimum(n, classes, prior):
    rng = np.random.default_rng(n * 10 + classes)
    for trial in range(5):
        # Skewed logits, so that the argmax is far from the required class counts.
        logits = rng.normal(size=(n, classes)) * 2 + np.linspace(2, 0, classes)
        log_p = _log_softmax(logits)
        shares = class_shares([1.0] * classes if prior is None else prior, n)
        labels = balanced_assignment(logits, class_prior=prior)
        np.testing.assert_array_equal(np.bincount(labels, minlength=classes), shares)
        assert log_p[np.arange(n), labels].sum() == pytest.approx(
            _brute_force_best(log_p, shares), abs=1e-9)


@pytest.mark.parametrize("start", ["dual", "greedy"])
def test_shortest_paths_finish_any_start_exactly(start, monkeypatch):
    """From the greedy start (all prices 0) the shortest-path rounds do all the work; from the
    dual start only a few remain. Both must end at the optimum."""
    if start == "greedy":
        monkeypatch.setattr(evaluation, "_initial_prices",
                            lambda cost, capacities: np.zeros(cost.shape[1]))
    rng = np.random.default_rng(3)
    for n, classes in ((7, 3), (8, 2), (300, 10)):
        logits = rng.normal(size=(n, classes)) * 2
        logits[:, 0] += 3  # most examples start in class 0
        cost = -_log_softmax(logits)
        shares = class_shares(np.ones(classes), n)
        labels, prices = evaluation._min_cost_transport(cost, shares)
        np.testing.assert_array_equal(np.bincount(labels, minlength=classes), shares)
        if n <= 8:
            best = -_brute_force_best(-cost, shares)
        else:
            repeated = np.repeat(cost, shares, axis=1)
            best = repeated[linear_sum_assignment(repeated)].sum()
        assert cost[np.arange(n), labels].sum() == pytest.approx(best, rel=1e-12)
        # The prices certify it: every example sits in a cheapest class at those prices.
        reduced = cost - prices
        np.testing.assert_allclose(reduced[np.arange(n), labels], reduced.min(axis=1),
                                   atol=1e-9)


def test_assignment_matches_linear_sum_assignment_at_moderate_size():
    """The issue's reference method: linear_sum_assignment with each class repeated for its
    share. Same optimal cost (the labellings may differ only where costs tie)."""
    rng = np.random.default_rng(0)
    for n, prior in ((600, None), (500, np.arange(1, 11) / 55.0)):
        logits = rng.normal(size=(n, 10)) * 3
        logits[np.arange(n), rng.integers(0, 10, n)] += 3
        logits[:, 0] += 2  # class 0 over-predicted by the argmax
        cost = -_log_softmax(logits)
        shares = class_shares(np.ones(10) if prior is None else prior, n)
        repeated = np.repeat(cost, shares, axis=1)
        rows, cols = linear_sum_assignment(repeated)
        labels = balanced_assignment(logits, class_prior=prior)
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), shares)
        assert cost[np.arange(n), labels].sum() == pytest.approx(repeated[rows, cols].sum(),
                                                                 rel=1e-12)


def test_assignment_takes_probabilities_logits_and_a_sigmoid_column():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    assert balanced_assignment(probabilities).tolist() == [0, 0, 1, 1]
    assert balanced_assignment(np.log(probabilities) + 5.0).tolist() == [0, 0, 1, 1]
    sigmoid = probabilities[:, 1:]
    assert balanced_assignment(sigmoid).tolist() == [0, 0, 1, 1]
    # Without the constraint every example would go to class 0; with it, the two least
    # confident ones move.
    assert np.argmax(np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]]),
                     axis=1).tolist() == [0, 0, 0, 0]
    assert balanced_assignment([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]]).tolist() \
        == [0, 0, 1, 1]


def test_class_shares_round_to_the_prior():
    assert class_shares([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert class_shares([0.5, 0.25, 0.25], 10).tolist() == [5, 3, 2]
    assert class_shares([0.7, 0.2, 0.1], 20).tolist() == [14, 4, 2]
    assert class_shares([0, 1], 3).tolist() == [0, 3]


def _class_model(classes=3, seed=0):
    """Dense -> BN on the logits: which class wins depends on the batch's statistics."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(classes),
                              keras_norm.BatchNormalization()])
    model.layers[1].set_weights([np.ones(classes), np.linspace(-1, 1, classes),
                                 np.full(classes, 0.3), np.full(classes, 2.0)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _class_data(n=60, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, 4)).astype("float32") + y[:, None].astype("float32")
    return x, y


def test_assignment_never_reads_the_test_labels(monkeypatch):
    """Permuted (wrong) labels: the same batches and predictions; only the scores change."""
    x, y = _class_data()
    formed = []
    original = evaluation._balanced_index_batches

    def recording(*args, **kwargs):
        formed.append(original(*args, **kwargs))
        return formed[-1]

    monkeypatch.setattr(evaluation, "_balanced_index_batches", recording)
    model = _class_model()
    outcomes = []
    for labels in (y, np.random.default_rng(1).permutation(y)):
        data = tf.data.Dataset.from_tensor_slices((x, labels))
        outcomes.append(evaluate_pseudo_balanced(model, data, num_classes=3, seed=0,
                                                 method="assignment", iterations=2,
                                                 return_predictions=True))
    assert len(formed) == 4  # two iterations per call
    for a, b in zip(formed[:2], formed[2:]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(outcomes[0][1], outcomes[1][1])
    assert outcomes[0][0]["accuracy"] != outcomes[1][0]["accuracy"]


def test_assignment_batches_and_predictions():
    x, y = _class_data(n=60)
    model = _class_model()
    data = tf.data.Dataset.from_tensor_slices((x, y))
    metrics, predictions = evaluate_pseudo_balanced(
        model, data, num_classes=3, examples_per_class=2, seed=0, method="assignment",
        return_predictions=True)
    # 60 examples, 20 per class: every example in exactly one batch of 2 per class.
    assert metrics["coverage"] == 1.0
    assert predictions.shape == (60,) and predictions.min() >= 0
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == y))
    # The assignment alone and the first pass, recomputed from the model here.
    scores = model.predict(x, verbose=0)
    assert metrics["population_accuracy"] == pytest.approx(np.mean(scores.argmax(1) == y))
    assigned = balanced_assignment(scores)
    assert metrics["assignment_accuracy"] == pytest.approx(np.mean(assigned == y))
    # The predictions are those of batches of the assigned classes with their own statistics.
    for batch in evaluation._balanced_index_batches(assigned, 3, 2, "drop",
                                                    np.random.default_rng(0)):
        assert sorted(np.bincount(assigned[batch], minlength=3)) == [2, 2, 2]
        with keras_norm.batch_statistics(model):
            own = model.predict(x[batch], verbose=0).argmax(1)
        np.testing.assert_array_equal(predictions[batch], own)


def test_assignment_fixes_stale_population_statistics():
    """Population statistics call everything class 1; balanced batches' own statistics
    separate the two classes perfectly (and the argmax method cannot form any batch)."""
    data, x, y = _two_classes()
    model = _threshold_model(moving_mean=-5.0)
    metrics, predictions = evaluate_pseudo_balanced(model, data, num_classes=2,
                                                    examples_per_class=4, seed=0,
                                                    method="assignment",
                                                    return_predictions=True)
    assert metrics["population_accuracy"] == pytest.approx(0.5)
    assert metrics["binary_accuracy"] == pytest.approx(1.0)
    np.testing.assert_array_equal(predictions, y)
    with pytest.raises(ValueError, match="method='assignment'"):
        evaluate_pseudo_balanced(model, data, num_classes=2)


def test_unequal_class_prior_sets_the_shares(monkeypatch):
    x, y = _class_data(n=40)
    formed = []
    original = evaluation._balanced_index_batches
    monkeypatch.setattr(evaluation, "_balanced_index_batches",
                        lambda labels, *a: formed.append(labels.copy()) or original(labels, *a))
    data = tf.data.Dataset.from_tensor_slices((x, y))
    metrics = evaluate_pseudo_balanced(_class_model(), data, num_classes=3, seed=0,
                                       method="assignment", class_prior=[0.5, 0.25, 0.25])
    assert np.bincount(formed[0], minlength=3).tolist() == [20, 10, 10]
    # Batches take one of each class: 10 of them, so 30 of the 40 examples are evaluated.
    assert metrics["coverage"] == pytest.approx(0.75)


def test_argmax_method_is_the_default_and_returns_predictions():
    data, x, y = _two_classes(noise=0.3, seed=2)
    # Stale statistics: the first pass predicts 37 examples of class 0 and 43 of class 1.
    model = _threshold_model(moving_mean=0.3, moving_variance=0.25)
    metrics, predictions = evaluate_pseudo_balanced(model, data, num_classes=2,
                                                    examples_per_class=1, seed=0,
                                                    return_predictions=True)
    first_pass = (x[:, 0] > 0.3).astype(int)
    assert np.bincount(first_pass, minlength=2).tolist() == [37, 43]
    assert metrics["assignment_accuracy"] == pytest.approx(np.mean(first_pass == y))
    covered = predictions >= 0
    assert metrics["coverage"] == pytest.approx(covered.mean())
    # Batches hold one example of each first-pass class: all of the rarer class are covered,
    # and as many of the other, so 6 of the 43 are left out.
    assert covered[first_pass == 0].all()
    assert covered[first_pass == 1].sum() == 37
    assert metrics["binary_accuracy"] == pytest.approx(np.mean(predictions[covered]
                                                               == y[covered]))


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(method="hungarian"), r"`method` must be one of \('argmax', 'assignment'\). "
                               r"Received: method='hungarian'"),
    (dict(method="assignment", class_prior=[1.0, 2.0, 3.0]), r"one weight per class \(2\)"),
    (dict(method="assignment", class_prior=[1.0, -1.0]), r"non-negative"),
    (dict(class_prior=[0.5, 0.5]), r"only applies to method='assignment'"),
    (dict(method="assignment", iterations=0), r"`iterations` must be a positive int"),
    (dict(num_classes=3, method="assignment"), r"scores 2 classes but num_classes=3"),
])
def test_assignment_argument_errors(kwargs, fragment):
    data, _, _ = _two_classes()
    kwargs = {"num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        evaluate_pseudo_balanced(_threshold_model(), data, **kwargs)


def test_assignment_of_bad_scores_is_an_error():
    with pytest.raises(ValueError, match=r"balanced_assignment: `scores` must be"):
        balanced_assignment(np.array([[0.5, np.nan]]))
    with pytest.raises(ValueError, match=r"one weight per class \(2\)"):
        balanced_assignment(np.eye(2), class_prior=[1, 1, 1])
