"""MovingAverageBatchNormalization against NumPy (forward and the custom gradient), under XLA,
tf.distribute, mixed precision, save/load/export, and training a small CNN on CIFAR-10."""

import os

import harness
import keras
import numpy as np
import pytest
import tensorflow as tf
from references.moving_average import MovingAverageBatchNormReference

from keras_norm.layers.moving_average import MovingAverageBatchNormalization
from keras_norm.layers.weight_standardization import CenteredConv2D

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-small.npz")

# A short buffer and warm-up so that 6 steps fill and wrap the buffers and cross from r = 1 to
# clipped r; momentum 0.5 makes every EMA update visible; r_max 1.5 makes the clipping bind.
SHORT = dict(buffer_size=3, warmup_steps=2, momentum=0.5, r_max=1.5)
# name -> (layer kwargs, input shape)
CONFIGS = {
    "default": (SHORT, (4, 4, 4, 3)),
    "channels_first": (dict(SHORT, axis=1), (4, 3, 4, 4)),
    "dense": (dict(SHORT, epsilon=1e-3), (6, 5)),
    "no_affine": (dict(SHORT, center=False, scale=False), (4, 4, 4, 3)),
    "batch_size_one": (SHORT, (1, 4, 4, 3)),
    "buffer_one": (dict(SHORT, buffer_size=1), (4, 4, 4, 3)),
    "unclipped": (dict(buffer_size=4, warmup_steps=0, momentum=0.7, r_max=100.0), (4, 5, 3)),
    "batch_inference": (dict(SHORT, inference_statistics="batch"), (4, 4, 4, 3)),
    "synchronized": (dict(SHORT, synchronized=True), (8, 4, 4, 3)),
}
REFERENCE_KEYS = ("axis", "buffer_size", "warmup_steps", "momentum", "epsilon", "r_max",
                  "inference_statistics")


def varying_scale(rng, shape):
    """A different scale every step, so that moving averages differ from batch statistics."""
    return rng.uniform(0.3, 3.0) * rng.normal(0.5, 1.0, shape)


def make_case(name, steps=6):
    kwargs, shape = CONFIGS[name]
    ref_kwargs = {k: v for k, v in kwargs.items() if k in REFERENCE_KEYS}
    return harness.LayerCase(
        factory=lambda: MovingAverageBatchNormalization(**kwargs),
        input_shape=shape,
        reference=lambda weights: MovingAverageBatchNormReference(weights, **ref_kwargs),
        steps=steps,
        input_fn=varying_scale,
    )


def make_reference(layer, **kwargs):
    return MovingAverageBatchNormReference(harness.weights_by_name(layer), **kwargs)


