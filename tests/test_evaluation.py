"""Batch-statistics evaluation modes on a model where batch structure decides the answer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_norm
from keras_norm.evaluation import (evaluate_balanced, evaluate_batch_statistics,
                                   evaluate_pseudo_balanced)


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
    model = _threshold_model(moving_mean=0.5, moving_variance=0.25)
    result = evaluate_pseudo_balanced(model, data, num_classes=2, examples_per_class=2, seed=0)
    assert 0.0 < result["coverage"] <= 1.0
    assert set(result) >= {"loss", "binary_accuracy", "coverage"}
    # A model whose first pass predicts one class only leaves no balanced batch to form.
    with pytest.raises(ValueError, match="class"):
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
