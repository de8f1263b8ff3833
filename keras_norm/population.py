"""Population statistics tools: batch-statistics inference and exact recomputation.

- `batch_statistics(model)`: a context manager inside which every batch-dependent layer
  (keras_norm's and Keras's own `BatchNormalization`) normalizes at inference with the current
  batch's statistics, without touching its moving statistics.
- `recompute_statistics(model, dataset)`: "precise BN" (fvcore `update_bn_stats`): after
  training, run data through the frozen model and set every population statistic to the
  equal-weight average over the batches instead of an exponential moving average
  (docs/algorithms.md section 1; Keras has no such tool, keras issue #10533).
"""

import contextlib

import keras
import tensorflow as tf

from keras_norm import _compat, _math


# ------------------------------------------------------------------------------ discovery
def _all_layers(model):
    """Every layer of a model, nested models and layers included, each once."""
    seen, ordered = set(), []
    for layer in _compat.flatten_layers(model):
        if id(layer) not in seen:
            seen.add(id(layer))
            ordered.append(layer)
    return ordered


def _is_keras_batch_norm(layer):
    return (isinstance(layer, keras.layers.BatchNormalization)
            and not getattr(layer, "batch_dependent", False))


def batch_dependent_layers(model):
    """The layers of `model` whose training output depends on the batch, in model order."""
    return [layer for layer in _all_layers(model)
            if getattr(layer, "batch_dependent", False) or _is_keras_batch_norm(layer)]


def _reset_compiled_functions(model):
    """Keras caches traced train/test/predict functions; they must see the new behaviour."""
    for attribute in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)


# ----------------------------------------------------------------------- batch statistics
def _keras_batch_norm_with_batch_statistics(layer):
    """A `call` for Keras's BatchNormalization that normalizes with batch statistics only."""

    def call(inputs, training=None, mask=None):
        x = tf.cast(inputs, _math.statistics_dtype(inputs.dtype))
        axis = layer.axis % len(x.shape)
        reduction_axes = [a for a in range(len(x.shape)) if a != axis]
        if mask is not None:
            mask = tf.expand_dims(tf.cast(mask, x.dtype), axis)
        moments = _math.batch_moments(x, reduction_axes, mask, layer.synchronized)
        shape = [1] * len(x.shape)
        shape[axis] = -1
        gamma = None if layer.gamma is None else tf.reshape(tf.cast(layer.gamma, x.dtype), shape)
        beta = None if layer.beta is None else tf.reshape(tf.cast(layer.beta, x.dtype), shape)
        outputs = _math.normalize(x, moments.mean, moments.variance, layer.epsilon, gamma, beta)
        return tf.cast(outputs, layer.compute_dtype)

    return call


@contextlib.contextmanager
def batch_statistics(model):
    """Normalizes every batch-dependent layer of `model` with the current batch's statistics.

    Inside the context, `model.evaluate`, `model.predict` and `model(x)` (inference mode) use
    each batch's own statistics in every keras_norm batch-dependent layer (their
    `inference_statistics` is set to `"batch"`) and in Keras's own `BatchNormalization`
    layers. Moving statistics and weights are never changed. On exit every layer is restored
    and the model behaves exactly as before. Keras's cached compiled functions are reset on
    entry and on exit so that both behaviours are traced afresh.

    Transductive: each prediction depends on the other examples of its batch, so batch size
    and composition matter (see `keras_norm.evaluation`).

    Args:
        model: A Keras model (or layer) containing normalization layers.

    Yields:
        The list of layers that were switched.

    Example:

    >>> import numpy as np, keras, keras_norm
    >>> model = keras.Sequential([keras.Input((3,)), keras_norm.BatchNormalization()])
    >>> x = np.array([[1., 2., 3.], [3., 4., 5.]], "float32")
    >>> with keras_norm.batch_statistics(model):
    ...     y = model.predict(x, verbose=0)
    >>> np.round(y[:, 0], 2).tolist()
    [-1.0, 1.0]
    """
    layers = batch_dependent_layers(model)
    previous = []
    _reset_compiled_functions(model)
    try:
        for layer in layers:
            if _is_keras_batch_norm(layer):
                # No public switch makes Keras's layer use batch statistics at inference.
                previous.append((layer, "call", _compat.override_call(
                    layer, _keras_batch_norm_with_batch_statistics(layer))))
            else:
                previous.append((layer, "inference_statistics", layer.inference_statistics))
                layer.inference_statistics = "batch"
        yield layers
    finally:
        for layer, attribute, value in reversed(previous):
            if attribute == "call":
                _compat.restore_call(layer, value)
            else:
                layer.inference_statistics = value
        _reset_compiled_functions(model)


