"""Evaluating a model with its batches' own statistics (batch structure, seed 000).

Hajaj & Gillies (2018) train with balanced batches and evaluate on balanced test batches
normalized with their own statistics (the "conditional" result), which needs the test labels.
These functions measure that and two label-free alternatives, each beside the ordinary
population-statistics `model.evaluate`:

- `evaluate_batch_statistics`: random test batches, each normalized by its own statistics;
- `evaluate_balanced`: balanced test batches built with the test labels (conditional result);
- `evaluate_pseudo_balanced`: balanced batches of the model's own first-pass predictions (made
  with population statistics), so no test label is used to form the batches.

Each takes an UNBATCHED `tf.data.Dataset` of `(x, y)` (preprocessed, not augmented) and a
compiled model, and returns a dict of metrics like `model.evaluate(return_dict=True)`.
"""

import tensorflow as tf

from keras_norm.data import balanced_batches
from keras_norm.statistics import batch_statistics


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


def evaluate_pseudo_balanced(model, dataset, num_classes, examples_per_class=1, seed=None,
                             policy="drop", prediction_batch_size=256):
    """Label-free balanced evaluation: balance test batches by the model's own predictions.

    A first pass with population statistics predicts a label for every test example; the
    examples are then grouped into batches balanced by those predicted labels and evaluated,
    against the TRUE labels, with each batch's own statistics. No test label is used to form
    the batches. Under `policy="drop"` examples of over-predicted classes that do not fill a
    balanced batch are left out; the result's `"coverage"` is the fraction evaluated.

    Args:
        model: A compiled Keras classifier whose outputs are per-class scores.
        dataset: Unbatched `tf.data.Dataset` of `(x, y)`.
        num_classes: Number of classes.
        examples_per_class: Examples of each predicted class per batch. Defaults to 1.
        seed: Optional int for the batch composition.
        policy: Imbalance policy of `balanced_batches` for the predicted classes
            (`"drop"` or `"oversample"`). Defaults to `"drop"`.
        prediction_batch_size: Batch size of the first (population statistics) pass.

    Returns:
        Dict of metrics, as `model.evaluate(return_dict=True)`, plus `"coverage"`.
    """
    _check_unbatched_pairs("evaluate_pseudo_balanced", dataset)
    _check_model("evaluate_pseudo_balanced", model, dataset)
    if policy not in ("drop", "oversample"):
        raise ValueError("evaluate_pseudo_balanced: `policy` must be 'drop' or 'oversample' "
                         f"(predicted classes are rarely exactly balanced). "
                         f"Received: policy={policy!r}")
    scores = model.predict(dataset.map(lambda x, y: x).batch(prediction_batch_size), verbose=0)
    predicted = tf.argmax(tf.reshape(scores, [tf.shape(scores)[0], -1]), axis=-1)
    if scores.shape[-1] == 1:  # a single sigmoid output
        predicted = tf.cast(tf.reshape(scores, [-1]) > 0.5, tf.int64)
    pairs = tf.data.Dataset.zip(dataset, tf.data.Dataset.from_tensor_slices(predicted))
    pseudo = pairs.map(lambda example, label: (example, label))
    batches = balanced_batches(pseudo, num_classes, examples_per_class, policy=policy,
                               seed=seed).map(lambda example, _: example)
    total = int(predicted.shape[0])
    evaluated = int(batches.cardinality()) * examples_per_class * num_classes
    metrics = _evaluate_with_batch_statistics(model, batches)
    metrics["coverage"] = evaluated / total
    return metrics
