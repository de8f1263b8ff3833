"""keras_norm MixtureNormalization against NumPy, BatchNormalization (K=1), tf.distribute, data."""

import os

import harness
import keras
import numpy as np
import pytest
import tensorflow as tf
from references.mixture_norm import MixtureNormReference

from keras_norm.layers.batch_norm import BatchNormalization
from keras_norm.layers.mixture_norm import MixtureNormalization
from keras_norm.population import recompute_statistics

CIFAR = "/work/shared/data/cifar10-small.npz"


def clustered(axis=-1):
    """Inputs from three well-separated modes per position (shared by all channels)."""
    def make(rng, shape):
        shape = tuple(shape)
        channels_axis = axis % len(shape)
        position_shape = tuple(1 if a == channels_axis else s for a, s in enumerate(shape))
        modes = np.array([-4.0, 0.5, 5.0])[rng.integers(0, 3, position_shape)]
        channel_scale = np.linspace(0.5, 1.5, shape[channels_axis])
        channel_scale = channel_scale.reshape([-1 if a == channels_axis else 1
                                               for a in range(len(shape))])
        return 1.0 + modes * channel_scale + rng.normal(0.0, 0.6, shape)
    return make


# name -> (layer kwargs, input shape, clustered inputs?). Momentum 0.5 makes every update count.
CONFIGS = {
    "default": (dict(momentum=0.5), (8, 4, 4, 3), True),
    "gaussian_inputs": (dict(momentum=0.5), (8, 4, 4, 3), False),
    "channels_first": (dict(axis=1, momentum=0.5), (8, 3, 4, 4), True),
    "per_channel": (dict(mixture_axes="per_channel", momentum=0.5), (8, 4, 4, 3), True),
    "per_channel_first": (dict(mixture_axes="per_channel", axis=1, momentum=0.5),
                          (8, 3, 4, 4), False),
    "dense": (dict(momentum=0.5, epsilon=1e-5), (32, 5), True),
    "two_components": (dict(num_components=2, momentum=0.5), (8, 4, 4, 3), True),
    "one_component": (dict(num_components=1, momentum=0.5), (8, 4, 4, 3), False),
    "no_fisher": (dict(momentum=0.5, fisher_scaling=False), (8, 4, 4, 3), True),
    "warm_moving": (dict(momentum=0.5, warm_start="moving"), (8, 4, 4, 3), True),
    "em_three": (dict(momentum=0.5, em_iterations=3, min_weight=0.05), (8, 4, 4, 3), True),
    "no_affine": (dict(momentum=0.5, center=False, scale=False), (8, 4, 4, 3), True),
    "batch_inference": (dict(momentum=0.5, inference_statistics="batch"), (8, 4, 4, 3), True),
    "synchronized": (dict(momentum=0.5, synchronized=True), (8, 4, 4, 3), True),
    "posterior_gradient": (dict(momentum=0.5, posterior_gradient=True), (4, 3, 3, 3), True),
    "posterior_gradient_per_channel": (
        dict(momentum=0.5, posterior_gradient=True, mixture_axes="per_channel"),
        (4, 3, 3, 2), False),
}
REFERENCE_KEYS = ("num_components", "axis", "mixture_axes", "em_iterations", "momentum",
                  "epsilon", "fisher_scaling", "warm_start", "min_weight",
                  "inference_statistics", "posterior_gradient")


def make_case(name, **overrides):
    kwargs, shape, use_clusters = CONFIGS[name]
    kwargs = {**kwargs, **overrides}
    ref_kwargs = {k: v for k, v in kwargs.items() if k in REFERENCE_KEYS}
    return harness.LayerCase(
        factory=lambda: MixtureNormalization(**kwargs),
        input_shape=shape,
        reference=lambda weights: MixtureNormReference(weights, **ref_kwargs),
        input_fn=clustered(kwargs.get("axis", -1)) if use_clusters else None,
        atol=2e-4, rtol=2e-4,
    )


test_matches_numpy_reference = harness.layer_test(
    harness.check_reference, make_case, sorted(CONFIGS))


test_jit_equals_eager = harness.layer_test(
    harness.check_jit, make_case, ["default", "per_channel_first"])


