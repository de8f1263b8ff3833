"""keras_norm.BatchNormalization against NumPy, against Keras, and under tf.distribute."""

import inspect
import os

import harness
import keras
import numpy as np
import pytest
import tensorflow as tf
from references.batch_norm import BatchNormReference

from keras_norm.layers import BatchNormalization

# keras.layers.BatchNormalization has batch renormalization since Keras 3.14; on the older
# Keras keras_norm supports there is none to compare with (the NumPy reference still checks
# ours there).
needs_keras_renorm = pytest.mark.skipif(
    "renorm" not in inspect.signature(keras.layers.BatchNormalization).parameters,
    reason=f"keras {keras.__version__}: BatchNormalization has renorm from Keras 3.14 on")

# name -> (layer kwargs, input shape). Momentum 0.5 makes every update visible in 3 steps.
CONFIGS = {
    "default": (dict(momentum=0.5), (8, 4, 4, 3)),
    "channels_first": (dict(axis=1, momentum=0.5), (8, 3, 4, 4)),
    "dense": (dict(momentum=0.5, epsilon=1e-5), (16, 5)),
    "no_affine": (dict(momentum=0.5, center=False, scale=False), (8, 4, 4, 3)),
    "ghost": (dict(momentum=0.5, virtual_batch_size=3), (8, 4, 4, 3)),
    "ghost_even": (dict(momentum=0.5, virtual_batch_size=4), (8, 5)),
    "ghost_even_conv": (dict(momentum=0.5, virtual_batch_size=2), (8, 3, 3, 4)),
    "renorm": (dict(momentum=0.5, renorm=True, renorm_momentum=0.6,
                    renorm_clipping={"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}), (8, 4, 4, 3)),
    "ghost_renorm": (dict(momentum=0.5, virtual_batch_size=4, renorm=True, renorm_momentum=0.6,
                          renorm_clipping={"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}), (8, 4, 4, 3)),
    "batch_inference": (dict(momentum=0.5, inference_statistics="batch"), (8, 4, 4, 3)),
    "synchronized": (dict(momentum=0.5, synchronized=True), (8, 4, 4, 3)),
}
REFERENCE_KEYS = ("axis", "momentum", "epsilon", "virtual_batch_size", "renorm",
                  "renorm_clipping", "renorm_momentum", "inference_statistics")


def keras_layout_mask(rng, shape):
    """A random mask in Keras's layout: the input's shape without its last axis (whatever the
    channel axis), about 70% valid."""
    return rng.random(shape[:-1]) > 0.3


def broadcast_mask(rng, shape):
    """Keras's layout with a size-1 axis (as Keras's own test_masked_broadcast_normalization)."""
    return rng.random(shape[:-2] + (1,)) > 0.3


# name -> (layer kwargs, input shape, mask function). Every channel axis x mask layout: with
# the channels last the mask flags positions; with the channels not last Keras's mask (the
# input's shape without its last axis) covers the channel axis and flags channels.
MASKED_CONFIGS = {
    "masked_last": (dict(momentum=0.5), (8, 5, 3), keras_layout_mask),
    "masked_dense": (dict(momentum=0.5), (8, 5), keras_layout_mask),
    "masked_last_4d": (dict(momentum=0.5), (8, 4, 3, 2), keras_layout_mask),
    "masked_last_broadcast": (dict(momentum=0.5), (8, 4, 3, 2), broadcast_mask),
    "masked_axis1": (dict(axis=1, momentum=0.5), (8, 3, 5), keras_layout_mask),
    "masked_axis1_4d": (dict(axis=1, momentum=0.5), (8, 3, 4, 2), keras_layout_mask),
    "masked_axis2_4d": (dict(axis=2, momentum=0.5), (8, 4, 3, 2), keras_layout_mask),
    "masked_axis1_broadcast": (dict(axis=1, momentum=0.5), (8, 3, 4, 2), broadcast_mask),
    "masked_ghost_last": (dict(momentum=0.5, virtual_batch_size=4), (8, 5, 3),
                          keras_layout_mask),
    "masked_ghost_axis1": (dict(axis=1, momentum=0.5, virtual_batch_size=3), (8, 3, 5),
                           keras_layout_mask),
    "masked_renorm_axis1": (dict(axis=1, momentum=0.5, renorm=True, renorm_momentum=0.6),
                            (8, 3, 5), keras_layout_mask),
    "masked_batch_inference_axis1": (dict(axis=1, momentum=0.5, inference_statistics="batch"),
                                     (8, 3, 4, 2), keras_layout_mask),
}


def make_case(name):
    if name in MASKED_CONFIGS:
        kwargs, shape, mask_fn = MASKED_CONFIGS[name]
    else:
        (kwargs, shape), mask_fn = CONFIGS[name], None
    ref_kwargs = {k: v for k, v in kwargs.items() if k in REFERENCE_KEYS}
    return harness.LayerCase(
        factory=lambda: BatchNormalization(**kwargs),
        input_shape=shape,
        reference=lambda weights: BatchNormReference(weights, **ref_kwargs),
        mask_fn=mask_fn,
    )


test_matches_numpy_reference = harness.layer_test(
    harness.check_reference, make_case, sorted(CONFIGS) + sorted(MASKED_CONFIGS))


test_masked_jit_equals_eager = harness.layer_test(
    harness.check_jit, make_case, sorted(MASKED_CONFIGS))


@pytest.mark.parametrize("name", ["masked_last", "masked_axis1", "masked_axis2_4d",
                                  "masked_axis1_broadcast", "masked_renorm_axis1"])
def test_masked_synchronized_equals_one_device(name, mirrored_strategy):
    kwargs, _, _ = MASKED_CONFIGS[name]
    case = make_case(name)
    case.factory = lambda: BatchNormalization(**{**kwargs, "synchronized": True})
    harness.check_distributed(case, mirrored_strategy)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[needs_keras_renorm] if "renorm" in n else [])
    for n in sorted(MASKED_CONFIGS) if "ghost" not in n])
def test_masked_layouts_match_keras(name):
    """Keras's own layer on the same masks: outputs (training and inference) and moving
    statistics agree for every channel axis (Keras adds 1e-7 to the counts)."""
    kwargs, shape, mask_fn = MASKED_CONFIGS[name]
    kwargs = {k: v for k, v in kwargs.items() if k != "inference_statistics"}
    ours, theirs = BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    rng = np.random.default_rng(3)
    for step in range(3):
        x = rng.normal(1.5, 2.0, shape).astype("float32")
        mask = mask_fn(rng, shape)
        np.testing.assert_allclose(ours(x, training=True, mask=mask),
                                   theirs(x, training=True, mask=mask), atol=1e-4, rtol=1e-4,
                                   err_msg=f"training output, step {step}")
    harness.assert_weights_close(ours, theirs, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours(x, mask=mask), theirs(x, mask=mask), atol=1e-4, rtol=1e-4)


def test_mask_in_another_layout_is_a_clear_error():
    """A mask laid out as the input's shape without the channel axis ((N, L) for (N, C, L))
    is not Keras's layout: a ValueError naming the layer, not a broadcast failure."""
    layer = BatchNormalization(axis=1, name="bn_layout")
    with pytest.raises(ValueError, match=r"'bn_layout'.*mask's axis 1 has size 5 but the "
                                         r"input's has 3.*without its LAST axis"):
        layer(np.ones((4, 3, 5), "float32"), training=True, mask=np.ones((4, 5), bool))


def test_keras_masking_layer_on_channels_first_input():
    """Issue #15's case: keras.layers.Masking before a channels-first BN (mask (5, 2) for an
    input (5, 2, 3), channel axis 1) raised a BroadcastTo shape error; it now equals Keras."""
    x = np.random.default_rng(4).normal(5.0, 10.0, (5, 2, 3)).astype("float32")
    x[:, 1, :] = 0.0
    masked = keras.layers.Masking()(x)
    ours = BatchNormalization(axis=1, momentum=0.0)
    theirs = keras.layers.BatchNormalization(axis=1, momentum=0.0)
    np.testing.assert_allclose(ours(masked, training=True), theirs(masked, training=True),
                               atol=1e-4)
    np.testing.assert_allclose(ours.moving_mean.numpy(), theirs.moving_mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours.moving_variance.numpy(), theirs.moving_variance.numpy(),
                               atol=1e-4)
    # Channel 1 is masked out for every example: mean and variance 0, as in Keras.
    np.testing.assert_allclose(ours.moving_variance.numpy()[1], 0.0, atol=1e-6)


test_jit_equals_eager = harness.layer_test(
    harness.check_jit, make_case,
    ["default", "channels_first", "dense", "ghost", "ghost_even_conv", "renorm", "ghost_renorm",
     "batch_inference"])


test_serialization_round_trips = harness.layer_test(
    harness.check_serialization, make_case, ["default", "ghost", "renorm", "batch_inference"])


test_mixed_precision = harness.layer_test(
    harness.check_mixed_precision, make_case,
    ["default", "ghost", "ghost_even_conv", "renorm", "ghost_renorm", "synchronized"])


@pytest.mark.parametrize("name", ["synchronized", "dense", "renorm"])
def test_synchronized_equals_one_device(name, mirrored_strategy):
    kwargs, shape = CONFIGS[name]
    case = make_case(name)
    case.factory = lambda: BatchNormalization(**{**kwargs, "synchronized": True})
    harness.check_distributed(case, mirrored_strategy)


def test_synchronized_batch_statistics_inference(mirrored_strategy):
    case = make_case("synchronized")
    case.factory = lambda: BatchNormalization(synchronized=True, inference_statistics="batch")
    harness.check_distributed(case, mirrored_strategy, training=False)


def test_unsynchronized_replicas_differ_from_one_device(mirrored_strategy):
    """Guards the distributed check itself: without synchronization it must see a difference."""
    case = make_case("default")
    with pytest.raises(AssertionError):
        harness.check_distributed(case, mirrored_strategy)


# ------------------------------------------------------------------------- Keras parity
@pytest.mark.parametrize("kwargs", [
    {},
    {"axis": 1, "momentum": 0.9, "epsilon": 1e-5},
    {"center": False},
    pytest.param({"renorm": True, "renorm_clipping": {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}},
                 marks=needs_keras_renorm),
])
def test_same_weights_and_outputs_as_keras(kwargs):
    x = np.random.default_rng(0).normal(2, 3, (8, 3, 5, 5)).astype("float32")
    ours, theirs = BatchNormalization(**kwargs), keras.layers.BatchNormalization(**kwargs)
    ours.build(x.shape), theirs.build(x.shape)
    assert [(harness.weight_name(w), w.shape) for w in ours.weights] == \
           [(harness.weight_name(w), w.shape) for w in theirs.weights]
    for step in range(3):
        np.testing.assert_allclose(ours(x * (step + 1), training=True),
                                   theirs(x * (step + 1), training=True), atol=1e-5)
    harness.assert_weights_close(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)
    keras_config = theirs.get_config()
    assert set(keras_config) <= set(ours.get_config())
    defaults = BatchNormalization().get_config()
    for key, value in keras.layers.BatchNormalization().get_config().items():
        if key != "name":
            assert defaults[key] == value, key


def test_masked_statistics_match_keras_and_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(1, 2, (6, 5, 4)).astype("float32")
    mask = rng.random((6, 5)) > 0.4
    ours, theirs = BatchNormalization(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)
    reference = BatchNormReference({"gamma": np.ones(4), "beta": np.zeros(4),
                                    "moving_mean": np.zeros(4), "moving_variance": np.ones(4)},
                                   momentum=0.5)
    y = ours(x, training=True, mask=mask)
    np.testing.assert_allclose(y, reference.train(x, mask), atol=1e-5)
    np.testing.assert_allclose(y, theirs(x, training=True, mask=mask), atol=1e-4)
    np.testing.assert_allclose(ours.moving_variance.numpy(), reference.w["moving_variance"],
                               atol=1e-5)


@needs_keras_renorm
def test_keras_weights_load_unchanged(tmp_path):
    def model(norm):
        return keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 3), norm])

    theirs = model(keras.layers.BatchNormalization(renorm=True))
    x = np.random.default_rng(2).normal(size=(4, 4, 4, 3)).astype("float32")
    theirs(x, training=True)
    path = str(tmp_path / "keras_bn.weights.h5")
    theirs.save_weights(path)
    ours = model(BatchNormalization(renorm=True))
    ours.load_weights(path)
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-6)


