"""CrossIterationBatchNormalization against NumPy, BatchNormalization, and under tf.distribute."""

import os
import pathlib

import harness
import keras
import numpy as np
import pytest
import tensorflow as tf
from references.cross_iteration import CrossIterationReference

from keras_norm.layers.batch_norm import BatchNormalization
from keras_norm.layers.cross_iteration import CrossIterationBatchNormalization

CIFAR_SMALL = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-small.npz"

# name -> (inner layer factory, reference geometry (None: Dense), activation, CBN kwargs,
# input shape). Momentum 0.5 makes every update visible in a few steps.
CONFIGS = {
    "conv": (lambda: keras.layers.Conv2D(4, 3, use_bias=False), {}, "linear",
             dict(window_size=3, momentum=0.5), (4, 6, 6, 3)),
    "conv_same_stride_bias_relu": (
        lambda: keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
        dict(strides=(2, 2), padding="same"), "relu", dict(window_size=4, momentum=0.5),
        (4, 7, 7, 3)),
    "conv1d_causal_dilated": (
        lambda: keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2),
        dict(padding="causal", dilation_rate=(2,)), "linear", dict(window_size=3, momentum=0.5),
        (4, 9, 2)),
    "dense": (lambda: keras.layers.Dense(5), None, "linear",
              dict(window_size=3, momentum=0.5, epsilon=1e-5), (8, 6)),
    "dense_sequence": (lambda: keras.layers.Dense(4, use_bias=False), None, "linear",
                       dict(window_size=4, momentum=0.5), (4, 3, 6)),
    "burn_in": (lambda: keras.layers.Conv2D(4, 3), {}, "linear",
                dict(window_size=3, burn_in_steps=2, momentum=0.5), (4, 6, 6, 3)),
    "window_one": (lambda: keras.layers.Conv2D(4, 3), {}, "linear",
                   dict(window_size=1, momentum=0.5), (4, 6, 6, 3)),
    "no_affine": (lambda: keras.layers.Conv2D(4, 3, use_bias=False), {}, "linear",
                  dict(window_size=3, momentum=0.5, center=False, scale=False), (4, 6, 6, 3)),
    "batch_inference": (lambda: keras.layers.Conv2D(4, 3), {}, "linear",
                        dict(window_size=3, momentum=0.5, inference_statistics="batch"),
                        (4, 6, 6, 3)),
    "synchronized": (lambda: keras.layers.Conv2D(4, 3, use_bias=False), {}, "linear",
                     dict(window_size=3, momentum=0.5, synchronized=True), (4, 6, 6, 3)),
    "synchronized_dense": (lambda: keras.layers.Dense(5), None, "linear",
                           dict(window_size=3, momentum=0.5, synchronized=True), (8, 6)),
}
REFERENCE_KEYS = ("window_size", "burn_in_steps", "momentum", "epsilon", "inference_statistics")


def make_layer(name, **overrides):
    inner, _, _, kwargs, _ = CONFIGS[name]
    return CrossIterationBatchNormalization(inner(), **{**kwargs, **overrides})


def make_reference(name, weights):
    _, conv, activation, kwargs, _ = CONFIGS[name]
    ref_kwargs = {k: v for k, v in kwargs.items() if k in REFERENCE_KEYS}
    return CrossIterationReference(weights, conv=conv, activation=activation, **ref_kwargs)


def make_case(name, steps=4):
    return harness.LayerCase(
        factory=lambda: make_layer(name),
        input_shape=CONFIGS[name][4],
        reference=lambda weights: make_reference(name, weights),
        steps=steps,
        output_shape_fn=lambda shape: make_layer(name).compute_output_shape(shape),
    )


def _output_shape(layer, shape):
    return tuple(layer.compute_output_shape(shape))


