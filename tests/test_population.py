"""batch_statistics() and recompute_statistics() against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_norm
from keras_norm.population import batch_dependent_layers, batch_statistics, recompute_statistics


def _model(norm_cls=keras_norm.BatchNormalization, **kwargs):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4, 4, 2)),
        keras.layers.Conv2D(3, 3, padding="same"),
        norm_cls(momentum=0.9, **kwargs),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
        keras.layers.BatchNormalization(momentum=0.9),
    ])


def _snapshot(model):
    return [np.array(w.numpy()) for w in model.weights]


def _data(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return rng.normal(1, 2, (n, 4, 4, 2)).astype("float32"), rng.integers(0, 2, n)


def _train_a_little(model, x, y):
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)


def _batch_normalize(h, gamma, beta, eps):
    axes = tuple(range(h.ndim - 1))
    return gamma * (h - h.mean(axes)) / np.sqrt(h.var(axes) + eps) + beta


def test_batch_statistics_switches_every_layer_and_restores_bit_for_bit():
    x, y = _data()
    model = _model()
    _train_a_little(model, x, y)
    before = _snapshot(model)
    population = model.predict(x, batch_size=8, verbose=0)
    model.evaluate(x, y, batch_size=8, verbose=0)  # Keras caches its population-stats step

    with batch_statistics(model) as layers:
        assert len(layers) == 2
        inside = model.predict(x, batch_size=8, verbose=0)
        metrics = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
        direct = model(x[:8], training=False)

    conv, ours, _, _, dense, theirs = model.layers
    h = conv(x[:8]).numpy()
    h = np.maximum(_batch_normalize(h, ours.gamma.numpy(), ours.beta.numpy(), 1e-3), 0)
    h = dense(h.reshape(8, -1)).numpy()
    expected = _batch_normalize(h, theirs.gamma.numpy(), theirs.beta.numpy(), 1e-3)
    np.testing.assert_allclose(inside[:8], expected, atol=1e-4)
    np.testing.assert_allclose(direct, expected, atol=1e-4)
    assert not np.allclose(inside, population, atol=1e-2)
    # `evaluate` scores the batch-statistics logits too (same batches of 8), not the cached
    # population-statistics step.
    log_softmax = inside - np.log(np.exp(inside).sum(axis=1, keepdims=True))
    assert metrics["loss"] == pytest.approx(-log_softmax[np.arange(len(y)), y].mean(), rel=1e-4)
    assert metrics["accuracy"] == pytest.approx(np.mean(inside.argmax(axis=1) == y))

    for a, b in zip(before, _snapshot(model)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.predict(x, batch_size=8, verbose=0), population)
    assert ours.inference_statistics == "moving"
    assert "call" not in theirs.__dict__


def test_batch_statistics_restores_after_an_exception():
    model = _model()
    model(np.zeros((2, 4, 4, 2), "float32"))
    with pytest.raises(RuntimeError, match="boom"):
        with batch_statistics(model):
            raise RuntimeError("boom")
    assert model.layers[1].inference_statistics == "moving"
    assert "call" not in model.layers[-1].__dict__


def test_batch_dependent_layers_finds_nested_models():
    inner = _model()
    outer = keras.Sequential([keras.Input((4, 4, 2)), inner, keras.layers.Dense(1)])
    assert len(batch_dependent_layers(outer)) == 2


@pytest.mark.parametrize("norm_cls", [keras_norm.BatchNormalization,
                                      keras.layers.BatchNormalization])
@pytest.mark.parametrize("unbiased", [False, True])
def test_recompute_equals_numpy_average_of_batch_statistics(norm_cls, unbiased):
    x, y = _data(1, n=24)
    model = _model(norm_cls)
    _train_a_little(model, x, y)
    weights_before = [w.numpy().copy() for w in model.trainable_weights]
    conv, norm = model.layers[0], model.layers[1]
    h = conv(x).numpy()
    batches = np.split(h, 3)
    m = 8 * 4 * 4
    expected_mean = np.mean([b.mean((0, 1, 2)) for b in batches], 0)
    expected_var = np.mean([b.var((0, 1, 2)) for b in batches], 0)
    if unbiased:
        expected_var *= m / (m - 1)

    used = recompute_statistics(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
                                unbiased=unbiased, verbose=0)
    assert used == 3
    np.testing.assert_allclose(norm.moving_mean.numpy(), expected_mean, atol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), expected_var, rtol=1e-5)
    for before, after in zip(weights_before, model.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert norm.momentum == 0.9 and isinstance(norm.momentum, float)
    assert "call" not in norm.__dict__


@pytest.mark.parametrize("shape, batch_size, match", [
    ((4, 4, 2), 10, r"m from 64 to 160 values per statistic.*drop_remainder=True"),  # 10+10+4
    ((2,), 1, r"needs more than one value.*m=1\."),
])
def test_unbiased_needs_one_batch_size_and_leaves_statistics_untouched_otherwise(shape,
                                                                                 batch_size,
                                                                                 match):
    """A smaller last batch would make m / (m - 1) over-correct the other batches' variances:
    an error, raised after the pass, that restores every statistic."""
    x = np.random.default_rng(4).normal(1, 2, (24,) + shape).astype("float32")
    model = keras.Sequential([keras.Input(shape), keras_norm.BatchNormalization(momentum=0.9)])
    model(x[:2])
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        recompute_statistics(model, tf.data.Dataset.from_tensor_slices(x).batch(batch_size),
                             unbiased=True, verbose=0)
    after = _snapshot(model)
    assert len(after) == len(before) > 0
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)
    # The same data in batches of one size (and more than one value) is corrected.
    data = tf.data.Dataset.from_tensor_slices(x).batch(12)
    assert recompute_statistics(model, data, unbiased=True, verbose=0) == 2
    assert not np.array_equal(before[-1], _snapshot(model)[-1])


def test_recompute_with_steps_and_frozen_layers():
    x, _ = _data(2, n=24)
    model = _model()
    model.trainable = False
    model(x[:2])
    h = model.layers[0](x[:16]).numpy()
    recompute_statistics(model, tf.data.Dataset.from_tensor_slices(x).batch(8), steps=2,
                         verbose=0)
    np.testing.assert_allclose(model.layers[1].moving_mean.numpy(), h.mean((0, 1, 2)),
                               atol=1e-5)
    assert model.layers[1].trainable is False


def test_recompute_under_mirrored_strategy_uses_global_batches(mirrored_strategy):
    x, _ = _data(3, n=16)
    with mirrored_strategy.scope():
        model = _model(synchronized=True)
        model(x[:2])
    h = model.layers[0](x).numpy()
    batches = np.split(h, 2)
    recompute_statistics(model, tf.data.Dataset.from_tensor_slices(x).batch(8), verbose=0)
    np.testing.assert_allclose(model.layers[1].moving_variance.numpy(),
                               np.mean([b.var((0, 1, 2)) for b in batches], 0), rtol=1e-4)


def test_recomputed_statistics_beat_a_stale_moving_average():
    """Large momentum: after a short training run the EMA still remembers the initial
    statistics; the recomputed ones give a lower loss on the training data."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (256, 4, 4, 2)).astype("float32")
    y = (x[:, :, :, 0].mean((1, 2)) > 0).astype("int64")
    x = x * 5 + 3  # far from the initial moving statistics (0, 1)
    model = _model()
    model.layers[1].momentum = 0.999
    model.layers[-1].momentum = 0.999
    _train_a_little(model, x, y)
    stale = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    recompute_statistics(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(32),
                         verbose=0)
    fresh = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert fresh < 0.5 * stale, (fresh, stale)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"steps": 0}, r"`steps` must be a positive int or None. Received: steps=0"),
    ({"verbose": 5}, r"`verbose` must be 0, 1 or 2"),
])
def test_recompute_argument_errors(kwargs, fragment):
    model = _model()
    with pytest.raises(ValueError, match=fragment):
        recompute_statistics(model, [np.zeros((2, 4, 4, 2), "float32")], **kwargs)