# ------------------------------------------------------------------- recomputing statistics
def _variance_statistics(layer):
    """Names of the layer's statistics that are biased variances (for `unbiased=True`)."""
    if _is_keras_batch_norm(layer):
        return ("moving_variance",)
    return tuple(getattr(layer, "variance_statistics", ()))


def _training_state(layers):
    """Non-trainable variables that are training state rather than population statistics.

    A layer that declares `population_statistics` (names) keeps other state too, e.g. Moving
    Average BN's buffers of recent batch statistics and its step counters, or Cross-Iteration
    BN's window. The recomputation pass must not disturb that state: it is saved here and
    restored afterwards.
    """
    saved = []
    for layer in layers:
        names = getattr(layer, "population_statistics", None)
        if not names:
            continue
        for variable in layer.non_trainable_variables:
            if variable.path.split("/")[-1] not in names:
                saved.append((variable, tf.identity(variable.value)))
    return saved


def _values_per_statistic(layer, inputs):
    """How many values each channel's batch statistic averages over (m of Algorithm 2)."""
    shape = tf.shape(inputs)
    axis = getattr(layer, "axis", -1)  # a conv-wrapping norm has its channels last
    channels = shape[axis if isinstance(axis, int) else -1]
    return tf.cast(tf.reduce_prod(shape), tf.float32) / tf.cast(channels, tf.float32)


def _count_recorder(layer, counts):
    """Wraps `layer.call` to record the smallest and largest m of the layer's batches in
    `counts[layer]` (a pair of variables)."""
    original = layer.call
    low, high = counts[id(layer)]

    def call(inputs, *args, **kwargs):
        m = _values_per_statistic(layer, inputs)
        low.assign(tf.minimum(low, m))
        high.assign(tf.maximum(high, m))
        return original(inputs, *args, **kwargs)

    return call