def test_jit_gradients_equal_eager():
    """Forward + backward (the seeded first step, then a warm-started one) under XLA."""
    case = make_case("default")
    eager = harness.build_randomized(case)
    compiled = harness.clone_layer(case, eager)

    def step(layer, x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * dy)
        return tape.gradient(loss, [x] + layer.trainable_weights)

    jit_step = tf.function(lambda x, dy: step(compiled, x, dy), jit_compile=True)
    rng = np.random.default_rng(0)
    for seed in range(2):
        x = tf.constant(case.inputs(seed))
        dy = tf.constant(rng.normal(size=case.input_shape).astype("float32"))
        for actual, expected in zip(jit_step(x, dy), step(eager, x, dy)):
            harness.assert_close(actual, expected, case, f"jit gradient, step {seed}")


test_serialization_round_trips = harness.layer_test(
    harness.check_serialization, make_case,
    ["default", "per_channel", "batch_inference", "no_fisher"])


test_mixed_precision = harness.layer_test(
    harness.check_mixed_precision, make_case, ["default", "per_channel_first", "synchronized"])


@pytest.mark.parametrize("name", ["synchronized", "per_channel", "posterior_gradient"])
def test_synchronized_equals_one_device(name, mirrored_strategy):
    harness.check_distributed(make_case(name, synchronized=True), mirrored_strategy)


def test_synchronized_batch_statistics_inference(mirrored_strategy):
    case = make_case("synchronized", inference_statistics="batch")
    harness.check_distributed(case, mirrored_strategy, training=False)


# ------------------------------------------------------------ one component = batch norm
@pytest.mark.parametrize("kwargs, shape", [
    ({}, (8, 4, 4, 3)),
    ({"axis": 1, "epsilon": 1e-5}, (8, 3, 4, 4)),
    ({"mixture_axes": "per_channel"}, (16, 5)),
    ({"posterior_gradient": True, "fisher_scaling": False}, (8, 4, 4, 3)),
])
def test_one_component_is_batch_norm(kwargs, shape):
    rng = np.random.default_rng(0)
    bn_kwargs = {k: v for k, v in kwargs.items() if k in ("axis", "epsilon")}
    ours = MixtureNormalization(num_components=1, momentum=0.6, **kwargs)
    theirs = BatchNormalization(momentum=0.6, **bn_kwargs)
    ours.build(shape), theirs.build(shape)
    gamma, beta = rng.uniform(0.5, 1.5, shape[ours._axis]), rng.normal(size=shape[ours._axis])
    for layer in (ours, theirs):
        layer.gamma.assign(gamma.astype("float32")), layer.beta.assign(beta.astype("float32"))
    for step in range(3):
        x = tf.constant(rng.normal(2 + step, 3, shape).astype("float32"))
        dy = tf.constant(rng.normal(size=shape).astype("float32"))
        results = []
        for layer in (ours, theirs):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            results.append((y, *tape.gradient(loss, [x, layer.gamma, layer.beta])))
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours.moving_mean.numpy()[0], theirs.moving_mean.numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(ours.moving_variance.numpy()[0],
                               theirs.moving_variance.numpy(), rtol=1e-5)
    x = rng.normal(1, 2, shape).astype("float32")
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), atol=1e-5)


# --------------------------------------------------------------------------- behaviours
def test_recovers_a_known_mixture_and_keeps_component_identity():
    """Seeding + EM find three modes of anti-correlated channels; warm starts converge."""
    rng = np.random.default_rng(1)
    means = np.array([[-6.0, 3.0], [0.0, 0.0], [5.0, -4.0]])
    stds = np.array([[0.5, 1.0], [1.0, 0.5], [0.8, 0.8]])
    proportions = np.array([0.2, 0.5, 0.3])
    labels = rng.choice(3, size=4096, p=proportions)
    x = (means[labels] + stds[labels] * rng.normal(size=(4096, 2))).astype("float32")
    layer = MixtureNormalization(momentum=0.0)
    layer(x, training=True)
    # The first batch already separates the modes (seed along the principal axis; a seed
    # along the diagonal would put the first and last mode in one component).
    order = np.argsort(layer.moving_mean.numpy()[:, 0])
    np.testing.assert_allclose(layer.moving_mean.numpy()[order], means, atol=2.0)
    for step in range(3):  # warm starts: EM continues where the last batch left off
        layer(rng.permutation(x), training=True)
        np.testing.assert_array_equal(np.argsort(layer.moving_mean.numpy()[:, 0]), order)
    np.testing.assert_allclose(layer.moving_weights.numpy()[order], proportions, atol=0.03)
    np.testing.assert_allclose(layer.moving_mean.numpy()[order], means, atol=0.1)
    np.testing.assert_allclose(layer.moving_variance.numpy()[order], stds ** 2, rtol=0.1)
    assert layer.num_updates.numpy() == 4