# ------------------------------------------------------------------- synchronized numerics
def _distribute(strategy, parts):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group]))


def _sync_statistics(strategy, parts, layer_cls=BatchNormalization, masks=None):
    """Runs one synchronized training step on per-replica `parts`; returns (mean, var)."""
    with strategy.scope():
        layer = layer_cls(synchronized=True, momentum=0.0)
        layer.build((None,) + parts[0].shape[1:])

    @tf.function
    def step(x, mask=None):
        return layer(x, training=True, mask=mask)

    args = (_distribute(strategy, parts),)
    if masks is not None:
        args += (_distribute(strategy, masks),)
    outputs = strategy.run(step, args=args)
    return (layer.moving_mean.numpy(), layer.moving_variance.numpy(),
            strategy.experimental_local_results(outputs))


def test_synchronized_is_exact_when_mean_dominates(mirrored_strategy):
    """|mean| >> std: E[x^2]-E[x]^2 in float32 is garbage; the Chan merge is exact."""
    rng = np.random.default_rng(3)
    x = (1e4 + rng.normal(0, 1e-1, (8, 6))).astype("float32")
    parts = np.split(x, 2)
    mean, var, _ = _sync_statistics(mirrored_strategy, parts)
    true_var = x.astype(np.float64).var(0)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, true_var, rtol=1e-2)
    _, keras_var, _ = _sync_statistics(mirrored_strategy, parts, keras.layers.BatchNormalization)
    assert np.max(np.abs(keras_var - true_var) / true_var) > 0.1, "Keras became exact?"