# ---------------------------------------------------------------------- shared harness
# Configurations with a kernel that moves between steps are in the compensation test below.
test_matches_numpy_reference = harness.layer_test(
    harness.check_reference, make_case,
    ["conv", "dense_sequence", "burn_in", "window_one", "no_affine", "batch_inference",
     "synchronized_dense"])


test_jit_equals_eager = harness.layer_test(
    harness.check_jit, make_case, ["conv_same_stride_bias_relu", "dense_sequence", "burn_in"])


test_serialization_round_trips = harness.layer_test(
    harness.check_serialization, make_case, ["conv_same_stride_bias_relu", "dense", "window_one"])


test_mixed_precision = harness.layer_test(
    harness.check_mixed_precision, make_case, ["conv_same_stride_bias_relu", "dense_sequence"])


def test_synchronized_equals_one_device(mirrored_strategy):
    # Dense shares this code path (its one-device behaviour is in the reference tests).
    harness.check_distributed(make_case("synchronized"), mirrored_strategy)


def test_synchronized_batch_statistics_inference(mirrored_strategy):
    case = make_case("synchronized")
    case.factory = lambda: make_layer("synchronized", inference_statistics="batch")
    harness.check_distributed(case, mirrored_strategy, training=False)


def test_fit_under_mirrored_strategy_matches_one_device(mirrored_strategy):
    """Weights move between steps, so this also checks the compensation across replicas."""
    rng = np.random.default_rng(14)
    x = rng.normal(1, 2, (16, 5, 5, 2)).astype("float32")
    y = rng.integers(0, 3, 16)

    def make():
        return harness.small_classifier(
            (5, 5, 2),
            CrossIterationBatchNormalization(keras.layers.Conv2D(4, 3, activation="relu"),
                                             window_size=3, momentum=0.5, synchronized=True))

    _, multi = harness.check_fit_matches_one_device(make, mirrored_strategy, x, y, batch_size=8,
                                                    epochs=2)
    assert int(multi.layers[0].step.numpy()) == 4


def test_unsynchronized_replicas_differ_from_one_device(mirrored_strategy):
    """Guards the distributed check itself: without synchronization it must see a difference."""
    case = make_case("synchronized")
    case.factory = lambda: make_layer("synchronized", synchronized=False)
    with pytest.raises(AssertionError):
        harness.check_distributed(case, mirrored_strategy)


# ------------------------------------------------------- compensation with a changing kernel
def _train_with_changing_kernel(name, kernel_noise, steps=5, seed=0, check_gradients=True):
    """Trains layer and reference while the kernel moves between steps; compares everything.

    Returns the reference (its `dropped` count tells whether the negative-variance rule ran).
    """
    layer = make_layer(name)
    shape = CONFIGS[name][4]
    case = harness.LayerCase(factory=None, input_shape=shape, atol=2e-4, rtol=2e-4)
    harness.build_randomized(case, seed, layer)
    reference = make_reference(name, harness.weights_by_name(layer))
    rng = np.random.default_rng(seed)
    for step in range(steps):
        x = rng.normal(1.5, 2.0, shape).astype("float32")
        dy = rng.normal(size=_output_shape(layer, shape)).astype("float32")
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
            loss = tf.reduce_sum(y * dy)
        dx, dkernel = tape.gradient(loss, [xt, layer.layer.kernel])
        if check_gradients:
            harness.assert_close(dx, reference.input_gradient(x, dy), case,
                                 f"input gradient, step {step}")
            harness.assert_close(dkernel, reference.kernel_gradient(x, dy), case,
                                 f"kernel gradient, step {step}")
        harness.assert_close(y, reference.train(x), case, f"training output, step {step}")
        harness.assert_state_equal(layer, reference.state(), case, f"state after step {step}")
        kernel = layer.layer.kernel.numpy()
        kernel = kernel + rng.normal(0.0, kernel_noise, kernel.shape).astype("float32")
        layer.layer.kernel.assign(kernel)
        reference.set_kernel(kernel)
    x = rng.normal(1.5, 2.0, shape).astype("float32")
    harness.assert_close(layer(x, training=False), reference.infer(x), case, "inference output")
    return reference


