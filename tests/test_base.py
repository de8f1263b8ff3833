"""The mechanism every layer shares (keras_norm/layers/base.py), checked on every layer that uses
it: argument checks, the channel axis resolved in `build`, Keras's mask layout."""

import inspect

import keras
import numpy as np
import pytest

import keras_norm
from keras_norm.layers import base

LAYERS = [getattr(keras_norm, name) for name in keras_norm.layers.__all__]
CHANNELWISE = [cls for cls in LAYERS if issubclass(cls, base.ChannelwiseNormalization)]
PER_EXAMPLE = [cls for cls in CHANNELWISE if cls.per_example]


def make(cls, **kwargs):
    """A layer of `cls` with `kwargs`, plus the positional arguments some classes need."""
    if cls is keras_norm.CrossIterationBatchNormalization:
        return cls(keras.layers.Dense(4), **kwargs)
    if issubclass(cls, keras.layers.Conv2D):
        return cls(4, 3, **kwargs)  # filters, kernel_size
    return cls(**kwargs)


def accepts(cls, argument):
    return argument in inspect.signature(cls.__init__).parameters


# (argument, value, error class, message fragment after "<class name>: ")
ARGUMENT_ERRORS = [
    ("momentum", 1.5, ValueError, r"argument `momentum` must be in \[0.0, 1.0\]. "
                                  r"Received: momentum=1.5"),
    ("momentum", -0.1, ValueError, r"Received: momentum=-0.1"),
    ("momentum", "0.9", TypeError, r"`momentum` must be a number. Received: momentum='0.9'"),
    ("epsilon", 0.0, ValueError, r"argument `epsilon` must be in \(0.0, inf\]. "
                                 r"Received: epsilon=0.0"),
    ("epsilon", -1e-5, ValueError, r"Received: epsilon=-1e-05"),
    ("epsilon", True, TypeError, r"`epsilon` must be a number. Received: epsilon=True"),
    ("center", 1, TypeError, r"argument `center` must be a bool. Received: center=1"),
    ("scale", "yes", TypeError, r"argument `scale` must be a bool. Received: scale='yes'"),
    ("synchronized", None, TypeError,
     r"`synchronized` must be a bool. Received: synchronized=None"),
    ("inference_statistics", "population", ValueError,
     r"one of \['moving', 'batch'\]. Received: inference_statistics='population'"),
    ("beta_initializer", "nope", ValueError, r"nope"),
]
ARGUMENT_CASES = [(cls, *error) for cls in LAYERS for error in ARGUMENT_ERRORS
                  if accepts(cls, error[0])]


@pytest.mark.parametrize("cls, argument, value, error, fragment", ARGUMENT_CASES,
                         ids=lambda value: getattr(value, "__name__", None))
def test_argument_errors_name_the_layer_argument_and_value(cls, argument, value, error,
                                                           fragment):
    prefix = "" if argument.endswith("_initializer") else f"{cls.__name__}: .*"
    with pytest.raises(error, match=prefix + fragment):
        make(cls, **{argument: value})


def test_every_layer_has_some_shared_argument_checked():
    checked = {case[0] for case in ARGUMENT_CASES}
    assert checked == set(LAYERS) - {keras_norm.CenteredConv2D}, set(LAYERS) - checked


@pytest.mark.parametrize("cls", CHANNELWISE)
@pytest.mark.parametrize("axis", [True, 1.0, [1, 2]])
def test_channel_axis_must_be_one_integer(cls, axis):
    with pytest.raises(TypeError, match=rf"{cls.__name__}: argument `axis` must be an integer"
                                        rf".*Received: axis={axis!r}".replace("[", r"\[")):
        cls(axis=axis)


@pytest.mark.parametrize("cls", CHANNELWISE)
def test_axis_out_of_range_names_layer_and_shape(cls):
    layer = cls(axis=4, name="norm7")
    with pytest.raises(base.AxisError, match=r"'norm7'.*axis 4 is out of range for an input "
                                             r"of rank 2 \(shape \(2, 3\)\)"):
        layer.build((2, 3))


@pytest.mark.parametrize("cls", CHANNELWISE)
def test_unknown_channel_count(cls):
    with pytest.raises(ValueError, match=r"'norm8'.*the channel axis -1 of the input must have "
                                         r"a known size. Received: input_shape=\(2, 5, None\)"):
        cls(name="norm8").build((2, 5, None))


@pytest.mark.parametrize("cls", PER_EXAMPLE)
def test_per_example_layers_reject_the_batch_axis(cls):
    with pytest.raises(ValueError, match=r"axis 0 is the batch axis and cannot be the channel "
                                         r"axis. Received: axis=0"):
        cls(axis=0).build((2, 3, 4))
    with pytest.raises(ValueError, match=r"rank >= 2.*Received: input_shape=\(4,\)"):
        cls().build((4,))


def test_batch_normalizations_accept_channels_on_axis_0():
    for cls in set(CHANNELWISE) - set(PER_EXAMPLE):
        layer = cls(axis=0)
        layer.build((3, 5))
        assert layer._param_shape == [3, 1] and layer._reduction_axes == [1], cls


@pytest.mark.parametrize("cls, kwargs", [
    (keras_norm.BatchNormalization, {}),
    (keras_norm.MixtureNormalization, {}),
    (keras_norm.CrossIterationBatchNormalization, {}),
    (keras_norm.GroupNormalization, {"groups": 2}),
    (keras_norm.LayerNormalization, {}),
    (keras_norm.RMSNormalization, {}),
], ids=lambda value: getattr(value, "__name__", ""))
def test_mask_of_the_input_rank_is_an_error(cls, kwargs):
    """Keras's layout is the input's shape without its last axis (or, for per-example norms,
    a shorter prefix of it): a mask of the input's own rank is rejected with Keras's words."""
    with pytest.raises(ValueError, match=r"The mask provided should be one dimension less "
                                         r"than the inputs.*mask.shape=\(2, 3, 4\)"):
        make(cls, **kwargs)(np.ones((2, 3, 4), "float32"), training=True,
                            mask=np.ones((2, 3, 4), bool))


def test_mask_that_flags_channels_rejected_where_channels_share_a_count():
    x = np.ones((2, 3, 4), "float32")
    with pytest.raises(ValueError, match=r"'m': reason here, so the mask must not vary along "
                                         r"the channel axis 1.*Received: mask.shape=\(2, 3\)"):
        base.expand_mask("'m'", np.ones((2, 3), bool), x, channel_axis=1,
                         channels_reason="reason here")
    flags = base.expand_mask("'m'", np.ones((2, 1), bool), x, channel_axis=1,
                             channels_reason="reason here")
    assert tuple(flags.shape) == (2, 1, 1)