def _split_features(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"]
    return batch


def recompute_statistics(model, dataset, steps=None, unbiased=False, verbose=1):
    """Sets population statistics to their exact average over `dataset` ("precise BN").

    The weights are frozen (no optimizer runs); the model is called in training mode so that
    every batch-dependent layer computes its batch statistics, and each layer's population
    statistics become the equal-weight average of the per-batch values (for batch norm: the
    mean of the batch means and the mean of the batch variances, Algorithm 2 of Ioffe &
    Szegedy). This is done by temporarily replacing each layer's `momentum` with
    `(i - 1) / i` at batch `i`, which turns its moving average into a cumulative one, so every
    layer averages exactly what its own moving statistics track: keras_norm's
    BatchNormalization and `keras.layers.BatchNormalization` their mean and variance (the
    moving stddev under renorm), EvoNormB0 its variance, MixtureNormalization its mixture
    parameters, MovingAverageBatchNormalization its second moment.

    Other layers that behave differently in training (e.g. Dropout) also run in training mode
    during the pass, as in fvcore's `update_bn_stats`. Training state that is not a population
    statistic (Moving Average BN's buffers, Cross-Iteration BN's window, step counters) is
    restored after the pass, so training can continue exactly as before.

    Args:
        model: A built Keras model.
        dataset: A batched `tf.data.Dataset` (or any iterable) of `(x, y)` tuples or of `x`.
            Batches should be the size used in training.
        steps: Number of batches to use; `None` uses the whole (finite) dataset.
        unbiased: If `True`, multiply variance statistics by `m / (m - 1)` with `m` the number
            of values each batch statistic averages over (Algorithm 2's unbiased estimate).
            Every batch must then give the same `m` (batch with `drop_remainder=True`):
            otherwise a `ValueError` names the sizes and the statistics are left as they were.
            Defaults to `False` (the biased batch variance, as Keras's moving variance).
        verbose: 1 shows a Keras progress bar, 0 is silent. Defaults to 1.

    Returns:
        The number of batches used.

    Example:

    >>> import numpy as np, tensorflow as tf, keras, keras_norm
    >>> model = keras.Sequential([keras.Input((2,)), keras_norm.BatchNormalization()])
    >>> x = np.array([[0., 1.], [2., 3.], [4., 5.], [6., 7.]], "float32")
    >>> keras_norm.recompute_statistics(model, tf.data.Dataset.from_tensor_slices(x).batch(2),
    ...                                 verbose=0)
    2
    >>> model.layers[0].moving_mean.numpy().tolist()
    [3.0, 4.0]
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"recompute_statistics: `steps` must be a positive int or None. "
                         f"Received: steps={steps!r}")
    if verbose not in (0, 1, 2):
        raise ValueError(f"recompute_statistics: `verbose` must be 0, 1 or 2. "
                         f"Received: verbose={verbose!r}")
    layers = batch_dependent_layers(model)
    if not layers:
        raise ValueError(f"recompute_statistics: model {model.name!r} has no batch-dependent "
                         "normalization layer whose statistics could be recomputed.")
    strategy = tf.distribute.get_strategy()
    if hasattr(model, "distribute_strategy") and model.distribute_strategy is not None:
        strategy = model.distribute_strategy
    first = tf.VariableAggregation.ONLY_FIRST_REPLICA
    with strategy.scope():
        momentum = tf.Variable(0.0, trainable=False, name="recompute_momentum",
                               aggregation=first)
        counts = {id(layer): (tf.Variable(float("inf"), trainable=False, aggregation=first),
                              tf.Variable(0.0, trainable=False, aggregation=first))
                  for layer in layers}
    saved = [(layer, layer.momentum, layer.trainable) for layer in layers]
    calls = []
    training_state = _training_state(layers)
    # Restored if the pass fails (an error, Ctrl-C): no half-averaged statistics are left.
    before = [(variable, tf.identity(variable.value))
              for layer in layers for variable in layer.non_trainable_variables]
    try:
        for layer in layers:
            layer.momentum = momentum
            layer.trainable = True  # frozen layers would run in inference mode
            # Keras has no public pre-call hook to see each layer's input.
            calls.append((layer, _compat.override_call(layer, _count_recorder(layer, counts))))

        @tf.function
        def replica_step(x):
            model(x, training=True)

        def step(batch):
            strategy.run(replica_step, args=(_split_features(batch),))

        if isinstance(dataset, tf.data.Dataset) and strategy.num_replicas_in_sync > 1:
            dataset = strategy.experimental_distribute_dataset(dataset)
        progbar = keras.utils.Progbar(steps, verbose=verbose, unit_name="batch")
        used = 0
        for batch in dataset:
            if steps is not None and used >= steps:
                break
            momentum.assign(used / (used + 1.0))
            step(batch)
            used += 1
            progbar.update(used)
        if used == 0:
            raise ValueError("recompute_statistics: `dataset` yielded no batch.")
        if unbiased:
            _apply_bessel_correction(layers, counts)
    except BaseException:
        for variable, value in before:
            variable.assign(value)
        raise
    finally:
        for variable, value in training_state:
            variable.assign(value)
        for layer, layer_momentum, trainable in saved:
            layer.momentum = layer_momentum
            layer.trainable = trainable
        for layer, previous in calls:
            _compat.restore_call(layer, previous)
        _reset_compiled_functions(model)
    return used


def _bessel_factors(layers, counts):
    """`m / (m - 1)` per layer, after checking that every batch gave the layer one m > 1.

    The average of the batch variances times one factor is Algorithm 2's unbiased estimate
    only when every batch has the same m; with a smaller last batch it would over-correct the
    others, so that is an error rather than a silent approximation.
    """
    factors = []
    for layer in layers:
        low, high = (float(variable.numpy()) for variable in counts[id(layer)])
        if low != high:
            raise ValueError(
                f"recompute_statistics: unbiased=True scales by m / (m - 1), which needs batches "
                f"of one size; layer {layer.name!r} saw m from {low:g} to {high:g} values per "
                "statistic. Batch the dataset with drop_remainder=True (or pass `steps`).")
        if high <= 1:
            raise ValueError(f"recompute_statistics: unbiased=True needs more than one value "
                             f"per channel in each batch; layer {layer.name!r} saw m={high:g}.")
        factors.append(high / (high - 1.0))
    return factors


def _apply_bessel_correction(layers, counts):
    for layer, factor in zip(layers, _bessel_factors(layers, counts)):
        by_name = {variable.path.split("/")[-1]: variable for variable in layer.weights}
        for name in _variance_statistics(layer):
            by_name[name].assign(by_name[name] * factor)