@pytest.mark.parametrize("name", ["conv_same_stride_bias_relu", "conv1d_causal_dilated", "dense",
                                  "burn_in", "synchronized"])
def test_compensation_with_changing_kernel_matches_reference(name):
    _train_with_changing_kernel(name, kernel_noise=0.05)


def test_compensation_changes_the_result():
    """Guards the test above: ignoring the kernel change must make a measurable difference."""
    layer = make_layer("conv")
    shape = CONFIGS["conv"][4]
    harness.build_randomized(harness.LayerCase(None, shape), 0, layer)
    rng = np.random.default_rng(1)
    layer(rng.normal(1.5, 2, shape).astype("float32"), training=True)
    layer.layer.kernel.assign(layer.layer.kernel.numpy() * 1.2)
    # A twin whose stored kernel is already the new one: it averages the stale statistics.
    naive = CrossIterationBatchNormalization.from_config(layer.get_config())
    naive.build(shape)
    naive.set_weights(layer.get_weights())
    stored = naive.window_kernel.numpy()
    stored[0] = layer.layer.kernel.numpy()
    naive.window_kernel.assign(stored)
    x = rng.normal(1.5, 2, shape).astype("float32")
    difference = layer(x, training=True).numpy() - naive(x, training=True).numpy()
    assert np.max(np.abs(difference)) > 1e-2


def test_negative_compensated_variance_is_dropped():
    """Large kernel jumps make some compensated variances negative: those are dropped."""
    reference = _train_with_changing_kernel("dense", kernel_noise=1.5, steps=6, seed=3,
                                            check_gradients=True)
    assert reference.dropped > 0, "the test did not exercise the drop"


def test_mean_compensation_is_exact_and_variance_second_order():
    """For a linear map the Taylor step is exact for the mean; the variance error is O(dW^2)."""
    rng = np.random.default_rng(4)
    x1, x2 = (rng.normal(1.0, 2.0, (6, 5)).astype("float32") for _ in range(2))
    layer = CrossIterationBatchNormalization(keras.layers.Dense(3, use_bias=False),
                                             window_size=2, momentum=0.0, epsilon=1e-3,
                                             center=False, scale=False)
    layer.build(x1.shape)
    w1 = layer.layer.kernel.numpy()
    layer(x1, training=True)
    errors = []
    for size in (0.1, 0.05):
        w2 = (w1 + size * rng.normal(size=w1.shape)).astype("float32")
        twin = CrossIterationBatchNormalization.from_config(layer.get_config())
        twin.build(x1.shape)
        twin.set_weights(layer.get_weights())
        twin.layer.kernel.assign(w2)
        y = twin(x2, training=True).numpy()
        z1, z2 = x1.astype(np.float64) @ w2, x2.astype(np.float64) @ w2
        mean = (z1.mean(0) + z2.mean(0)) / 2
        # Recover the pooled statistics from the output (gamma = 1, beta = 0).
        z2_hat = x2 @ w2
        pooled_sd = (z2_hat[0] - z2_hat[1]) / (y[0] - y[1])
        pooled_mean = z2_hat[0] - y[0] * pooled_sd
        np.testing.assert_allclose(pooled_mean, mean, rtol=1e-4, atol=1e-4)
        exact_var = (z1.var(0) + z1.mean(0) ** 2 + z2.var(0) + z2.mean(0) ** 2) / 2 - mean ** 2
        errors.append(np.max(np.abs(pooled_sd ** 2 - 1e-3 - exact_var)))
    assert errors[1] < errors[0] / 3, f"variance error not second order: {errors}"