def training_gradients(layer, x, dy):
    """Output, dL/dx and `{weight name: gradient}` of L = sum(y * dy), training mode."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    grads = tape.gradient(loss, [x] + list(layer.trainable_variables))
    names = [harness.weight_name(v) for v in layer.trainable_variables]
    return y, grads[0], dict(zip(names, grads[1:]))


def assert_state(layer, reference, what, atol=1e-5):
    actual = harness.weights_by_name(layer)
    for name, value in reference.state().items():
        np.testing.assert_allclose(actual[name], value, atol=atol, rtol=1e-5,
                                   err_msg=f"{what}: {name}")


# ---------------------------------------------------------------------------- shared harness
test_matches_numpy_reference_with_gradient = harness.layer_test(
    harness.check_reference, make_case, sorted(CONFIGS))


test_jit_equals_eager = harness.layer_test(
    harness.check_jit, make_case, ["default", "channels_first", "batch_inference"])


test_serialization_round_trips = harness.layer_test(
    harness.check_serialization, make_case, ["default", "no_affine", "batch_inference"], steps=3)


test_mixed_precision = harness.layer_test(
    harness.check_mixed_precision, make_case, ["default", "batch_size_one", "synchronized"])


@pytest.mark.parametrize("name", ["synchronized", "dense"])
def test_synchronized_equals_one_device(name, mirrored_strategy):
    kwargs, shape = CONFIGS[name]
    case = make_case(name, steps=4)
    case.input_shape = (8,) + shape[1:]
    case.factory = lambda: MovingAverageBatchNormalization(**{**kwargs, "synchronized": True})
    harness.check_distributed(case, mirrored_strategy)


def test_synchronized_batch_statistics_inference(mirrored_strategy):
    case = make_case("synchronized", steps=2)
    case.factory = lambda: MovingAverageBatchNormalization(synchronized=True,
                                                           inference_statistics="batch")
    harness.check_distributed(case, mirrored_strategy, training=False)


def test_unsynchronized_replicas_differ_from_one_device(mirrored_strategy):
    """Guards the distributed check itself: without synchronization it must see a difference."""
    case = make_case("default", steps=2)
    case.input_shape = (8, 4, 4, 3)
    with pytest.raises(AssertionError):
        harness.check_distributed(case, mirrored_strategy)


# ------------------------------------------------------------------------ the custom gradient
def _filled_layer(past_chi, past_psi, buffer_size=4, warmup_steps=0, **kwargs):
    """A built layer whose buffers already hold `past_chi`/`past_psi` (newest first)."""
    channels = past_chi.shape[1]
    layer = MovingAverageBatchNormalization(buffer_size=buffer_size, warmup_steps=warmup_steps,
                                            **kwargs)
    layer.build((None, 5, channels))
    rng = np.random.default_rng(3)
    layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
    layer.beta.assign(rng.normal(size=channels))
    layer.moving_second_moment.assign(rng.uniform(0.5, 2.0, channels))
    layer.second_moment_buffer.assign(past_chi)
    layer.backward_buffer.assign(past_psi)
    layer.step_counter.assign(10.0)
    layer.backward_step_counter.assign(10.0)
    return layer


@pytest.mark.parametrize("past_psi_scale", [0.0, 1.0])
def test_current_psi_enters_only_through_the_moving_average(past_psi_scale):
    """MABN's dL/dx = autodiff of its forward pass (past chi constant, r constant), except
    that the past psi values are added: `- z * sum(past psi) / (b sigma)`. With zero past psi
    the two agree, so the current psi enters with weight 1/b, as the SMA formula says."""
    rng = np.random.default_rng(0)
    b, channels = 4, 3
    past_chi = rng.uniform(0.5, 3.0, (b, channels)).astype("float32")
    past_psi = (past_psi_scale * rng.normal(size=(b, channels))).astype("float32")
    layer = _filled_layer(past_chi, past_psi, buffer_size=b, r_max=1.2)
    x = rng.normal(1.0, 2.0, (2, 5, channels)).astype("float32")
    dy = rng.normal(size=x.shape).astype("float32")
    moving = layer.moving_second_moment.numpy()
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()

    _, dx, _ = training_gradients(layer, x, dy)

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        chi_bar = (tf.reduce_mean(xt ** 2, [0, 1]) + past_chi[: b - 1].sum(0)) / b
        sigma = tf.sqrt(chi_bar + 1e-5)
        r = tf.stop_gradient(tf.clip_by_value(sigma / np.sqrt(moving + 1e-5), 1 / 1.2, 1.2))
        loss = tf.reduce_sum((gamma * r * xt / sigma + beta) * dy)
    autodiff = tape.gradient(loss, xt).numpy()
    z = x / sigma.numpy()
    expected = autodiff - z * past_psi[: b - 1].sum(0) / (b * sigma.numpy())
    np.testing.assert_allclose(dx, expected, atol=1e-5)
    if past_psi_scale:
        assert np.max(np.abs(dx - autodiff)) > 1e-2, "past psi had no effect"
    # the new psi is pushed in front, the oldest one dropped
    psi = np.mean(dy * gamma * r.numpy() * z, axis=(0, 1))
    np.testing.assert_allclose(layer.backward_buffer.numpy(),
                               np.concatenate([psi[None], past_psi[:-1]]), atol=1e-5)
    assert layer.backward_step_counter.numpy() == 11


def test_parameter_gradients_match_reference():
    case = make_case("default")
    layer = harness.build_randomized(case)
    reference = make_reference(layer, **SHORT)
    for step in range(5):
        x = case.inputs(step)
        dy = np.random.default_rng(50 + step).normal(size=x.shape).astype("float32")
        expected = reference.parameter_gradients(x, dy)
        expected_dx = reference.input_gradient(x, dy)
        reference.train(x)
        _, dx, grads = training_gradients(layer, x, dy)
        np.testing.assert_allclose(dx, expected_dx, atol=1e-4, rtol=1e-4)
        for name in ("gamma", "beta"):
            np.testing.assert_allclose(grads[name], expected[name], atol=1e-4, rtol=1e-4,
                                       err_msg=f"{name}, step {step}")


def _train_step(layer):
    def step(x, dy):
        y, dx, grads = training_gradients(layer, x, dy)
        return y, dx, grads["gamma"], grads["beta"]
    return step


@pytest.mark.parametrize("jit_compile", [False, True])
def test_gradient_in_tf_function_equals_eager(jit_compile):
    """The backward buffer is written from inside the gradient, in graphs and under XLA."""
    case = make_case("default")
    eager = harness.build_randomized(case)
    compiled = harness.clone_layer(case, eager)
    step = tf.function(_train_step(compiled), jit_compile=jit_compile)
    for i in range(5):
        x = tf.constant(case.inputs(i))
        dy = tf.constant(np.random.default_rng(i).normal(size=x.shape).astype("float32"))
        for actual, expected in zip(step(x, dy), _train_step(eager)(x, dy)):
            np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
    assert compiled.backward_step_counter.numpy() == 5
    harness.assert_state_equal(compiled, harness.weights_by_name(eager), case, "compiled state")


def test_forward_in_tf_function_gradient_outside():
    """Only the forward pass compiled: the buffer writes live in the function's backward
    graph and must not be pruned there (they are control dependencies of the gradients)."""
    case = make_case("default")
    layer = harness.build_randomized(case)
    reference = make_reference(layer, **SHORT)
    forward = tf.function(lambda x: layer(x, training=True))
    for i in range(5):
        x = case.inputs(i)
        dy = np.random.default_rng(i).normal(size=x.shape).astype("float32")
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(forward(xt) * dy)
        np.testing.assert_allclose(tape.gradient(loss, xt), reference.input_gradient(x, dy),
                                   atol=1e-4, rtol=1e-4)
        reference.train(x)
    assert_state(layer, reference, "after 5 steps")


def test_forward_in_tf_function_gradient_of_weights_only():
    """The layer on a model input: only gamma/beta need a gradient; psi is still recorded."""
    layer = MovingAverageBatchNormalization(buffer_size=2)
    layer.build((None, 3))
    forward = tf.function(lambda x: layer(x, training=True))
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)).astype("float32"))
    dy = np.random.default_rng(1).normal(size=(4, 3)).astype("float32")
    reference = make_reference(layer, buffer_size=2)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(forward(x) * dy)
    grads = tape.gradient(loss, layer.trainable_variables)
    expected = reference.parameter_gradients(x.numpy(), dy)
    reference.input_gradient(x.numpy(), dy)
    reference.train(x.numpy())
    np.testing.assert_allclose(grads[0], expected["gamma"], atol=1e-5)
    np.testing.assert_allclose(grads[1], expected["beta"], atol=1e-5)
    assert layer.backward_step_counter.numpy() == 1
    assert_state(layer, reference, "after one step")


def test_stateless_call_leaves_variables_untouched():
    layer = MovingAverageBatchNormalization(buffer_size=2)
    layer.build((None, 3))
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [tf.identity(v.value) for v in layer.non_trainable_variables]
    _, updated = layer.stateless_call(trainable, non_trainable, x, training=True)
    assert layer.step_counter.numpy() == 0
    np.testing.assert_array_equal(layer.second_moment_buffer.numpy(), np.zeros((2, 3)))
    values = dict(zip([harness.weight_name(v) for v in layer.non_trainable_variables], updated))
    assert values["step_counter"].numpy() == 1
    np.testing.assert_allclose(values["second_moment_buffer"][0], (x ** 2).mean(0), rtol=1e-6)


def test_forward_without_gradient_leaves_backward_state():
    layer = MovingAverageBatchNormalization(buffer_size=2)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    layer(x, training=True)
    layer(x, training=True)
    assert layer.step_counter.numpy() == 2
    assert layer.backward_step_counter.numpy() == 0
    np.testing.assert_array_equal(layer.backward_buffer.numpy(), np.zeros((2, 4)))


# ------------------------------------------------------------------------ batch sizes, states
@pytest.mark.parametrize("compiled", [False, True])
def test_partial_batches_and_batch_size_one(compiled):
    """Batch sizes change from step to step (1 and a last partial batch included)."""
    layer = MovingAverageBatchNormalization(**SHORT)
    layer.build((None, 4, 4, 3))
    reference = make_reference(layer, **SHORT)
    step = _train_step(layer)
    if compiled:
        spec = tf.TensorSpec((None, 4, 4, 3), tf.float32)
        step = tf.function(step, input_signature=[spec, spec])  # one trace for all sizes
    rng = np.random.default_rng(0)
    for i, batch in enumerate([4, 3, 1, 2, 1, 4, 3]):
        x = varying_scale(rng, (batch, 4, 4, 3)).astype("float32")
        dy = rng.normal(size=x.shape).astype("float32")
        y, dx, _, _ = step(tf.constant(x), tf.constant(dy))
        np.testing.assert_allclose(dx, reference.input_gradient(x, dy), atol=1e-4, rtol=1e-4,
                                   err_msg=f"input gradient, step {i}")
        np.testing.assert_allclose(y, reference.train(x), atol=1e-4, rtol=1e-4,
                                   err_msg=f"output, step {i}")
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert_state(layer, reference, "after partial batches")


def test_warmup_then_clipped_renormalization():
    """r = 1 for `warmup_steps` iterations, then sqrt(chi_bar / chi_ema) clipped to r_max."""
    layer = MovingAverageBatchNormalization(buffer_size=1, warmup_steps=2, momentum=0.0,
                                            r_max=2.0, center=False, scale=False, epsilon=1e-6)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    z = x / np.sqrt((x ** 2).mean(0) + 1e-6)
    np.testing.assert_allclose(layer(x, training=True), z, atol=1e-5)        # warm-up
    np.testing.assert_allclose(layer(10 * x, training=True), z, atol=1e-5)   # warm-up
    np.testing.assert_allclose(layer(100 * x, training=True), 2 * z, atol=1e-5)  # r = 10 > 2
    np.testing.assert_allclose(layer(80 * x, training=True), 0.8 * z, atol=1e-5)  # unclipped
    np.testing.assert_allclose(layer(x, training=True), 0.5 * z, atol=1e-5)  # r = 1/80 < 1/2


def test_inference_uses_ema_and_leaves_state_untouched():
    layer = MovingAverageBatchNormalization(buffer_size=2, momentum=0.5)
    rng = np.random.default_rng(0)
    for _ in range(3):
        layer(rng.normal(size=(4, 3)).astype("float32"), training=True)
    state = harness.weights_by_name(layer)
    x = rng.normal(2, 3, (4, 3)).astype("float32")
    moving = layer.moving_second_moment.numpy()
    np.testing.assert_allclose(layer(x, training=False), x / np.sqrt(moving + 1e-5), atol=1e-5)
    batch_layer = MovingAverageBatchNormalization(inference_statistics="batch")
    np.testing.assert_allclose(batch_layer(x), x / np.sqrt((x ** 2).mean(0) + 1e-5), atol=1e-5)
    np.testing.assert_array_equal(batch_layer.step_counter.numpy(), 0)
    for name, value in harness.weights_by_name(layer).items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


def test_frozen_layer_runs_in_inference_mode():
    x = np.random.default_rng(1).normal(4, 2, (8, 3)).astype("float32")
    layer = MovingAverageBatchNormalization()
    layer.build(x.shape)
    layer.trainable = False
    np.testing.assert_allclose(layer(x, training=True), x / np.sqrt(1 + 1e-5), atol=1e-5)
    assert layer.step_counter.numpy() == 0


def test_empty_batch_gives_no_nan_and_keeps_state():
    layer = MovingAverageBatchNormalization(buffer_size=2)
    layer.build((None, 3))
    x = tf.zeros((0, 3))
    y, dx, grads = training_gradients(layer, x, tf.zeros((0, 3)))
    assert y.shape == (0, 3) and dx.shape == (0, 3)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    for name, value in harness.weights_by_name(layer).items():
        assert np.all(np.isfinite(value)), name
    assert layer.step_counter.numpy() == 0 and layer.backward_step_counter.numpy() == 0
    np.testing.assert_array_equal(layer.moving_second_moment.numpy(), np.ones(3))


def test_mixed_precision_gradient_matches_float32():
    """Under mixed_float16 the custom gradient runs in float32: float16 dL/dx, float32
    gradients of gamma/beta and buffers, all close to the float32 layer's."""
    case = make_case("default")
    rng = np.random.default_rng(4)
    inputs = [case.inputs(i) for i in range(4)]
    dys = [rng.normal(size=case.input_shape).astype("float32") for _ in inputs]
    results = {}
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        layer = harness.build_randomized(case)
        for x, dy in zip(inputs, dys):
            y, dx, grads = training_gradients(layer, tf.constant(x, layer.compute_dtype), dy)
        results[policy] = (y, dx, grads, harness.weights_by_name(layer))
    keras.mixed_precision.set_global_policy("float32")
    (y32, dx32, g32, w32), (y16, dx16, g16, w16) = results["float32"], results["mixed_float16"]
    assert y16.dtype == tf.float16 and dx16.dtype == tf.float16
    np.testing.assert_allclose(np.float32(y16), y32, atol=2e-2, rtol=2e-2)
    assert all(g.dtype == tf.float32 for g in g16.values())
    np.testing.assert_allclose(np.float32(dx16), dx32, atol=2e-2, rtol=2e-2)
    for name in g32:
        np.testing.assert_allclose(g16[name], g32[name], atol=5e-2, rtol=2e-2, err_msg=name)
    for name in w32:
        np.testing.assert_allclose(w16[name], w32[name], atol=2e-2, rtol=2e-2, err_msg=name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_keep_float32_statistics(dtype):
    x = (300 + np.random.default_rng(2).normal(0, 1, (4, 3))).astype("float32")
    layer = MovingAverageBatchNormalization(dtype=dtype, momentum=0.0)
    y = layer(tf.constant(x, dtype), training=True)
    assert y.dtype == dtype
    rounded = tf.cast(tf.constant(x, dtype), tf.float32).numpy().astype(np.float64)
    assert layer.moving_second_moment.dtype == "float32"
    np.testing.assert_allclose(layer.moving_second_moment.numpy(), (rounded ** 2).mean(0),
                               rtol=1e-6)


# --------------------------------------------------------------------------------- models
def small_cnn(norm_kwargs, seed=0):
    """CenteredConv2D + MABN in the first block only, a plain conv block after it: MABN in
    only some layers (users of the official code report NaN there)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255.0),
        CenteredConv2D(16, 3, strides=2, padding="same", use_bias=False),
        MovingAverageBatchNormalization(**norm_kwargs),
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])


def cifar_subset(n):
    data = np.load(CIFAR)
    return data["x_train"][:n].astype("float32"), data["y_train"][:n].astype("int32")


def tiny_model(norm_kwargs, seed=0):
    """A model small enough to compile quickly: CenteredConv2D -> MABN -> ReLU -> Dense."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        CenteredConv2D(4, 3, padding="same", use_bias=False),
        MovingAverageBatchNormalization(**norm_kwargs),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def tiny_data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, (n, 6, 6, 3)).astype("float32"), rng.integers(0, 3, n)


