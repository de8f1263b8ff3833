"""FilterResponseNormalization, EvoNormB0 and EvoNormS0 against NumPy and under tf.distribute."""

import harness
import keras
import numpy as np
import pytest
import tensorflow as tf
from references.frn_evonorm import (EvoNormB0Reference, EvoNormS0Reference,
                                    FilterResponseNormReference)

from keras_norm.layers.evonorm import EvoNormB0, EvoNormS0
from keras_norm.layers.frn import FilterResponseNormalization

# name -> (layer class, layer kwargs, input shape, reference class).
CONFIGS = {
    "frn": (FilterResponseNormalization, {}, (4, 5, 5, 3), FilterResponseNormReference),
    "frn_channels_first": (FilterResponseNormalization, dict(axis=1), (4, 3, 5, 5),
                           FilterResponseNormReference),
    "frn_learned_epsilon": (FilterResponseNormalization, dict(learned_epsilon=True, epsilon=1e-4),
                            (4, 5, 5, 3), FilterResponseNormReference),
    "frn_plain": (FilterResponseNormalization, dict(use_tlu=False, center=False),
                  (4, 6, 3), FilterResponseNormReference),
    "frn_dense": (FilterResponseNormalization, dict(learned_epsilon=True), (6, 5),
                  FilterResponseNormReference),
    "b0": (EvoNormB0, dict(momentum=0.5), (6, 4, 4, 3), EvoNormB0Reference),
    "b0_channels_first": (EvoNormB0, dict(axis=1, momentum=0.5, epsilon=1e-3), (6, 3, 4, 4),
                          EvoNormB0Reference),
    "b0_batch_inference": (EvoNormB0, dict(momentum=0.5, inference_statistics="batch"),
                           (6, 4, 4, 3), EvoNormB0Reference),
    "b0_no_affine": (EvoNormB0, dict(momentum=0.5, center=False, scale=False), (6, 5, 3),
                     EvoNormB0Reference),
    "b0_dense": (EvoNormB0, dict(momentum=0.5), (8, 5), EvoNormB0Reference),
    "b0_synchronized": (EvoNormB0, dict(momentum=0.5, synchronized=True), (8, 4, 4, 3),
                        EvoNormB0Reference),
    "s0": (EvoNormS0, dict(groups=3), (4, 4, 4, 6), EvoNormS0Reference),
    "s0_channels_first": (EvoNormS0, dict(groups=2, axis=1), (4, 6, 4, 4), EvoNormS0Reference),
    "s0_instance": (EvoNormS0, dict(groups=6, center=False), (4, 4, 4, 6), EvoNormS0Reference),
    "s0_layer": (EvoNormS0, dict(groups=1, epsilon=1e-3), (4, 5, 6), EvoNormS0Reference),
}
REFERENCE_KEYS = ("axis", "epsilon", "learned_epsilon", "use_tlu", "momentum",
                  "inference_statistics", "groups")
FRN = [name for name in CONFIGS if name.startswith("frn")]
B0 = [name for name in CONFIGS if name.startswith("b0")]
S0 = [name for name in CONFIGS if name.startswith("s0")]


def make_case(name, **overrides):
    cls, kwargs, shape, reference = CONFIGS[name]
    kwargs = {**kwargs, **overrides}
    # Each layer's default epsilon, unless the configuration sets one.
    ref_kwargs = {"epsilon": cls().epsilon}
    ref_kwargs.update({k: v for k, v in kwargs.items() if k in REFERENCE_KEYS})
    return harness.LayerCase(
        factory=lambda: cls(**kwargs),
        input_shape=shape,
        reference=lambda weights: reference(weights, **ref_kwargs),
        batch_dependent=cls is EvoNormB0,
    )


test_matches_numpy_reference = harness.layer_test(
    harness.check_reference, make_case, sorted(CONFIGS))


@pytest.mark.parametrize("name", ["frn", "frn_learned_epsilon", "s0_channels_first", "s0_layer"])
def test_reference_gradients_match_finite_differences(name):
    """The NumPy references' hand-derived input gradients (which the layers' closed-form
    backward passes are checked against) equal central differences of their own forward."""
    shape = CONFIGS[name][2]
    case = make_case(name)
    layer = harness.build_randomized(case, seed=3)
    reference = case.reference(harness.weights_by_name(layer))
    rng = np.random.default_rng(4)
    x = rng.normal(0.5, 1.5, (2,) + shape[1:])
    dy = rng.normal(size=x.shape)

    def loss(values):
        return float(np.sum(reference.train(values).astype(np.float64) * dy))

    step = 1e-3
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (loss(plus) - loss(minus)) / (2 * step)
    # The references return float32 outputs, so the differences carry ~1e-7 / 1e-3 noise.
    np.testing.assert_allclose(reference.input_gradient(x, dy), numeric, atol=2e-3, rtol=1e-3)


