"""WeightStandardizedConv2D and CenteredConv2D against a NumPy convolution and keras Conv2D.

TensorFlow runs channels-first convolutions on CPU only under XLA, so the channels-first
configurations are checked (outputs and kernel gradients) with `jit_compile=True` only.
"""

import harness
import keras
import numpy as np
import pytest
import tensorflow as tf
from references import weight_standardization as ref

from keras_norm.layers.weight_standardization import CenteredConv2D, WeightStandardizedConv2D

# name -> (layer class, layer kwargs, input shape)
CONFIGS = {
    "ws": (WeightStandardizedConv2D, dict(filters=4, kernel_size=3), (2, 7, 7, 3)),
    "ws_same_strided": (WeightStandardizedConv2D,
                        dict(filters=4, kernel_size=3, strides=2, padding="same", epsilon=1e-3),
                        (2, 7, 8, 3)),
    "ws_dilated": (WeightStandardizedConv2D,
                   dict(filters=3, kernel_size=(3, 2), dilation_rate=2, use_bias=False),
                   (2, 8, 7, 3)),
    "ws_groups": (WeightStandardizedConv2D, dict(filters=6, kernel_size=3, groups=2),
                  (2, 6, 6, 4)),
    "ws_channels_first": (WeightStandardizedConv2D,
                          dict(filters=4, kernel_size=3, padding="same",
                               data_format="channels_first"), (2, 3, 6, 5)),
    "centered": (CenteredConv2D, dict(filters=4, kernel_size=3), (2, 7, 7, 3)),
    "centered_groups": (CenteredConv2D,
                        dict(filters=6, kernel_size=3, groups=3, padding="same", strides=2,
                             use_bias=False), (2, 6, 7, 6)),
    "centered_channels_first": (CenteredConv2D,
                                dict(filters=4, kernel_size=2, groups=2,
                                     data_format="channels_first"), (2, 4, 5, 5)),
}
REFERENCE_KEYS = ("epsilon", "strides", "padding", "dilation_rate", "groups", "data_format")
CHANNELS_LAST = [name for name in CONFIGS if not name.endswith("channels_first")]
CHANNELS_FIRST = [name for name in CONFIGS if name.endswith("channels_first")]


def make_reference(name, weights):
    cls, kwargs, _ = CONFIGS[name]
    ref_kwargs = {k: v for k, v in kwargs.items() if k in REFERENCE_KEYS}
    transform = "standardize" if cls is WeightStandardizedConv2D else "center"
    return ref.TransformedConvReference(weights, transform, **ref_kwargs)


def make_case(name):
    cls, kwargs, shape = CONFIGS[name]
    return harness.LayerCase(
        factory=lambda: cls(**kwargs), input_shape=shape,
        reference=lambda weights: make_reference(name, weights), batch_dependent=False,
    )


test_matches_numpy_reference = harness.layer_test(harness.check_reference, make_case, CHANNELS_LAST)


test_jit_equals_eager = harness.layer_test(harness.check_jit, make_case, ["ws", "centered_groups"])


test_serialization_round_trips = harness.layer_test(
    harness.check_serialization, make_case, ["ws_groups", "centered"])


test_mixed_precision = harness.layer_test(
    harness.check_mixed_precision, make_case, ["ws", "ws_groups", "centered"])


def _output_and_gradients(layer, x, dy, jit):
    def step(x, dy):
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(y * dy)
        return y, tape.gradient(loss, layer.trainable_variables)

    fn = tf.function(step, jit_compile=True) if jit else step
    y, grads = fn(tf.constant(x), tf.constant(dy))
    return y.numpy(), [g.numpy() for g in grads]


def _check_against_reference(name, jit):
    case = make_case(name)
    layer = harness.build_randomized(case)
    reference = make_reference(name, harness.weights_by_name(layer))
    x = case.inputs(0)
    dy = np.random.default_rng(1).normal(size=layer.compute_output_shape(x.shape))
    y, grads = _output_and_gradients(layer, x, dy.astype("float32"), jit)
    np.testing.assert_allclose(y, reference.train(x), rtol=1e-4, atol=1e-4)
    expected_kernel_grad = reference.kernel_gradient(x, dy)
    scale = np.abs(expected_kernel_grad).max()
    np.testing.assert_allclose(grads[0], expected_kernel_grad, rtol=1e-4, atol=1e-5 * scale,
                               err_msg="gradient of the raw kernel")
    if layer.use_bias:
        np.testing.assert_allclose(grads[1], reference.bias_gradient(dy), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CHANNELS_LAST)
def test_raw_kernel_gradient_matches_numpy(name):
    _check_against_reference(name, jit=False)


@pytest.mark.parametrize("name", ["ws_same_strided", "ws_dilated", "ws_groups",
                                  "centered_groups"])
def test_raw_kernel_gradient_under_xla_matches_numpy(name):
    _check_against_reference(name, jit=True)


@pytest.mark.parametrize("name", CHANNELS_FIRST)
def test_channels_first_under_xla_matches_numpy(name):
    _check_against_reference(name, jit=True)