def test_synchronized_uneven_and_empty_replicas(mirrored_strategy):
    rng = np.random.default_rng(4)
    x = rng.normal(3, 2, (8, 5)).astype("float32")
    for split in (3, 0):
        parts = [x[:split], x[split:]]
        mean, var, outputs = _sync_statistics(mirrored_strategy, parts)
        np.testing.assert_allclose(mean, x.mean(0), atol=1e-5)
        np.testing.assert_allclose(var, x.var(0), rtol=1e-5)
        y = np.concatenate(outputs)
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3), atol=1e-4)


def test_synchronized_masks_weight_replicas_by_count(mirrored_strategy):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (4, 6, 3)).astype("float32")
    mask = np.zeros((4, 6), bool)
    mask[0, :5] = True
    mask[2:, :1] = True  # replica 1 sees only 2 valid values, replica 0 sees 5
    mean, var, _ = _sync_statistics(mirrored_strategy, np.split(x, 2), masks=np.split(mask, 2))
    valid = x[mask]
    np.testing.assert_allclose(mean, valid.mean(0), atol=1e-5)
    np.testing.assert_allclose(var, valid.var(0), rtol=1e-4)


def test_synchronized_falls_back_to_local_outside_strategy():
    x = np.random.default_rng(6).normal(size=(8, 3)).astype("float32")
    np.testing.assert_allclose(BatchNormalization(synchronized=True)(x, training=True),
                               BatchNormalization()(x, training=True), atol=1e-6)