def test_per_channel_recovers_different_mixtures_per_channel():
    rng = np.random.default_rng(2)
    a = np.where(rng.random(3000) < 0.5, -3.0, 3.0) + rng.normal(0, 0.5, 3000)
    b = np.where(rng.random(3000) < 0.25, 10.0, 0.0) + rng.normal(0, 1.0, 3000)
    x = np.stack([a, b], axis=1).astype("float32")
    layer = MixtureNormalization(num_components=2, mixture_axes="per_channel", momentum=0.0)
    for _ in range(4):
        layer(x, training=True)
    order = np.argsort(layer.moving_mean.numpy(), axis=0)
    means = np.take_along_axis(layer.moving_mean.numpy(), order, axis=0)
    weights = np.take_along_axis(layer.moving_weights.numpy(), order, axis=0)
    np.testing.assert_allclose(means, [[-3.0, 0.0], [3.0, 10.0]], atol=0.1)
    np.testing.assert_allclose(weights, [[0.5, 0.75], [0.5, 0.25]], atol=0.03)


def test_large_mean_keeps_float32_precision():
    """|mean| / std ~ 1e3: unshifted x^2 sums (1e6 +- 0.06 in float32) would wreck the
    posteriors and the variances; the shifted sufficient statistics keep the fit exact."""
    rng = np.random.default_rng(3)
    x = (1e3 + clustered()(rng, (8, 4, 4, 3))).astype("float32")
    layer = MixtureNormalization(momentum=0.5)
    reference = MixtureNormReference(harness.weights_by_name(_built(layer, x.shape)),
                                     momentum=0.5)
    for step in range(2):
        np.testing.assert_allclose(layer(x, training=True), reference.train(x), atol=1e-3)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               reference.w["moving_variance"], rtol=1e-3)


def _built(layer, shape):
    layer.build(shape)
    return layer