def _trained_model(steps=3):
    model = tiny_model(dict(buffer_size=4, warmup_steps=1))
    x, y = tiny_data(8 * steps)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model, x[:5]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_keras_fit_updates_both_buffers(jit_compile):
    """Keras's compiled train step (with and without XLA) runs the backward-buffer writes;
    20 examples at batch 8 end with a partial batch of 4."""
    model = tiny_model(dict(buffer_size=4))
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    x, y = tiny_data(20)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    layer = model.layers[1]
    assert layer.step_counter.numpy() == 3 and layer.backward_step_counter.numpy() == 3
    assert np.all(layer.backward_buffer.numpy()[:3] != 0)
    assert np.all(layer.backward_buffer.numpy()[3] == 0)


def test_model_saves_reloads_and_keeps_training(tmp_path):
    model, x = _trained_model()
    path = str(tmp_path / "mabn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))
    harness.assert_weights_close(loaded, model)
    # training continues from the restored buffers: same outputs and gradients
    dy = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    results = []
    for m in (model, loaded):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(m(x, training=True) * dy)
        results.append([loss] + tape.gradient(loss, m.trainable_variables))
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    harness.assert_weights_close(loaded, model, atol=1e-6)


def test_export_serves_same_outputs(tmp_path):
    model, x = _trained_model()
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)  # keep a reference: it owns the variables
    for batch in (x, x[:1]):
        served = loaded.serve(tf.constant(batch))
        np.testing.assert_allclose(served, model(batch, training=False), atol=1e-5)