def test_channels_first_bias_is_added_per_channel():
    """Output width == filters: Keras's Conv2D.call would add the bias along the width."""
    layer = CenteredConv2D(4, 2, data_format="channels_first")
    x = np.random.default_rng(6).normal(size=(2, 3, 5, 5)).astype("float32")
    layer.build(x.shape)
    bias = np.array([1.0, -2.0, 3.0, 10.0], "float32")
    run = tf.function(lambda t: layer(t), jit_compile=True)
    without = run(tf.constant(x)).numpy()
    layer.bias.assign(bias)
    with_bias = run(tf.constant(x)).numpy()
    assert with_bias.shape == (2, 4, 4, 4)
    np.testing.assert_allclose(with_bias - without, np.broadcast_to(bias[:, None, None],
                                                                    with_bias.shape[1:])[None]
                               .repeat(2, 0), atol=1e-5)


@pytest.mark.parametrize("cls, transform", [
    (WeightStandardizedConv2D, lambda w: ref.standardize(w, 1e-5)),
    (CenteredConv2D, ref.center),
])
def test_equals_plain_conv2d_with_transformed_kernel(cls, transform):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 6, 4)).astype("float32")
    ours = cls(6, 3, padding="same", groups=2)
    ours.build(x.shape)
    ours.set_weights([rng.normal(0.5, 0.3, ours.kernel.shape).astype("float32"),
                      rng.normal(size=6).astype("float32")])
    plain = keras.layers.Conv2D(6, 3, padding="same", groups=2)
    plain.build(x.shape)
    kernel, bias = ours.get_weights()
    plain.set_weights([transform(kernel.astype(np.float64)).astype("float32"), bias])
    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [WeightStandardizedConv2D, CenteredConv2D])
def test_stored_weight_is_the_raw_kernel(cls, tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.normal(2.0, 0.5, (3, 3, 2, 4)).astype("float32")
    layer = cls(4, 3)
    model = keras.Sequential([keras.Input((5, 5, 2)), layer])
    layer.kernel.assign(raw)
    np.testing.assert_array_equal(layer.get_weights()[0], raw)
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    twin_layer = cls(4, 3)
    twin = keras.Sequential([keras.Input((5, 5, 2)), twin_layer])
    twin.load_weights(path)
    np.testing.assert_array_equal(twin_layer.kernel.numpy(), raw)
    x = rng.normal(size=(2, 5, 5, 2)).astype("float32")
    np.testing.assert_array_equal(twin(x), model(x))


@pytest.mark.parametrize("cls", [WeightStandardizedConv2D, CenteredConv2D])
def test_mixed_precision_transforms_the_float32_kernel(cls):
    """A kernel 100 + N(0, 0.01): rounded to float16 first, its deviations would vanish."""
    rng = np.random.default_rng(4)
    kernel = (100.0 + rng.normal(0, 1e-2, (3, 3, 2, 4))).astype("float32")
    x = rng.normal(size=(2, 5, 5, 2)).astype("float16").astype("float32")
    expected = cls(4, 3, use_bias=False)
    expected.build(x.shape)
    expected.set_weights([kernel])
    keras.mixed_precision.set_global_policy("mixed_float16")
    layer = cls(4, 3, use_bias=False)
    layer.build(x.shape)
    layer.set_weights([kernel])
    y = layer(tf.constant(x, tf.float16))
    assert y.dtype == tf.float16 and layer.kernel.dtype == "float32"
    target = expected(x).numpy()
    np.testing.assert_allclose(tf.cast(y, tf.float32), target, rtol=2e-2,
                               atol=2e-2 * np.abs(target).max())


def test_epsilon_is_keyword_only_and_conv2d_order_is_kept():
    layer = WeightStandardizedConv2D(4, 3, 2, "same")
    assert layer.strides == (2, 2) and layer.padding == "same" and layer.epsilon == 1e-5
    config = WeightStandardizedConv2D(4, 3, epsilon=1e-3).get_config()
    assert config["epsilon"] == 1e-3
    assert set(config) == set(keras.layers.Conv2D(4, 3).get_config()) | {"epsilon"}
    assert set(CenteredConv2D(4, 3).get_config()) == set(keras.layers.Conv2D(4, 3).get_config())


def test_trains_the_raw_kernel():
    """One SGD step moves the stored kernel by -lr * dL/dW (the gradient through the transform)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 5, 5, 2)).astype("float32")
    dy = rng.normal(size=(2, 3, 3, 4))
    layer = WeightStandardizedConv2D(4, 3, use_bias=False)
    layer.build(x.shape)
    before = layer.kernel.numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x) * dy)
    grads = tape.gradient(loss, layer.trainable_variables)
    keras.optimizers.SGD(0.1).apply(grads, layer.trainable_variables)
    reference = ref.TransformedConvReference({"kernel": before}, "standardize")
    expected = before - 0.1 * reference.kernel_gradient(x, dy)
    np.testing.assert_allclose(layer.kernel.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"epsilon": 0.0}, ValueError,
     r"WeightStandardizedConv2D: argument `epsilon` must be in \(0.0, inf\]. "
     r"Received: epsilon=0.0"),
    ({"epsilon": -1.0}, ValueError, r"Received: epsilon=-1.0"),
    ({"epsilon": True}, TypeError,
     r"WeightStandardizedConv2D: argument `epsilon` must be a number. Received: epsilon=True"),
    ({"epsilon": "1e-5"}, TypeError, r"Received: epsilon='1e-5'"),
])
def test_argument_errors(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        WeightStandardizedConv2D(4, 3, **kwargs)