@pytest.mark.parametrize("mixture_axes", ["channels", "per_channel"])
def test_empty_component_keeps_parameters_and_no_nan(mixture_axes):
    """A batch that gives one component nothing: no NaN, the component keeps mean/variance."""
    layer = MixtureNormalization(momentum=0.5, mixture_axes=mixture_axes,
                                 warm_start="moving")
    layer.build((None, 4, 4, 2))
    far = np.array([[-1.0, -1.0], [1.0, 1.0], [1e3, 1e3]], "float32")
    layer.moving_mean.assign(far)
    layer.moving_variance.assign(np.full((3, 2), 0.5, "float32"))
    layer.num_updates.assign(5)
    x = tf.constant(np.random.default_rng(4).normal(0, 1, (4, 4, 4, 2)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
    grads = tape.gradient(y, [x] + layer.trainable_weights)
    assert np.all(np.isfinite(y.numpy()))
    for grad in grads:
        assert np.all(np.isfinite(grad.numpy()))
    np.testing.assert_allclose(layer.moving_mean.numpy()[2], far[2])
    np.testing.assert_allclose(layer.moving_variance.numpy()[2], 0.5)
    weights = np.asarray(layer.moving_weights.numpy())
    assert np.all(weights[2] < 1.0 / 6 + 1e-6)  # halved towards 0 from 1/3


@pytest.mark.parametrize("shape, mixture_axes", [
    ((1, 3), "channels"), ((1, 2, 2, 3), "channels"), ((1, 3), "per_channel"),
    ((2, 1, 1, 4), "per_channel"),
])
def test_tiny_batches_stay_finite(shape, mixture_axes):
    layer = MixtureNormalization(mixture_axes=mixture_axes)
    rng = np.random.default_rng(5)
    for step in range(3):
        x = tf.constant(rng.normal(0, 2, shape).astype("float32"))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * rng.normal(size=shape))
        for value in [y] + tape.gradient(loss, [x] + layer.trainable_weights):
            assert np.all(np.isfinite(value.numpy())), f"step {step}"
    for variable in layer.weights:
        assert np.all(np.isfinite(variable.numpy())), variable.path
    assert np.all(np.isfinite(layer(x, training=False).numpy()))


def test_constant_inputs_stay_finite():
    layer = MixtureNormalization()
    y = layer(np.full((4, 3, 3, 2), 7.0, "float32"), training=True)
    np.testing.assert_allclose(y, 0.0, atol=1e-5)
    assert np.all(np.isfinite(layer.moving_variance.numpy()))


# (mixture_axes, num_components, axis, input shape). Keras's mask layout: the input's shape
# without its last axis, broadcast over the last axis. With axis=1 on (N, C, L) the (N, C) mask
# flags channels (per value: per-channel mixtures and K = 1); with axis=1 on (N, C, H, W) an
# (N, C, 1) mask does not vary along the channels and flags samples.
MASK_LAYOUTS = [
    ("channels", 3, -1, (6, 8, 3)),
    ("per_channel", 3, -1, (6, 8, 3)),
    ("channels", 3, 1, (6, 3, 4, 2)),   # an (N, C, H) mask of size 1 on the channel axis
    ("per_channel", 3, 1, (6, 3, 8)),   # an (N, C) mask flags (example, channel) pairs
    ("per_channel", 3, 1, (6, 3, 4, 2)),
    ("channels", 1, 1, (6, 3, 8)),       # K = 1: batch norm's code, per value
]


def _layout_mask(rng, shape, axis, mixture_axes, num_components):
    mask = rng.random(shape[:-1]) > 0.3
    if axis != -1 and mixture_axes == "channels" and num_components > 1:
        mask = mask[:, :1]  # size 1 on the channel axis: it flags samples
    return mask


@pytest.mark.parametrize("mixture_axes, num_components, axis, shape", MASK_LAYOUTS)
def test_masked_values_do_not_enter_the_fit(mixture_axes, num_components, axis, shape):
    rng = np.random.default_rng(6)
    x = clustered(axis)(rng, shape).astype("float32")
    mask = _layout_mask(rng, shape, axis, mixture_axes, num_components)
    kwargs = dict(momentum=0.5, mixture_axes=mixture_axes, axis=axis,
                  num_components=num_components)
    layer = MixtureNormalization(**kwargs)
    reference = MixtureNormReference(harness.weights_by_name(_built(layer, x.shape)), **kwargs)
    jitted = tf.function(lambda v, m: layer(v, training=True, mask=m), jit_compile=True)
    for step in range(3):
        xs = x * (1 + step)
        call = jitted if step == 2 else (lambda v, m: layer(v, training=True, mask=m))
        np.testing.assert_allclose(call(xs, mask), reference.train(xs, mask), atol=2e-4,
                                   rtol=2e-4)
    for name, value in reference.state().items():
        np.testing.assert_allclose(getattr(layer, name).numpy(), value, atol=2e-4, rtol=2e-4)
    # Changing the masked-out values changes nothing in the statistics (Keras's layout: the
    # mask broadcast over the input's last axis).
    other, first = MixtureNormalization(**kwargs), MixtureNormalization(**kwargs)
    full_mask = np.broadcast_to(mask[..., None], x.shape)
    other(np.where(full_mask, x, 1e3).astype("float32"), training=True, mask=mask)
    first(x, training=True, mask=mask)
    np.testing.assert_allclose(other.moving_mean.numpy(), first.moving_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(other.moving_variance.numpy(), first.moving_variance.numpy(),
                               atol=1e-5)


def test_masked_synchronized_fit_equals_one_device(mirrored_strategy):
    """A channel-flagging mask (Keras's layout, channels first) under MirroredStrategy: the
    synchronized per-channel mixture equals one device on the global batch."""
    rng = np.random.default_rng(8)
    shape = (8, 3, 6)
    x = clustered(1)(rng, shape).astype("float32")
    mask = rng.random(shape[:-1]) > 0.3
    kwargs = dict(momentum=0.5, mixture_axes="per_channel", axis=1)
    single = MixtureNormalization(**kwargs)
    expected = [single(x, training=True, mask=mask).numpy() for _ in range(2)]
    with mirrored_strategy.scope():
        layer = MixtureNormalization(synchronized=True, **kwargs)
        layer.build(shape)
    halves = [(x[:4], mask[:4]), (x[4:], mask[4:])]

    @tf.function
    def step(inputs):
        def replica(values):
            index = tf.distribute.get_replica_context().replica_id_in_sync_group
            v, m = tf.switch_case(index, [lambda h=h: (tf.constant(h[0]), tf.constant(h[1]))
                                          for h in halves])
            return layer(v, training=True, mask=m)
        return mirrored_strategy.run(replica, args=(inputs,))

    for expected_step in expected:
        outputs = step(tf.constant(0.0))
        got = np.concatenate([t.numpy() for t in
                              mirrored_strategy.experimental_local_results(outputs)])
        np.testing.assert_allclose(got, expected_step, atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), single.moving_mean.numpy(),
                               atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(layer.moving_variance.numpy(), single.moving_variance.numpy(),
                               atol=2e-4, rtol=2e-4)


def test_channel_flagging_mask_rejected_by_one_mixture_over_channels():
    layer = MixtureNormalization(axis=1)
    with pytest.raises(ValueError, match=r"mixture_axes='channels'.*must not vary along the "
                                         r"channel axis 1.*mask.shape=\(2, 3\)"):
        layer(np.ones((2, 3, 4), "float32"), training=True, mask=np.ones((2, 3), bool))
    # Inference with the moving mixture does not read the mask, as BatchNormalization.
    y = layer(np.ones((2, 3, 4), "float32"), training=False, mask=np.ones((2, 3), bool))
    assert y.shape == (2, 3, 4)


def test_fully_masked_batch_keeps_moving_statistics():
    layer = MixtureNormalization(momentum=0.0)
    y = layer(np.ones((2, 3, 4), "float32"), training=True, mask=np.zeros((2, 3), bool))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones((3, 4)))
    assert layer.num_updates.numpy() == 0


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
@pytest.mark.parametrize("mixture_axes", ["channels", "per_channel"])
def test_other_dtypes_keep_float32_statistics(dtype, mixture_axes):
    x = clustered()(np.random.default_rng(15), (4, 3, 3, 2))
    layer = MixtureNormalization(dtype=dtype, mixture_axes=mixture_axes, momentum=0.5)
    reference = MixtureNormReference(harness.weights_by_name(_built(layer, x.shape)),
                                     mixture_axes=mixture_axes, momentum=0.5)
    for _ in range(2):
        inputs = tf.constant(x, dtype)
        y = layer(inputs, training=True)
        assert y.dtype == dtype
        expected = reference.train(tf.cast(inputs, tf.float64).numpy())
        atol = 1e-4 if dtype == "float64" else 0.1
        np.testing.assert_allclose(tf.cast(y, tf.float64), expected, atol=atol)
    for variable in (layer.moving_weights, layer.moving_mean, layer.moving_variance):
        assert variable.dtype == "float32", variable.path
    np.testing.assert_allclose(layer.moving_variance.numpy(), reference.w["moving_variance"],
                               atol=1e-5 if dtype == "float64" else 0.05)


def test_inference_leaves_statistics_untouched():
    x = clustered()(np.random.default_rng(7), (8, 4, 4, 3)).astype("float32")
    for statistics in ("moving", "batch"):
        layer = MixtureNormalization(inference_statistics=statistics)
        layer(x, training=True)
        before = [w.numpy().copy() for w in layer.weights]
        layer(x * 2, training=False)
        for a, b in zip(before, layer.weights):
            np.testing.assert_array_equal(a, b.numpy(), err_msg=b.path)


def test_frozen_layer_runs_in_inference_mode():
    x = clustered()(np.random.default_rng(8), (8, 4, 4, 3)).astype("float32")
    layer = MixtureNormalization()
    layer(x, training=True)
    layer.trainable = False
    np.testing.assert_allclose(layer(x, training=True), layer(x, training=False), atol=1e-6)
    assert layer.num_updates.numpy() == 1


def test_batch_inference_seeds_an_untrained_layer_and_warm_starts_a_trained_one():
    x = clustered()(np.random.default_rng(9), (8, 4, 4, 3)).astype("float32")
    layer = MixtureNormalization(inference_statistics="batch", momentum=0.0)
    fresh = MixtureNormalization(momentum=0.0)
    np.testing.assert_allclose(layer(x, training=False), fresh(x, training=True), atol=1e-5)
    layer(x, training=True)
    fresh(x, training=True)
    np.testing.assert_allclose(layer(x, training=False), fresh(x, training=True), atol=1e-5)


def test_momentum_is_read_at_call_time():
    """A tf.Variable momentum (recompute_statistics) drives the EMA inside one traced graph."""
    rng = np.random.default_rng(10)
    xs = [clustered()(rng, (8, 4, 4, 3)).astype("float32") for _ in range(3)]
    layer = MixtureNormalization(momentum=0.9)
    layer(xs[0], training=True)
    layer.momentum = tf.Variable(0.9, trainable=False)
    step = tf.function(lambda x: layer(x, training=True))
    reference = MixtureNormalization(momentum=0.0)
    reference.build(xs[0].shape)
    for x, momentum in zip(xs[1:], (0.5, 0.0)):
        layer.momentum.assign(momentum)
        reference.set_weights(layer.get_weights())
        reference.momentum = momentum
        expected_mean = reference.moving_mean.numpy()
        reference(x, training=True)
        step(tf.constant(x))
        np.testing.assert_allclose(layer.moving_mean.numpy(), reference.moving_mean.numpy(),
                                   atol=1e-5)
        if momentum == 0.5:
            assert not np.allclose(layer.moving_mean.numpy(), expected_mean)


@pytest.mark.parametrize("mixture_axes", ["channels", "per_channel"])
def test_recompute_statistics_averages_the_mixture_and_keeps_num_updates(mixture_axes):
    """Equal-weight average of the per-batch mixtures (warm-started as in training)."""
    rng = np.random.default_rng(16)
    layer = MixtureNormalization(momentum=0.9, mixture_axes=mixture_axes)
    model = keras.Sequential([keras.Input((3, 3, 2)), layer])
    layer(clustered()(rng, (8, 3, 3, 2)).astype("float32"), training=True)
    reference = MixtureNormReference(harness.weights_by_name(layer),
                                     mixture_axes=mixture_axes)
    batches = [clustered()(rng, (8, 3, 3, 2)).astype("float32") for _ in range(3)]
    for i, batch in enumerate(batches):
        reference.momentum = i / (i + 1.0)
        reference.train(batch)
    dataset = tf.data.Dataset.from_tensor_slices(np.concatenate(batches)).batch(8)
    assert recompute_statistics(model, dataset, verbose=0) == 3
    for name in ("moving_weights", "moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(layer, name).numpy(), reference.w[name],
                                   atol=2e-4, rtol=2e-4, err_msg=name)
    assert layer.num_updates.numpy() == 1  # training state, restored after the pass
    assert layer.variance_statistics == ()
    assert MixtureNormalization(num_components=1).variance_statistics == ("moving_variance",)


def test_reloaded_model_keeps_warm_starting(tmp_path):
    """num_updates is saved: after reload, training continues exactly as without the reload."""
    rng = np.random.default_rng(11)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(4, 1),
                              MixtureNormalization(momentum=0.5)])
    x1, x2 = (clustered()(rng, (8, 4, 4, 3)).astype("float32") for _ in range(2))
    model(x1, training=True)
    path = str(tmp_path / "mixture.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[-1].num_updates.numpy() == 1
    np.testing.assert_allclose(loaded(x2, training=True), model(x2, training=True), atol=1e-5)
    harness.assert_weights_close(loaded, model, atol=1e-5)
    # A fresh layer with the same trained weights but num_updates reset would re-seed instead.
    reset = keras.models.load_model(path)
    reset.layers[-1].num_updates.assign(0)
    assert not np.allclose(reset(x2, training=True), loaded(x2, training=True), atol=1e-3)


def test_export_serves_same_outputs(tmp_path):
    rng = np.random.default_rng(12)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(4, 3),
                              MixtureNormalization(axis=-1),
                              keras.layers.Conv2D(2, 1),
                              MixtureNormalization(mixture_axes="per_channel")])
    x = clustered()(rng, (6, 4, 4, 3)).astype("float32")
    model(x, training=True)
    model(x[::-1].copy(), training=True)
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)
    served = loaded.serve(tf.constant(x))
    np.testing.assert_allclose(served, model(x, training=False), atol=1e-5)