def test_fit_under_mirrored_strategy_matches_one_device(mirrored_strategy):
    x, y = tiny_data(16)
    kwargs = dict(buffer_size=2, warmup_steps=1, momentum=0.5, synchronized=True)
    single, _ = harness.check_fit_matches_one_device(lambda: tiny_model(kwargs), mirrored_strategy,
                                                     x, y, batch_size=8, rtol=1e-4)
    assert single.layers[1].backward_step_counter.numpy() == 2


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [2, 32])
def test_small_cnn_trains_on_cifar(batch_size):
    """200 Adam steps, past the warm-up into the clipped renormalization: no NaN, and the mean
    loss of the last 20 steps is below that of the first 20.

    At batch 2 the 20-step means are noisy (about +-0.1); with this set-up the decrease was
    0.10 to 0.39 over seeds 0-4 (0.22 for seed 0), and about 0.4 at batch 32."""
    x, y = cifar_subset(2000)
    model = small_cnn(dict(warmup_steps=50))
    harness.check_training_reduces_loss(model, x, y, batch_size, keras.optimizers.Adam(1e-2))
    assert model.layers[2].backward_step_counter.numpy() == 200


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"buffer_size": 0}, ValueError, r"`buffer_size` must be >= 1. Received: buffer_size=0"),
    ({"buffer_size": 2.5}, TypeError, r"`buffer_size` must be an integer. "
                                      r"Received: buffer_size=2.5"),
    ({"buffer_size": True}, TypeError, r"buffer_size=True"),
    ({"warmup_steps": -1}, ValueError, r"`warmup_steps` must be >= 0. Received: warmup_steps=-1"),
    ({"warmup_steps": False}, TypeError, r"`warmup_steps` must be an integer"),
    ({"r_max": 0.5}, ValueError, r"`r_max` must be in \[1.0, inf\]. Received: r_max=0.5"),
    ({"r_max": "5"}, TypeError, r"`r_max` must be a number. Received: r_max='5'"),
])
def test_argument_errors(kwargs, error, fragment):
    with pytest.raises(error, match=r"MovingAverageBatchNormalization: .*" + fragment):
        MovingAverageBatchNormalization(**kwargs)