def _autodiff_forward(layer, x, training):
    """The layer's formula written directly in TensorFlow ops (channels moved last), for
    automatic differentiation: an independent check of the hand-written backward passes."""
    axis = layer._axis
    x = tf.experimental.numpy.moveaxis(x, axis, -1)
    spatial = list(range(1, len(x.shape) - 1))
    channels = x.shape[-1]
    gamma = layer.gamma if layer.gamma is not None else tf.ones([channels])
    beta = layer.beta if layer.beta is not None else tf.zeros([channels])
    if isinstance(layer, FilterResponseNormalization):
        nu2 = tf.reduce_mean(tf.square(x), spatial, keepdims=True)
        y = gamma * x / tf.sqrt(nu2 + layer.epsilon) + beta
        y = tf.maximum(y, layer.tau) if layer.use_tlu else y
    elif isinstance(layer, EvoNormS0):
        grouped = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [layer.groups, -1]], 0))
        _, variance = tf.nn.moments(grouped, spatial + [len(x.shape)], keepdims=True)
        std = tf.reshape(tf.broadcast_to(tf.sqrt(variance + layer.epsilon), tf.shape(grouped)),
                         tf.shape(x))
        y = x * tf.sigmoid(layer.v * x) / std * gamma + beta
    else:
        _, batch_variance = tf.nn.moments(x, [0] + spatial)
        if not training and layer.inference_statistics == "moving":
            batch_variance = layer.moving_variance
        _, instance_variance = tf.nn.moments(x, spatial, keepdims=True)
        denominator = tf.maximum(tf.sqrt(batch_variance + layer.epsilon),
                                 layer.v * x + tf.sqrt(instance_variance + layer.epsilon))
        y = x / denominator * gamma + beta
    return tf.experimental.numpy.moveaxis(y, -1, axis)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("name", ["frn", "frn_channels_first", "frn_plain", "s0",
                                  "s0_channels_first", "s0_layer", "b0", "b0_channels_first",
                                  "b0_no_affine", "b0_batch_inference"])
def test_closed_form_gradients_equal_autodiff(name, training):
    """Every gradient (input and weights) of the layer, in a graph (its XLA-compiled kernels)
    and eagerly, equals automatic differentiation of the layer's formula in plain TF ops."""
    case = make_case(name)
    layer = harness.build_randomized(case, seed=2)
    x = tf.constant(case.inputs(5))
    dy = tf.constant(np.random.default_rng(6).normal(size=x.shape).astype("float32"))
    weights = layer.trainable_variables

    def gradients(forward):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(forward(x) * dy)
        return tape.gradient(loss, [x] + weights)

    expected = gradients(lambda x: _autodiff_forward(layer, x, training))

    def layer_gradients():
        # Training updates B0's moving variance, which its training outputs do not use.
        return gradients(lambda x: layer(x, training=training))

    for actual in (layer_gradients(), tf.function(layer_gradients)()):
        for a, e, what in zip(actual, expected, ["x"] + [w.name for w in weights]):
            assert np.abs(e.numpy()).max() > 0, what
            np.testing.assert_allclose(a, e, atol=1e-4, rtol=1e-4, err_msg=what)


def test_frn_tlu_ties_pass_the_normalized_value():
    """Where the normalized value equals `tau` exactly (here zeros with the default
    `beta = tau = 0`), the gradient goes to the normalized value, as `tf.maximum`'s does."""
    layer = FilterResponseNormalization()
    x = np.random.default_rng(7).normal(size=(2, 3, 3, 4)).astype("float32")
    x[:, 1, :, :] = 0.0
    x = tf.constant(x)
    dy = tf.constant(np.random.default_rng(8).normal(size=x.shape).astype("float32"))
    layer.build(x.shape)

    def gradients(forward):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(forward(x) * dy)
        return tape.gradient(loss, [x] + layer.trainable_variables)

    expected = gradients(lambda x: _autodiff_forward(layer, x, True))
    for actual in (gradients(layer), tf.function(lambda: gradients(layer))()):
        for a, e in zip(actual, expected):
            np.testing.assert_allclose(a, e, atol=1e-5)