def test_recompute_needs_a_batch_dependent_layer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"no batch-dependent normalization layer"):
        recompute_statistics(model, [np.zeros((2, 3), "float32")], verbose=0)


def test_recompute_empty_dataset_is_an_error():
    model = _model()
    model(np.zeros((2, 4, 4, 2), "float32"))
    with pytest.raises(ValueError, match=r"yielded no batch"):
        recompute_statistics(model, [], verbose=0)


def test_recompute_moving_average_bn_restores_its_training_state():
    x = np.random.default_rng(5).normal(1, 2, (64, 4, 4, 2)).astype("float32")
    model = keras.Sequential([keras.Input((4, 4, 2)),
                              keras_norm.MovingAverageBatchNormalization(buffer_size=2)])
    layer = model.layers[0]
    model(x[:8], training=True)  # some training history in the buffers
    state = {v.path: v.numpy().copy() for v in layer.non_trainable_variables
             if not v.path.endswith("moving_second_moment")}
    recompute_statistics(model, tf.data.Dataset.from_tensor_slices(x).batch(4), verbose=0)
    # 16 batches, a 2-batch buffer: the average of the buffered means of E[x^2] is the data's
    # E[x^2] up to the first batch, which still averages with one training-time value.
    chi = (x ** 2).reshape(16, -1, 2).mean(1)
    chi_training = (x[:8] ** 2).reshape(-1, 2).mean(0)
    sma = np.concatenate([[(chi[0] + chi_training) / 2], (chi[1:] + chi[:-1]) / 2])
    np.testing.assert_allclose(layer.moving_second_moment.numpy(), sma.mean(0), rtol=1e-4)
    for variable in layer.non_trainable_variables:
        if variable.path in state:
            np.testing.assert_array_equal(variable.numpy(), state[variable.path],
                                          err_msg=variable.path)


@pytest.mark.parametrize("unbiased", [False, True])
def test_recompute_evonorm_b0_averages_its_batch_variance(unbiased):
    x = np.random.default_rng(6).normal(2, 3, (24, 4, 4, 3)).astype("float32")
    model = keras.Sequential([keras.Input((4, 4, 3)), keras_norm.EvoNormB0(momentum=0.9)])
    model(x[:8], training=True)
    recompute_statistics(model, tf.data.Dataset.from_tensor_slices(x).batch(8),
                         unbiased=unbiased, verbose=0)
    expected = np.mean([b.var((0, 1, 2)) for b in np.split(x, 3)], 0)
    if unbiased:
        expected *= 128 / 127
    np.testing.assert_allclose(model.layers[0].moving_variance.numpy(), expected, rtol=1e-5)