def test_channels_first_matches_reference_under_xla():
    """Keras's channels-first Conv2D runs on CPU only under XLA, so the check is compiled."""
    shape = (4, 3, 6, 6)
    layer = CrossIterationBatchNormalization(
        keras.layers.Conv2D(4, 3, data_format="channels_first"), window_size=3, momentum=0.5)
    case = harness.LayerCase(factory=None, input_shape=shape, atol=2e-4, rtol=2e-4)
    harness.build_randomized(case, 0, layer)
    reference = CrossIterationReference(harness.weights_by_name(layer),
                                        conv=dict(data_format="channels_first"), window_size=3,
                                        momentum=0.5)

    @tf.function(jit_compile=True)
    def train(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * dy)
        return y, tape.gradient(loss, x)

    infer = tf.function(lambda x: layer(x, training=False), jit_compile=True)
    rng = np.random.default_rng(5)
    for step in range(4):
        x = rng.normal(1.5, 2, shape).astype("float32")
        dy = rng.normal(size=(4, 4, 4, 4)).astype("float32")
        y, dx = train(tf.constant(x), tf.constant(dy))
        harness.assert_close(dx, reference.input_gradient(x, dy), case, f"dx, step {step}")
        harness.assert_close(y, reference.train(x), case, f"output, step {step}")
        harness.assert_state_equal(layer, reference.state(), case, f"state, step {step}")
        kernel = layer.layer.kernel.numpy() + rng.normal(0, 0.05, (3, 3, 3, 4)).astype("float32")
        layer.layer.kernel.assign(kernel), reference.set_kernel(kernel)
    x = rng.normal(1.5, 2, shape).astype("float32")
    harness.assert_close(infer(tf.constant(x)), reference.infer(x), case, "inference")


def test_masked_sequence_statistics_match_reference():
    rng = np.random.default_rng(6)
    layer = make_layer("dense_sequence")
    shape = CONFIGS["dense_sequence"][4]
    case = harness.LayerCase(factory=None, input_shape=shape, atol=2e-4, rtol=2e-4)
    harness.build_randomized(case, 0, layer)
    reference = make_reference("dense_sequence", harness.weights_by_name(layer))
    for step in range(4):
        x = rng.normal(1.5, 2, shape).astype("float32")
        mask = rng.random(shape[:2]) > 0.3
        dy = rng.normal(size=shape[:2] + (4,)).astype("float32")
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True, mask=tf.constant(mask))
            loss = tf.reduce_sum(y * dy)
        harness.assert_close(tape.gradient(loss, xt), reference.input_gradient(x, dy, mask),
                             case, f"dx, step {step}")
        harness.assert_close(y, reference.train(x, mask), case, f"output, step {step}")
        harness.assert_state_equal(layer, reference.state(), case, f"state, step {step}")
        kernel = layer.layer.kernel.numpy() + rng.normal(0, 0.05, (6, 4)).astype("float32")
        layer.layer.kernel.assign(kernel), reference.set_kernel(kernel)


# ------------------------------------------------------------------ relation to plain BN
def _conv_bn_pair(window_size, burn_in_steps=0):
    """CBN(Conv2D + relu) and Conv2D -> keras_norm BN -> ReLU with the same weights."""
    keras.utils.set_random_seed(0)
    shape = (4, 6, 6, 3)
    cbn = keras.Sequential([
        keras.Input(shape[1:]),
        CrossIterationBatchNormalization(keras.layers.Conv2D(4, 3, activation="relu"),
                                         window_size=window_size, burn_in_steps=burn_in_steps,
                                         momentum=0.5)])
    bn = keras.Sequential([keras.Input(shape[1:]), keras.layers.Conv2D(4, 3),
                           BatchNormalization(momentum=0.5), keras.layers.ReLU()])
    by_name = {harness.weight_name(w): w for w in cbn.weights}
    for w in bn.weights:
        w.assign(by_name[harness.weight_name(w)])
    return cbn, bn, shape