def test_fit_under_mirrored_strategy_matches_one_device(mirrored_strategy):
    rng = np.random.default_rng(7)
    x = rng.normal(2, 3, (16, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 3, 16)

    def make():
        return harness.small_classifier(
            (4, 4, 2), keras.layers.Conv2D(4, 3),
            BatchNormalization(synchronized=True, momentum=0.5))

    harness.check_fit_matches_one_device(make, mirrored_strategy, x, y, batch_size=16, epochs=2)


# --------------------------------------------------------------------------- behaviours
def test_ghost_batches_partial_group_and_moving_average():
    x = np.random.default_rng(8).normal(1, 2, (7, 3)).astype("float32")
    layer = BatchNormalization(virtual_batch_size=3, momentum=0.0)
    y = layer(x, training=True).numpy()
    for group in (slice(0, 3), slice(3, 6), slice(6, 7)):
        g = x[group]
        np.testing.assert_allclose(y[group], (g - g.mean(0)) / np.sqrt(g.var(0) + 1e-3),
                                   atol=1e-5)
    groups = [x[0:3], x[3:6], x[6:7]]
    counts = np.array([3, 3, 1.0])[:, None]
    expected_var = (counts * np.array([g.var(0) for g in groups])).sum(0) / 7
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_var, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(0), atol=1e-5)


@pytest.mark.parametrize("batch_size", [8, 7])
def test_ghost_batches_with_unknown_batch_size(batch_size):
    """A graph whose batch size is unknown picks the even or the padded ghost path at run
    time; both must give the eager values, gradients and moving statistics."""
    x = tf.constant(np.random.default_rng(11).normal(2, 3, (batch_size, 3, 3, 4)), tf.float32)
    upstream = tf.constant(np.random.default_rng(12).normal(size=x.shape), tf.float32)
    layers = [BatchNormalization(virtual_batch_size=2, momentum=0.5) for _ in range(2)]
    for layer in layers:
        layer.build(x.shape)

    def forward_backward(layer, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        return [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]

    eager = forward_backward(layers[0], x)
    traced = tf.function(lambda x: forward_backward(layers[1], x),
                         input_signature=[tf.TensorSpec([None, 3, 3, 4], tf.float32)])(x)
    for a, b in zip(eager, traced):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    np.testing.assert_allclose(layers[0].moving_variance.numpy(),
                               layers[1].moving_variance.numpy(), atol=1e-6)
    assert not np.allclose(layers[0].moving_variance.numpy(), 1.0)


def test_batch_inference_statistics_leave_moving_statistics_untouched():
    x = np.random.default_rng(9).normal(4, 2, (8, 3)).astype("float32")
    layer = BatchNormalization(inference_statistics="batch")
    y = layer(x, training=False)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3), atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(3))