test_jit_equals_eager = harness.layer_test(
    harness.check_jit, make_case,
    ["frn_learned_epsilon", "frn_channels_first", "b0", "b0_channels_first", "b0_batch_inference",
     "s0_channels_first"])


test_serialization_round_trips = harness.layer_test(
    harness.check_serialization, make_case,
    ["frn_learned_epsilon", "frn_plain", "b0", "b0_batch_inference", "s0_channels_first"])


test_mixed_precision = harness.layer_test(
    harness.check_mixed_precision, make_case,
    ["frn", "frn_learned_epsilon", "b0", "b0_synchronized", "s0"])


@pytest.mark.parametrize("name", ["b0_synchronized", "b0_dense"])
def test_b0_synchronized_equals_one_device(name, mirrored_strategy):
    harness.check_distributed(make_case(name, synchronized=True), mirrored_strategy)


def test_b0_synchronized_batch_inference_equals_one_device(mirrored_strategy):
    case = make_case("b0_synchronized", inference_statistics="batch")
    harness.check_distributed(case, mirrored_strategy, training=False)


def test_b0_unsynchronized_differs_from_one_device(mirrored_strategy):
    """Guards the distributed test: per-replica batch variances must be seen to differ."""
    with pytest.raises(AssertionError):
        harness.check_distributed(make_case("b0"), mirrored_strategy)


# --------------------------------------------------------------------------- behaviours
def _random(shape, seed=0, loc=1.5, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype("float32")


def test_frn_tlu_starts_as_relu_of_normalized_input():
    x = _random((2, 3, 3, 4))
    y = FilterResponseNormalization()(x).numpy()
    nu2 = np.mean(x.astype(np.float64) ** 2, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(y, np.maximum(x / np.sqrt(nu2 + 1e-6), 0.0), atol=1e-5)
    assert np.all(y >= 0) and np.any(y == 0)


def test_frn_effective_epsilon_uses_absolute_learned_value():
    """A negative learned epsilon counts by its magnitude: the same output as its opposite."""
    x = _random((2, 2, 2, 3), scale=1e-2, loc=0.0)
    outputs = []
    for value in (-0.5, 0.5):
        layer = FilterResponseNormalization(learned_epsilon=True, use_tlu=False)
        layer.build(x.shape)
        layer.eps_learned.assign([value])
        outputs.append(layer(x).numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-7)
    nu2 = np.mean(x.astype(np.float64) ** 2, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(outputs[0], x / np.sqrt(nu2 + 0.5 + 1e-6), atol=1e-6)


@pytest.mark.parametrize("name", ["frn_learned_epsilon", "b0", "s0"])
def test_every_trainable_weight_gets_a_gradient(name):
    case = make_case(name)
    layer = harness.build_randomized(case)
    x = tf.constant(case.inputs(0))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x, training=True) - 0.3))
    grads = tape.gradient(loss, layer.trainable_variables)
    names = [harness.weight_name(v) for v in layer.trainable_variables]
    expected = {"frn_learned_epsilon": ["gamma", "beta", "tau", "learned_epsilon"],
                "b0": ["gamma", "beta", "v"], "s0": ["gamma", "beta", "v"]}[name]
    assert names == expected
    for variable_name, grad in zip(names, grads):
        assert grad is not None, variable_name
        assert np.all(np.isfinite(grad)) and np.any(grad != 0), variable_name


def test_b0_reads_momentum_at_call_time():
    """recompute_statistics swaps `momentum` for a tf.Variable; updates must follow it."""
    layer = EvoNormB0()
    x1, x2 = _random((4, 3, 3, 2), 1), _random((4, 3, 3, 2), 2, scale=5.0)
    layer.build(x1.shape)
    layer.momentum = tf.Variable(0.0)
    step = tf.function(lambda x: layer(x, training=True))
    step(tf.constant(x1))
    var1 = x1.astype(np.float64).reshape(-1, 2).var(0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var1, rtol=1e-5)
    layer.momentum.assign(0.5)
    step(tf.constant(x2))
    var2 = x2.astype(np.float64).reshape(-1, 2).var(0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5 * var1 + 0.5 * var2,
                               rtol=1e-5)


