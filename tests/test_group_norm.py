"""Layer, Group, Instance and RMS normalization against NumPy, against Keras, and their errors."""

import warnings

import harness
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src import backend as keras_backend
from references.group_norm import (GroupNormReference, LayerNormReference,
                                   RMSNormReference)

from keras_norm.layers.group_norm import (GroupNormalization, InstanceNormalization,
                                          LayerNormalization)
from keras_norm.layers.rms_norm import RMSNormalization


def _quiet(cls):
    """A factory that silences the (tested elsewhere) deprecation warning of rms_scaling."""
    def make(**kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)
    return make


# name -> (layer class, kwargs, input shape, reference class, reference kwargs)
CONFIGS = {
    "ln_default": (LayerNormalization, {}, (4, 3, 6), LayerNormReference, {}),
    "ln_dense": (LayerNormalization, dict(epsilon=1e-5), (6, 7), LayerNormReference,
                 dict(epsilon=1e-5)),
    "ln_multi_axis": (LayerNormalization, dict(axis=[1, 2]), (4, 3, 5), LayerNormReference,
                      dict(axis=[1, 2])),
    "ln_image": (LayerNormalization, dict(axis=(-3, -2, -1)), (3, 4, 4, 2),
                 LayerNormReference, dict(axis=(-3, -2, -1))),
    "ln_channels_first": (LayerNormalization, dict(axis=1), (4, 5, 3), LayerNormReference,
                          dict(axis=1)),
    "ln_no_affine": (LayerNormalization, dict(center=False, scale=False), (4, 3, 6),
                     LayerNormReference, {}),
    "ln_rms_scaling": (_quiet(LayerNormalization), dict(rms_scaling=True), (4, 3, 6),
                       LayerNormReference, dict(rms_scaling=True)),
    "gn_default": (GroupNormalization, {}, (2, 3, 3, 64), GroupNormReference, {}),
    "gn_groups": (GroupNormalization, dict(groups=3), (4, 3, 3, 6), GroupNormReference,
                  dict(groups=3)),
    "gn_channels_first": (GroupNormalization, dict(groups=2, axis=1), (4, 6, 3, 3),
                          GroupNormReference, dict(groups=2, axis=1)),
    "gn_sequence": (GroupNormalization, dict(groups=2, epsilon=1e-5), (4, 5, 4),
                    GroupNormReference, dict(groups=2, epsilon=1e-5)),
    "gn_volume": (GroupNormalization, dict(groups=2), (2, 3, 2, 3, 4), GroupNormReference,
                  dict(groups=2)),
    "gn_dense": (GroupNormalization, dict(groups=2), (4, 6), GroupNormReference,
                 dict(groups=2)),
    "gn_one_group": (GroupNormalization, dict(groups=1), (4, 3, 3, 4), GroupNormReference,
                     dict(groups=1)),
    "gn_per_channel": (GroupNormalization, dict(groups=-1), (4, 3, 3, 4), GroupNormReference,
                       dict(groups=-1)),
    "gn_no_affine": (GroupNormalization, dict(groups=2, center=False, scale=False),
                     (4, 3, 3, 4), GroupNormReference, dict(groups=2)),
    "in_default": (InstanceNormalization, {}, (4, 3, 3, 5), GroupNormReference,
                   dict(groups=-1)),
    "in_channels_first": (InstanceNormalization, dict(axis=1), (4, 5, 3, 3),
                          GroupNormReference, dict(groups=-1, axis=1)),
    "rms_default": (RMSNormalization, {}, (4, 3, 6), RMSNormReference, {}),
    "rms_multi_axis": (RMSNormalization, dict(axis=[1, 2], epsilon=1e-3), (4, 3, 5),
                       RMSNormReference, dict(axis=[1, 2], epsilon=1e-3)),
    "rms_channels_first": (RMSNormalization, dict(axis=1), (4, 5, 3), RMSNormReference,
                           dict(axis=1)),
}
# One representative of each layer and layout for the slower checks.
MAIN = ["ln_default", "ln_multi_axis", "ln_channels_first", "ln_rms_scaling", "gn_groups",
        "gn_channels_first", "gn_per_channel", "in_default", "in_channels_first",
        "rms_default", "rms_channels_first"]