def test_synchronized_falls_back_to_local_outside_strategy():
    x = clustered()(np.random.default_rng(13), (8, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(MixtureNormalization(synchronized=True)(x, training=True),
                               MixtureNormalization()(x, training=True), atol=1e-6)


def test_synchronized_uneven_and_empty_replicas(mirrored_strategy):
    """Replicas with 3 + 5 and 0 + 8 examples give the one-device mixture of all 8."""
    x = clustered()(np.random.default_rng(14), (8, 3, 3, 2)).astype("float32")
    single = MixtureNormalization(momentum=0.0)
    expected = single(x, training=True).numpy()
    for split in (3, 0):
        with mirrored_strategy.scope():
            layer = MixtureNormalization(synchronized=True, momentum=0.0)
            layer.build((None, 3, 3, 2))
        parts = [x[:split], x[split:]]
        values = mirrored_strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group]))
        outputs = mirrored_strategy.run(tf.function(lambda t: layer(t, training=True)),
                                        args=(values,))
        y = np.concatenate(mirrored_strategy.experimental_local_results(outputs))
        np.testing.assert_allclose(y, expected, atol=1e-4)
        np.testing.assert_allclose(layer.moving_mean.numpy(), single.moving_mean.numpy(),
                                   atol=1e-4)


# ------------------------------------------------------------------------ training on data
@pytest.mark.slow
def test_small_cnn_trains_on_cifar():
    """Batch sizes 2 and 32, 200 steps each, fixed seed: finite, and the loss goes down.

    One model and one traced step serve both runs (weights and optimizer state are reset in
    between), so the test pays for tracing once.
    """
    data = np.load(CIFAR)
    # x_train is sorted by class: take the first 32 images of each of the 10 classes.
    labels = data["y_train"]
    index = np.concatenate([np.flatnonzero(labels == c)[:32] for c in range(10)])
    images = len(index)
    x = data["x_train"][index].astype("float32") / 255.0
    y = labels[index].astype("int32")
    assert np.all(np.bincount(y, minlength=10) == 32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same"),
        MixtureNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(16, 3, strides=2, padding="same"),
        MixtureNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    optimizer = keras.optimizers.Adam(3e-3)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    initial_weights = model.get_weights()
    initial_slots = [v.numpy() for v in optimizer.variables]

    # XLA works too (test_jit_*), but compiling costs more than these 400 small steps.
    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3]),
                                  tf.TensorSpec([None], tf.int32)])
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    steps = 200
    for batch_size in (2, 32):
        model.set_weights(initial_weights)
        for variable, value in zip(optimizer.variables, initial_slots):
            variable.assign(value)
        order = np.random.default_rng(0).permutation(np.arange(steps * batch_size) % images)
        losses = np.array([
            float(train_step(x[order[i * batch_size:(i + 1) * batch_size]],
                             y[order[i * batch_size:(i + 1) * batch_size]]))
            for i in range(steps)])
        assert np.all(np.isfinite(losses)), f"NaN/inf loss at batch size {batch_size}"
        for variable in model.weights:
            assert np.all(np.isfinite(variable.numpy())), (batch_size, variable.path)
        first, last = losses[:20].mean(), losses[-20:].mean()
        assert last < first, f"batch size {batch_size}: first 20 {first:.3f}, last 20 {last:.3f}"
        assert model.layers[1].num_updates.numpy() == steps


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"num_components": 0}, ValueError,
     r"`num_components` must be >= 1. Received: num_components=0"),
    ({"num_components": True}, TypeError, r"`num_components` must be an integer.*=True"),
    ({"num_components": 2.0}, TypeError, r"num_components=2.0"),
    ({"em_iterations": 0}, ValueError, r"`em_iterations` must be >= 1. Received: em_iterations=0"),
    ({"em_iterations": False}, TypeError, r"em_iterations=False"),
    ({"mixture_axes": "spatial"}, ValueError,
     r"`mixture_axes` must be one of \['channels', 'per_channel'\]. "
     r"Received: mixture_axes='spatial'"),
    ({"warm_start": "kmeans"}, ValueError,
     r"one of \['aligned', 'moving'\]. Received: warm_start='kmeans'"),
    ({"min_weight": 0.0}, ValueError, r"`min_weight` must be in \(0.0, inf\]"),
    ({"min_weight": 0.4}, ValueError,
     r"MixtureNormalization: argument `min_weight` must be below 1 / num_components = "
     r"0.333333.*Received: min_weight=0.4, num_components=3"),
    ({"min_weight": "small"}, TypeError, r"`min_weight` must be a number"),
    ({"fisher_scaling": 1}, TypeError, r"`fisher_scaling` must be a bool. "
                                       r"Received: fisher_scaling=1"),
    ({"posterior_gradient": "yes"}, TypeError, r"`posterior_gradient` must be a bool"),
])
def test_argument_errors(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        MixtureNormalization(**kwargs)


def test_import_does_not_change_backend():
    assert os.environ.get("KERAS_BACKEND", "tensorflow") == keras.backend.backend()