def _sgd_steps(model, xs, dys):
    optimizer = keras.optimizers.SGD(0.1)
    outputs = []
    for x, dy in zip(xs, dys):
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_sum(y * dy)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        outputs.append(y.numpy())
    return outputs


@pytest.mark.parametrize("window_size, burn_in_steps", [(1, 0), (4, 5)])
def test_window_one_and_burn_in_equal_batch_normalization(window_size, burn_in_steps):
    """`window_size=1`, and any window during the burn-in, is Conv2D + BatchNormalization."""
    cbn, bn, shape = _conv_bn_pair(window_size, burn_in_steps)
    rng = np.random.default_rng(7)
    xs = [rng.normal(1, 2, shape).astype("float32") for _ in range(5)]
    dys = [rng.normal(size=(4, 4, 4, 4)).astype("float32") for _ in range(5)]
    for a, b in zip(_sgd_steps(cbn, xs, dys), _sgd_steps(bn, xs, dys)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    by_name = {harness.weight_name(w): w.numpy() for w in cbn.weights}
    for w in bn.weights:
        np.testing.assert_allclose(by_name[harness.weight_name(w)], w.numpy(), atol=1e-5,
                                   err_msg=w.path)
    np.testing.assert_allclose(cbn(xs[0]), bn(xs[0]), atol=1e-5)
    if window_size == 1:
        assert sorted(by_name) == sorted(harness.weight_name(w) for w in bn.weights)
    else:  # the burn-in is over: the window now changes the result
        assert not np.allclose(_sgd_steps(cbn, xs[:1], dys[:1]), _sgd_steps(bn, xs[:1], dys[:1]),
                               atol=1e-3)


# ----------------------------------------------------------------------- state behaviours
def test_inference_and_frozen_layer_leave_state_untouched():
    layer = make_layer("conv")
    x = np.random.default_rng(8).normal(size=CONFIGS["conv"][4]).astype("float32")
    layer(x, training=True)
    before = harness.weights_by_name(layer)
    layer(x, training=False)
    layer.trainable = False
    frozen = layer(x, training=True)
    np.testing.assert_allclose(frozen, layer(x, training=False), atol=1e-6)
    for name, value in harness.weights_by_name(layer).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_fully_masked_batch_keeps_window_and_moving_statistics():
    layer = make_layer("dense_sequence")
    rng = np.random.default_rng(13)
    x = rng.normal(size=(4, 3, 6)).astype("float32")
    layer(x, training=True)
    before = harness.weights_by_name(layer)
    y = layer(x, training=True, mask=np.zeros((4, 3), bool))
    assert np.all(np.isfinite(y))
    after = harness.weights_by_name(layer)
    assert after["step"] == before["step"] + 1
    for name, value in before.items():
        if name != "step":
            np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_momentum_is_read_at_call_time():
    """A tf.Variable momentum (as recompute_statistics uses) takes effect without rebuilding."""
    layer = make_layer("dense", momentum=0.9)
    x = np.random.default_rng(9).normal(2, 1, CONFIGS["dense"][4]).astype("float32")
    layer(x, training=True)
    layer.momentum = tf.Variable(0.0)
    step = tf.function(lambda x: layer(x, training=True))
    step(x)
    z = x @ layer.layer.kernel.numpy() + layer.layer.bias.numpy()
    np.testing.assert_allclose(layer.moving_mean.numpy(), z.mean(0), atol=1e-5)


def test_mixed_precision_keeps_float32_kernels_and_accurate_derivatives():
    """Kernel differences are ~1e-4 of the weights: the window must hold the float32 kernel.

    The float16 backward passes for the derivatives are rescaled: with pixel-scale inputs the
    stored derivatives stay finite and close to the float32 ones.
    """
    x = np.random.default_rng(10).uniform(0, 255, (8, 6, 6, 3)).astype("float16")
    windows = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(0)
        layer = make_layer("conv")
        layer.build(x.shape)
        kernel = layer.layer.kernel.numpy() + np.float32(1e-6)
        layer.layer.kernel.assign(kernel)
        layer(x, training=True)
        assert layer.window_kernel.dtype == "float32"
        np.testing.assert_array_equal(layer.window_kernel.numpy()[0], kernel)
        windows[policy] = {name: layer.__getattribute__(name).numpy()[0] for name in
                           ("window_mean_gradient", "window_variance_gradient")}
    for name, expected in windows["float32"].items():
        actual = windows["mixed_float16"][name]
        assert np.all(np.isfinite(actual)), name
        np.testing.assert_allclose(actual, expected, atol=1e-2 * np.abs(expected).max(),
                                   err_msg=name)


# ------------------------------------------------------------- models: save, export, resume
def _small_model(burn_in_steps=0, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        CrossIterationBatchNormalization(
            keras.layers.Conv2D(4, 3, strides=2, use_bias=False, activation="relu"),
            window_size=3, burn_in_steps=burn_in_steps, momentum=0.8),
        keras.layers.Flatten(),
        CrossIterationBatchNormalization(keras.layers.Dense(3), window_size=2, momentum=0.8),
    ])