def test_frozen_layer_runs_in_inference_mode():
    x = np.random.default_rng(10).normal(4, 2, (8, 3)).astype("float32")
    layer = BatchNormalization()
    layer.build(x.shape)
    layer.trainable = False
    y = layer(x, training=True)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))


def test_fully_masked_batch_keeps_moving_statistics():
    x = np.ones((2, 3, 4), "float32")
    layer = BatchNormalization(momentum=0.0)
    y = layer(x, training=True, mask=np.zeros((2, 3), bool))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(4))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_keep_float32_statistics(dtype):
    rng = np.random.default_rng(11)
    x = (300 + rng.normal(0, 1, (16, 4))).astype("float32")
    layer = BatchNormalization(dtype=dtype, momentum=0.0)
    y = layer(tf.constant(x, dtype), training=True)
    assert y.dtype == dtype
    assert layer.moving_mean.dtype == "float32"
    x_rounded = tf.cast(tf.constant(x, dtype), tf.float32).numpy()
    np.testing.assert_allclose(layer.moving_mean.numpy(), x_rounded.mean(0), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), x_rounded.var(0), rtol=1e-4)


def test_integer_inputs_are_cast():
    x = np.arange(24, dtype="int32").reshape(8, 3)
    y = BatchNormalization()(x, training=True)
    assert y.dtype == tf.float32
    xf = x.astype(np.float64)
    np.testing.assert_allclose(y, (xf - xf.mean(0)) / np.sqrt(xf.var(0) + 1e-3), atol=1e-5)


def test_export_serves_same_outputs(tmp_path):
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(2, 3),
                              BatchNormalization(virtual_batch_size=2, renorm=True)])
    x = np.random.default_rng(12).normal(size=(4, 4, 4, 3)).astype("float32")
    model(x, training=True)
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    served = loaded.serve(tf.constant(x))
    np.testing.assert_allclose(served, model(x, training=False), atol=1e-5)


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"renorm": True, "renorm_clipping": {"rmax": 1, "bad": 2}}, ValueError,
     r"Received invalid keys for `renorm_clipping` argument: \['bad'\]"),
    ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, ValueError,
     r"rmax should be greater than rmin .*Received: rmax=1.0, rmin=2.0"),
    ({"renorm": True, "renorm_clipping": {"dmax": -1}}, ValueError,
     r"dmax should be non-negative in the `renorm_clipping` argument. Received: dmax=-1.0"),
    ({"renorm": True, "renorm_clipping": {"rmin": "a"}}, TypeError,
     r"renorm_clipping\['rmin'\]` must be a number"),
    ({"renorm_clipping": {"rmax": 2.0}}, ValueError, r"only used with renorm=True"),
    ({"virtual_batch_size": 0}, ValueError, r"`virtual_batch_size` must be >= 1. "
                                            r"Received: virtual_batch_size=0"),
    ({"virtual_batch_size": True}, TypeError, r"virtual_batch_size=True"),
    ({"virtual_batch_size": 4, "synchronized": True}, ValueError, r"cannot be combined"),
])
def test_argument_errors(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        BatchNormalization(**kwargs)


def test_import_does_not_change_backend():
    assert os.environ.get("KERAS_BACKEND", "tensorflow") == keras.backend.backend()


def test_traced_renorm_reads_statistics_before_updating_them():
    """The renorm correction must see the renorm statistics of before the step. Traced, the
    statistics update once ran concurrently with the correction in ghost batches (kernels
    on) and the outputs took the updated values in some runs; several fresh traces make such a
    race show."""
    kwargs = dict(momentum=0.5, virtual_batch_size=4, renorm=True, renorm_momentum=0.6,
                  renorm_clipping={"rmax": 1.5, "rmin": 0.8, "dmax": 0.3})
    rng = np.random.default_rng(13)
    inputs = [tf.constant(rng.normal(1.5, 2.0, (8, 4, 4, 3)), tf.float32) for _ in range(2)]
    for _ in range(6):
        eager, traced = BatchNormalization(**kwargs), BatchNormalization(**kwargs)

        @tf.function
        def traced_step(x, layer=traced):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * y)
            return y, tape.gradient(loss, x)

        for x in inputs:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = eager(x, training=True)
                loss = tf.reduce_sum(y * y)
            expected = (y, tape.gradient(loss, x))
            for actual, wanted in zip(traced_step(x), expected):
                np.testing.assert_allclose(actual.numpy(), wanted.numpy(), atol=1e-4)