def test_b0_frozen_layer_runs_in_inference_mode():
    x = _random((4, 3, 3, 2))
    layer = EvoNormB0(momentum=0.0)
    layer.build(x.shape)
    layer.trainable = False
    y = layer(x, training=True).numpy()
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(2))
    reference = EvoNormB0Reference(harness.weights_by_name(layer))
    np.testing.assert_allclose(y, reference.infer(x), atol=1e-5)


def test_b0_declares_its_variance_statistic():
    assert EvoNormB0.batch_dependent
    assert EvoNormB0.variance_statistics == ("moving_variance",)
    assert not getattr(EvoNormS0, "batch_dependent", False)
    assert not getattr(FilterResponseNormalization, "batch_dependent", False)


def test_b0_batch_variance_exact_when_mean_dominates():
    """The batch variance is two-pass: exact in float32 even when |mean| >> std."""
    x = (1e4 + np.random.default_rng(3).normal(0, 1e-1, (8, 2, 2, 3))).astype("float32")
    layer = EvoNormB0(momentum=0.0)
    layer(x, training=True)
    expected = x.astype(np.float64).reshape(-1, 3).var(0)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected, rtol=1e-2)


@pytest.mark.parametrize("cls, kwargs", [(FilterResponseNormalization, {}),
                                         (EvoNormB0, {}), (EvoNormS0, {"groups": 2})])
def test_half_precision_dtype_policies(cls, kwargs):
    x = _random((4, 3, 3, 4))
    layer = cls(dtype="bfloat16", **kwargs)
    y = layer(tf.constant(x, tf.bfloat16), training=True)
    assert y.dtype == tf.bfloat16
    # A plain bfloat16 policy keeps parameters in bfloat16 (Keras's rule); statistics stay float32.
    if cls is EvoNormB0:
        assert layer.moving_variance.dtype == "float32"
    reference = cls(**kwargs)
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())
    rounded = tf.cast(tf.constant(x, tf.bfloat16), tf.float32)
    np.testing.assert_allclose(tf.cast(y, tf.float32), reference(rounded, training=True),
                               atol=5e-2, rtol=2e-2)


def test_norm_act_layers_train_in_a_model():
    """All three in one model: a few optimizer steps lower the loss, outputs stay finite."""
    x = _random((16, 6, 6, 2))
    labels = np.random.default_rng(0).integers(0, 2, 16)
    model = keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(8, 3), EvoNormB0(),
        keras.layers.Conv2D(8, 3), EvoNormS0(groups=4), keras.layers.Conv2D(4, 1),
        FilterResponseNormalization(learned_epsilon=True), keras.layers.Flatten(),
        keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses = []
    for _ in range(6):  # eager steps: tracing a Keras train function costs more than this
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(x, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert np.all(np.isfinite(model(x, training=False)))


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls, kwargs, error, fragment", [
    (FilterResponseNormalization, {"learned_epsilon": 1}, TypeError,
     r"`learned_epsilon` must be a bool. Received: learned_epsilon=1"),
    (FilterResponseNormalization, {"use_tlu": "yes"}, TypeError,
     r"`use_tlu` must be a bool. Received: use_tlu='yes'"),
    (FilterResponseNormalization, {"tau_initializer": "nope"}, ValueError, r"nope"),
    (EvoNormS0, {"groups": True}, TypeError,
     r"EvoNormS0: argument `groups` must be an integer. Received: groups=True"),
    (EvoNormS0, {"groups": 2.0}, TypeError, r"Received: groups=2.0"),
    (EvoNormS0, {"groups": 0}, ValueError,
     r"`groups` must be >= 1. Received: groups=0"),
])
def test_argument_errors(cls, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        cls(**kwargs)


@pytest.mark.parametrize("cls, kwargs, shape, fragment", [
    (EvoNormS0, {"groups": 4, "name": "s0x"}, (2, 3, 3, 6),
     r"'s0x': the number of channels \(6\) must be a multiple of `groups`. "
     r"Received: groups=4, input channels=6"),
    (EvoNormS0, {"groups": 8}, (2, 3, 3, 6), r"Received: groups=8, input channels=6"),
    (EvoNormB0, {"axis": -4}, (2, 3, 3, 4), r"Received: axis=-4"),
])
def test_build_errors(cls, kwargs, shape, fragment):
    with pytest.raises(ValueError, match=fragment):
        cls(**kwargs).build(shape)