def _batches(count, seed=11):
    rng = np.random.default_rng(seed)
    return [(rng.normal(1, 2, (4, 6, 6, 3)).astype("float32"), rng.integers(0, 3, 4))
            for _ in range(count)]


def _train(model, batches, optimizer):
    """Eager training steps (cheaper than tracing for a handful of steps); the losses."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses = []
    for x, y in batches:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        losses.append(float(loss))
    return losses


def test_model_saves_and_exports_with_same_inference_outputs(tmp_path):
    model = _small_model()
    _train(model, _batches(3), keras.optimizers.SGD(0.05))
    x = _batches(1, seed=12)[0][0]
    expected = model(x, training=False).numpy()

    path = str(tmp_path / "cbn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x, training=False), expected)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)

    export_dir = str(tmp_path / "exported")
    model.export(export_dir, verbose=False)
    exported = tf.saved_model.load(export_dir)
    served = exported.serve(tf.constant(x))
    np.testing.assert_allclose(served, expected, atol=1e-6)


@pytest.mark.parametrize("how", ["checkpoint", "keras"])
def test_resumed_run_continues_with_the_same_window(how, tmp_path):
    """Train 3 steps, save, train 3 more; a restored copy must reproduce those 3 steps.

    With `burn_in_steps=4` the resumed run is plain BN for one step and windowed after it, so
    the step counter must be restored as well as the window.
    """
    batches = _batches(6)
    original = _small_model(burn_in_steps=4)
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    _train(original, batches[:3], optimizer)
    if how == "checkpoint":
        saved = tf.train.Checkpoint(model=original, optimizer=optimizer).write(
            str(tmp_path / "ckpt"))
    else:
        original.compile(optimizer=optimizer, loss="mse")
        original.save(str(tmp_path / "resume.keras"))
    expected_losses = _train(original, batches[3:], optimizer)

    if how == "checkpoint":
        resumed = _small_model(burn_in_steps=4, seed=1)
        resumed_optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        resumed_optimizer.build(resumed.trainable_variables)
        tf.train.Checkpoint(model=resumed, optimizer=resumed_optimizer).read(saved) \
            .assert_consumed()
    else:
        resumed = keras.models.load_model(str(tmp_path / "resume.keras"))
        resumed_optimizer = resumed.optimizer
    cbn = resumed.layers[0]
    assert int(cbn.step.numpy()) == 3 and int(cbn.window_count.numpy()) == 2
    losses = _train(resumed, batches[3:], resumed_optimizer)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for a, b in zip(original.weights, resumed.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)


# ------------------------------------------------------------------- training on CIFAR-10
def _cifar_cnn():
    def block(filters):
        return CrossIterationBatchNormalization(
            keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False,
                                activation="relu"),
            window_size=4, burn_in_steps=20)

    return keras.Sequential([
        keras.Input((32, 32, 3)), block(8), block(16), block(16),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10),
    ])


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [2, 32])
def test_small_cnn_trains_on_cifar10(batch_size):
    """200 steps from scratch (window 4 after 20 steps): finite, and the loss goes down."""
    data = np.load(CIFAR_SMALL)
    keras.utils.set_random_seed(0)
    images = data["x_train"].astype("float32") / 127.5 - 1.0
    labels = data["y_train"].astype("int64")
    model = _cifar_cnn()
    harness.check_training_reduces_loss(model, images, labels, batch_size,
                                        keras.optimizers.Adam(3e-3))
    assert int(model.layers[0].step.numpy()) == 200


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"window_size": 0}, ValueError, r"`window_size` must be >= 1. Received: window_size=0"),
    ({"window_size": True}, TypeError, r"`window_size` must be an integer.*window_size=True"),
    ({"window_size": 2.0}, TypeError, r"Received: window_size=2.0"),
    ({"burn_in_steps": -1}, ValueError, r"`burn_in_steps` must be >= 0. Received: "
                                        r"burn_in_steps=-1"),
    ({"burn_in_steps": False}, TypeError, r"burn_in_steps=False"),
])
def test_argument_errors(kwargs, error, fragment):
    with pytest.raises(error, match=r"CrossIterationBatchNormalization: .*" + fragment):
        CrossIterationBatchNormalization(keras.layers.Dense(2), **kwargs)


class _MyConv(keras.layers.Conv2D):
    pass


@pytest.mark.parametrize("layer, error, fragment", [
    (keras.layers.DepthwiseConv2D(3), TypeError, r"`layer` must be a keras.layers.Dense, "
                                                 r"Conv1D, Conv2D or Conv3D.*Received: layer="),
    (_MyConv(2, 3), TypeError, r"exact type.*Received: layer=<_MyConv"),
    ("conv", TypeError, r"Received: layer='conv'"),
    (keras.layers.Conv2D(4, 3, groups=2), ValueError,
     r"grouped convolutions are not supported.*Received: layer.groups=2"),
])
def test_layer_errors(layer, error, fragment):
    with pytest.raises(error, match=fragment):
        CrossIterationBatchNormalization(layer)


def test_quantized_dense_is_rejected():
    dense = keras.layers.Dense(3)
    dense.build((2, 4))
    dense.quantize("int8")
    layer = CrossIterationBatchNormalization(dense, name="cbn3")
    with pytest.raises(ValueError, match=r"'cbn3'.*quantized.*"
                                         r"Received: layer.quantization_mode='int8'"):
        layer.build((2, 4))


def test_channels_first_mask_must_not_flag_channels():
    """Keras's mask layout (the output's shape without its last axis) flags channels when they
    are not last; the kernel derivatives cannot take per-channel counts, so that is rejected.
    (Checked on the mask expansion itself: CPU convolutions do not run channels first.)"""
    layer = CrossIterationBatchNormalization(
        keras.layers.Conv1D(4, 3, data_format="channels_first"), name="cbn_cf")
    layer.build((4, 3, 8))
    output = tf.zeros((4, 4, 6))
    with pytest.raises(ValueError, match=r"'cbn_cf'.*must not vary along the channel axis 1.*"
                                         r"mask.shape=\(4, 4\)"):
        layer._expand_mask(tf.ones((4, 4), tf.bool), output)
    expanded = layer._expand_mask(tf.constant([[True], [False], [True], [True]]), output)
    assert tuple(expanded.shape) == (4, 1, 1)
    np.testing.assert_array_equal(expanded.numpy().ravel(), [1.0, 0.0, 1.0, 1.0])


def test_import_does_not_change_backend():
    assert os.environ.get("KERAS_BACKEND", "tensorflow") == keras.backend.backend()