def make_case(name):
    cls, kwargs, shape, reference, ref_kwargs = CONFIGS[name]
    return harness.LayerCase(
        factory=lambda: cls(**kwargs),
        input_shape=shape,
        reference=lambda weights: reference(weights, **ref_kwargs),
        batch_dependent=False,
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_numpy_reference(name):
    """Outputs (training = inference) and input gradients match the paper's equations."""
    harness.check_reference(make_case(name))


test_jit_equals_eager = harness.layer_test(
    harness.check_jit, make_case, MAIN + ["gn_volume", "gn_dense"])


test_serialization_round_trips = pytest.mark.filterwarnings("ignore:.*rms_scaling=True")(
    harness.layer_test(harness.check_serialization, make_case, MAIN))


test_mixed_precision = harness.layer_test(harness.check_mixed_precision, make_case, MAIN)


def test_per_example_layers_are_replica_independent(mirrored_strategy):
    """Under MirroredStrategy outputs and (summed) gradients equal one device's."""
    harness.check_distributed(make_case("gn_groups"), mirrored_strategy)


def test_statistics_are_exact_when_mean_dominates():
    """|mean| >> std: two-pass float32 moments keep the variance; E[x^2]-E[x]^2 loses it.

    The remaining error is float32's resolution of the inputs themselves (ulp(1e4) ~ 1e-3).
    """
    rng = np.random.default_rng(7)
    x = (1e4 + rng.normal(0, 1.0, (2, 4, 4, 4))).astype("float32")
    expected = GroupNormReference({}, groups=2, epsilon=1e-6).apply(x)
    layer = GroupNormalization(groups=2, epsilon=1e-6, center=False, scale=False)
    np.testing.assert_allclose(layer(x), expected, atol=3e-3)
    grouped = tf.reshape(x, (2, 4, 4, 2, 2))
    mean = tf.reduce_mean(grouped, (1, 2, 4), keepdims=True)
    naive_var = tf.reduce_mean(tf.square(grouped), (1, 2, 4), keepdims=True) - tf.square(mean)
    naive = tf.reshape((grouped - mean) * tf.math.rsqrt(tf.nn.relu(naive_var) + 1e-6), x.shape)
    assert np.max(np.abs(naive - expected)) > 0.1, "the naive formula became exact?"


def test_reference_detects_wrong_grouping():
    """Guards the reference: interleaved groups (channel c in group c % G) must differ."""
    x = np.random.default_rng(8).normal(size=(2, 3, 3, 4)).astype("float32")
    interleaved = x[..., [0, 2, 1, 3]]
    y = GroupNormalization(groups=2)(interleaved).numpy()[..., [0, 2, 1, 3]]
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(y, GroupNormReference({}, groups=2).apply(x), atol=1e-3)


# ------------------------------------------------------------------------------ Keras parity
KERAS_PARITY = [
    (LayerNormalization, keras.layers.LayerNormalization, {}, (4, 3, 6)),
    (LayerNormalization, keras.layers.LayerNormalization, dict(axis=[1, 2]), (4, 3, 6)),
    (LayerNormalization, keras.layers.LayerNormalization, dict(axis=1, epsilon=1e-5),
     (4, 6, 3)),
    (LayerNormalization, keras.layers.LayerNormalization, dict(center=False), (4, 6)),
    (LayerNormalization, keras.layers.LayerNormalization, dict(rms_scaling=True), (4, 3, 6)),
    (GroupNormalization, keras.layers.GroupNormalization, {}, (2, 3, 3, 64)),
    (GroupNormalization, keras.layers.GroupNormalization, dict(groups=2), (4, 3, 3, 6)),
    (GroupNormalization, keras.layers.GroupNormalization, dict(groups=-1, scale=False),
     (4, 5, 6)),
    (GroupNormalization, keras.layers.GroupNormalization, dict(groups=3, axis=1),
     (4, 6, 3, 3)),
    (RMSNormalization, keras.layers.RMSNormalization, {}, (4, 3, 6)),
    (RMSNormalization, keras.layers.RMSNormalization, dict(axis=[1, 2], epsilon=1e-3),
     (4, 3, 6)),
]


def _weight_layout(layer):
    return [(harness.weight_name(w), tuple(w.shape)) for w in layer.weights]


@pytest.mark.parametrize("ours_cls, keras_cls, kwargs, shape", KERAS_PARITY)
def test_same_weights_outputs_and_gradients_as_keras(ours_cls, keras_cls, kwargs, shape):
    x = tf.constant(np.random.default_rng(0).normal(2, 3, shape).astype("float32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_scaling=True is deprecated in both
        ours, theirs = ours_cls(**kwargs), keras_cls(**kwargs)
    harness.build_randomized(harness.LayerCase(lambda: ours, shape), layer=ours)
    theirs.build(shape)
    assert _weight_layout(ours) == _weight_layout(theirs)
    theirs.set_weights(ours.get_weights())
    with tf.GradientTape(persistent=True) as tape, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras's op warns about rms_scaling on every call
        tape.watch(x)
        y_ours, y_theirs = ours(x), theirs(x)
        loss_ours = tf.reduce_sum(y_ours * tf.sin(x))
        loss_theirs = tf.reduce_sum(y_theirs * tf.sin(x))
    np.testing.assert_allclose(y_ours, y_theirs, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(loss_ours, x), tape.gradient(loss_theirs, x),
                               atol=1e-4)
    for a, b in zip(tape.gradient(loss_ours, ours.weights),
                    tape.gradient(loss_theirs, theirs.weights)):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("ours_cls, keras_cls", [
    (LayerNormalization, keras.layers.LayerNormalization),
    (GroupNormalization, keras.layers.GroupNormalization),
    (RMSNormalization, keras.layers.RMSNormalization),
])
def test_same_defaults_as_keras_and_keras_configs_load(ours_cls, keras_cls):
    ours, theirs = ours_cls().get_config(), keras_cls().get_config()
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        if key != "name":
            assert ours[key] == value, key
    # Keras rewrites its config in build (axis -> [-1], groups -> channels): still loads.
    keras_layer = keras_cls(groups=-1) if keras_cls is keras.layers.GroupNormalization else \
        keras_cls()
    keras_layer.build((2, 3, 8))
    restored = ours_cls.from_config(keras_layer.get_config())
    restored.build((2, 3, 8))
    restored.set_weights(keras_layer.get_weights())
    x = np.random.default_rng(1).normal(size=(2, 3, 8)).astype("float32")
    np.testing.assert_allclose(restored(x), keras_layer(x), atol=1e-5)


def test_config_is_not_rewritten_by_build():
    """Keras rewrites LN's axis, GN's groups and RMS's axis in build; we never do."""
    for layer, key, value in [(LayerNormalization(), "axis", -1),
                              (GroupNormalization(groups=-1), "groups", -1),
                              (RMSNormalization(), "axis", -1),
                              (LayerNormalization(axis=(2, 1)), "axis", [2, 1])]:
        layer.build((2, 3, 4))
        assert layer.get_config()[key] == value
    assert "groups" not in InstanceNormalization().get_config()
    config = GroupNormalization(groups=np.int64(2), axis=np.int32(1)).get_config()
    assert (type(config["groups"]), type(config["axis"])) == (int, int)  # JSON-safe


@pytest.mark.parametrize("ours_cls, keras_cls, kwargs", [
    (GroupNormalization, keras.layers.GroupNormalization, dict(groups=4)),
    (LayerNormalization, keras.layers.LayerNormalization, {}),
    (RMSNormalization, keras.layers.RMSNormalization, {}),
])
def test_keras_weights_load_unchanged(tmp_path, ours_cls, keras_cls, kwargs):
    def model(norm):
        return keras.Sequential([keras.Input((5, 5, 3)), keras.layers.Conv2D(8, 3), norm])

    x = np.random.default_rng(2).normal(size=(2, 5, 5, 3)).astype("float32")
    theirs = model(keras_cls(**kwargs))
    for variable in theirs.layers[-1].weights:
        variable.assign(np.random.default_rng(3).normal(size=variable.shape))
    path = str(tmp_path / "keras.weights.h5")
    theirs.save_weights(path)
    ours = model(ours_cls(**kwargs))
    ours.load_weights(path)
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)


def test_channels_first_equals_channels_last():
    x = np.random.default_rng(4).normal(size=(2, 4, 4, 6)).astype("float32")
    first = np.transpose(x, (0, 3, 1, 2))
    for last_layer, first_layer in [
        (GroupNormalization(groups=3), GroupNormalization(groups=3, axis=1)),
        (InstanceNormalization(), InstanceNormalization(axis=1)),
        (LayerNormalization(), LayerNormalization(axis=1)),
        (RMSNormalization(), RMSNormalization(axis=-3)),
    ]:
        np.testing.assert_allclose(np.transpose(first_layer(first), (0, 2, 3, 1)),
                                   last_layer(x), atol=1e-5)


def test_rms_scale_follows_a_leading_axis():
    """Keras multiplies `scale` against the trailing axes (wrong shape for axis=1); ours not."""
    layer = RMSNormalization(axis=1)
    layer.build((2, 3, 5))
    layer.scale.assign([1.0, 2.0, 3.0])
    x = np.ones((2, 3, 5), "float32")
    expected = np.broadcast_to(np.array([1.0, 2.0, 3.0])[:, None], (2, 3, 5)) / np.sqrt(1 + 1e-6)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6)


def test_layer_norm_accepts_inputs_of_another_rank():
    """As Keras's: built on (B, C), a negative axis also normalizes (B, T, C) inputs."""
    layer = LayerNormalization()
    layer.build((None, 6))
    x = np.random.default_rng(5).normal(size=(2, 3, 6)).astype("float32")
    reference = LayerNormReference({k: w.numpy() for k, w in
                                    [("gamma", layer.gamma), ("beta", layer.beta)]})
    np.testing.assert_allclose(layer(x), reference.apply(x), atol=1e-5)


def test_rms_scaling_is_deprecated():
    with pytest.warns(UserWarning, match="rms_scaling=True` is deprecated"):
        LayerNormalization(rms_scaling=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerNormalization(rms_scaling=False)
    layer = _quiet(LayerNormalization)(rms_scaling=True, scale=False, center=True)
    layer.build((2, 4))
    assert [harness.weight_name(w) for w in layer.weights] == ["gamma"]  # as Keras


# ---------------------------------------------------------------------------------- masks
def test_mask_is_passed_on():
    inputs = keras.Input((None, 4))
    x = keras.layers.Masking()(inputs)
    for layer in (GroupNormalization(groups=2), InstanceNormalization(), LayerNormalization(),
                  RMSNormalization()):
        x = layer(x)
        assert keras_backend.get_keras_mask(x) is not None, layer.name


def test_feature_axis_mask_changes_nothing():
    """A (batch, time) mask cannot change per-position statistics: outputs equal Keras's."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    mask = rng.random((3, 5)) > 0.5
    for ours, theirs in [(LayerNormalization(), keras.layers.LayerNormalization()),
                         (RMSNormalization(), keras.layers.RMSNormalization())]:
        # Keras's layers take no mask argument: they never use it.
        np.testing.assert_allclose(ours(x, mask=mask), theirs(x), atol=1e-5)


MASKED = [
    # (layer factory, reference, input shape, mask shape). Keras's layout: the mask covers the
    # input's leading axes (rank ndim - 1: all but the last) and is broadcast over the rest.
    (lambda: GroupNormalization(groups=2), GroupNormReference({}, groups=2), (3, 6, 4), (3, 6)),
    # Channels first: the (N, C) mask flags channels (broadcast over the last axis), and the
    # flagged channels leave their group's statistics.
    (lambda: GroupNormalization(groups=2, axis=1), GroupNormReference({}, groups=2, axis=1),
     (3, 4, 6), (3, 4)),
    (lambda: GroupNormalization(groups=2, axis=1), GroupNormReference({}, groups=2, axis=1),
     (3, 4, 5, 2), (3, 4, 5)),
    (lambda: GroupNormalization(groups=2, axis=2), GroupNormReference({}, groups=2, axis=2),
     (3, 5, 4, 2), (3, 5, 4)),
    (lambda: GroupNormalization(groups=2, axis=1), GroupNormReference({}, groups=2, axis=1),
     (3, 4, 6), (3,)),  # a (batch,) prefix: fully masked examples only
    (lambda: GroupNormalization(groups=2), GroupNormReference({}, groups=2), (3, 4, 3, 4),
     (3, 4)),  # a (batch, time) prefix of a (batch, time, width, channels) input
    (lambda: InstanceNormalization(), GroupNormReference({}, groups=-1), (3, 4, 3, 2),
     (3, 4, 3)),
    (lambda: InstanceNormalization(axis=1), GroupNormReference({}, groups=-1, axis=1),
     (3, 2, 4, 3), (3, 2, 4)),
    (lambda: LayerNormalization(axis=[1, 2]), LayerNormReference({}, axis=[1, 2]), (3, 6, 4),
     (3, 6)),
    (lambda: LayerNormalization(axis=1), LayerNormReference({}, axis=1), (3, 6, 4), (3, 6)),
    (lambda: RMSNormalization(axis=[1, 2]), RMSNormReference({"scale": 1.0}, axis=[1, 2]),
     (3, 6, 4), (3, 6)),
    (lambda: RMSNormalization(axis=1), RMSNormReference({"scale": 1.0}, axis=1), (3, 6, 4),
     (3, 6)),
]


@pytest.mark.parametrize("factory, reference, shape, mask_shape", MASKED)
def test_masked_values_leave_the_statistics(factory, reference, shape, mask_shape):
    rng = np.random.default_rng(9)
    x = rng.normal(1, 2, shape).astype("float32")
    mask = rng.random(mask_shape) > 0.4
    mask[0] = False  # a fully masked example normalizes with all its values
    mask[1] = True
    layer = factory()
    expected = reference.apply(x, mask)
    np.testing.assert_allclose(layer(x, mask=mask), expected, atol=1e-4)
    np.testing.assert_allclose(layer(x, mask=np.ones(mask_shape, bool)), layer(x), atol=1e-5)
    jitted = tf.function(lambda x, m: layer(x, mask=m), jit_compile=True)
    np.testing.assert_allclose(jitted(x, mask), expected, atol=1e-4)


def test_group_norm_ignores_padding_values():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 7, 4)).astype("float32")
    mask = np.ones((2, 7), bool)
    mask[:, 5:] = False
    padded = x.copy()
    padded[:, 5:] = 1e3
    layer = GroupNormalization(groups=2)
    np.testing.assert_allclose(layer(padded, mask=mask)[:, :5], layer(x[:, :5]), atol=1e-5)


# --------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls, kwargs, error, match", [
    (GroupNormalization, dict(groups=True), TypeError,
     r"GroupNormalization: argument `groups` must be an integer.*Received: groups=True"),
    (GroupNormalization, dict(groups=2.0), TypeError, r"`groups` must be an integer.*2\.0"),
    (GroupNormalization, dict(groups="4"), TypeError, r"`groups` must be an integer"),
    (GroupNormalization, dict(groups=0), ValueError,
     r"`groups` must be a positive integer, or -1 .*Received: groups=0"),
    (GroupNormalization, dict(groups=-2), ValueError, r"Received: groups=-2"),
    (InstanceNormalization, dict(groups=4), TypeError,
     r"InstanceNormalization: argument `groups` is not accepted.*Received: groups=4"),
    (LayerNormalization, dict(axis=True), TypeError,
     r"LayerNormalization: Expected an int or a list/tuple of ints for the argument 'axis'"
     r".*Received: axis=True"),
    (LayerNormalization, dict(axis=[1, True]), TypeError, r"a non-empty one, without bools"),
    (LayerNormalization, dict(axis=[]), TypeError, r"a non-empty one, without bools"),
    (LayerNormalization, dict(axis=1.0), TypeError, r"Received: axis=1\.0"),
    (LayerNormalization, dict(rms_scaling="yes"), TypeError,
     r"argument `rms_scaling` must be a bool"),
    (RMSNormalization, dict(axis="last"), TypeError,
     r"RMSNormalization: Expected an int or a list/tuple of ints for the argument 'axis'"),
])
def test_constructor_errors(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("layer, shape, match", [
    (lambda: GroupNormalization(groups=4), (2, 5, 6),
     r"the number of channels \(6\) must be divisible by groups \(4\) .*must be a multiple of "
     r"the number of channels \(6\)\"\)\. Received: groups=4"),
    (lambda: GroupNormalization(groups=8), (2, 5, 6),
     r"Number of groups \(8\) cannot be more than the number of channels \(6\): the number of "
     r"channels \(6\) must be divisible by groups \(8\)"),
    (lambda: GroupNormalization(), (2, 5, 48),
     r"the number of channels \(48\) must be divisible by groups \(32\)"),
    (lambda: GroupNormalization(groups=2, axis=1), (2, None, 4),
     r"Axis 1 of input tensor should have a defined dimension.*\(2, None, 4\)"),
    (lambda: GroupNormalization(groups=2, axis=3), (2, 5, 6), r"axis 3 is out of range"),
    (lambda: GroupNormalization(groups=1), (6,),
     r"axis 0 is the batch axis and cannot be the channel axis"),
    (lambda: InstanceNormalization(axis=-4), (2, 5, 6), r"axis -4 is out of range"),
    (lambda: LayerNormalization(axis=3), (2, 5, 6),
     r"LayerNormalization layer .*axis 3 is out of range for an input of rank 3"),
    (lambda: LayerNormalization(axis=[1, -2]), (2, 5, 6), r"repeats an axis"),
    (lambda: LayerNormalization(axis=[1, 2]), (2, None, 6),
     r"normalized axes \[1, 2\] of the input must have known sizes"),
    (lambda: RMSNormalization(axis=-3), (5, 6), r"axis -3 is out of range"),
    (lambda: RMSNormalization(), (2, None), r"must have known sizes"),
])
def test_build_errors(layer, shape, match):
    with pytest.raises(ValueError, match=match):
        layer().build(shape)


@pytest.mark.parametrize("layer, shape, mask_shape", [
    (lambda: GroupNormalization(groups=2), (2, 4, 6), (2, 4, 6, 1)),
    (lambda: GroupNormalization(groups=2, axis=1), (2, 4, 3, 6), (2, 4, 3, 6)),
    (lambda: GroupNormalization(groups=2), (2, 4, 6), ()),
    (lambda: LayerNormalization(), (2, 4, 6), (2, 4, 6, 1)),
    (lambda: RMSNormalization(axis=1), (2, 4, 6), (2, 4, 6)),
])
def test_mask_shape_errors(layer, shape, mask_shape):
    with pytest.raises(ValueError, match=r"The mask provided should be one dimension less "
                                         r"than the inputs, or a prefix.*Received: mask.shape="):
        layer()(np.zeros(shape, "float32"), mask=np.ones(mask_shape, bool))


def test_wrong_channel_count_after_build():
    layer = GroupNormalization(groups=2)
    layer.build((None, 3, 4))
    with pytest.raises(ValueError, match=r"expected axis 2 of input shape to have value 4"):
        layer(np.zeros((2, 3, 6), "float32"))
