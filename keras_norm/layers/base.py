"""What keras_norm's layers share: argument checks, the affine part, axes and config.

Keras copies the same gamma/beta set-up, `compute_output_shape` and `get_config` into every
normalization file; here they live once. Derived values (canonical axes, adapted group counts)
are kept in private attributes so that `get_config()` always returns the user's arguments.
"""

import numbers

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from keras_norm import stats

INFERENCE_STATISTICS = ("moving", "batch")


# ----------------------------------------------------------------------------- argument checks
class ArgumentTypeError(TypeError, ValueError):
    """A layer argument of the wrong type: both a `TypeError` and a `ValueError`.

    Keras is not consistent about the class: `GroupNormalization(groups=1.5)` raises
    `ValueError`, `LayerNormalization(axis={})` raises `TypeError`, `BatchNormalization`'s
    `int(axis)` raises either. Deriving from both (as NumPy's `AxisError` derives from
    `ValueError` and `IndexError`) means code that catches Keras's class for an argument also
    catches ours, whichever it is; value errors (right type, bad value) are `ValueError`.
    """


class AxisError(ValueError, IndexError):
    """An axis out of range for the input: a `ValueError` and an `IndexError`.

    Keras's normalization layers raise `IndexError` for it in `build` (indexing the input
    shape) and `ValueError` in `compute_output_shape`; like NumPy's `AxisError` (also both),
    this one is caught by either.
    """


def _received(name, value):
    return f"Received: {name}={value!r}"


def check_bool(owner, name, value):
    """Returns `value` if it is a Python bool, else raises `ArgumentTypeError`."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(
            f"{owner}: argument `{name}` must be a bool. {_received(name, value)}")
    return value


def check_int(owner, name, value, minimum=None, allow_none=False):
    """Returns `value` as int; rejects bools, non-integers and values below `minimum`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(
            f"{owner}: argument `{name}` must be an integer"
            f"{' or None' if allow_none else ''}. {_received(name, value)}"
        )
    if minimum is not None and value < minimum:
        raise ValueError(
            f"{owner}: argument `{name}` must be >= {minimum}. {_received(name, value)}"
        )
    return int(value)


def check_float(owner, name, value, low=None, high=None, low_open=False, high_open=False):
    """Returns `value` as float, checking it lies in the interval given (open or closed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"{owner}: argument `{name}` must be a number. {_received(name, value)}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high or value != value:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        low_text, high_text = ("-inf" if low is None else low), ("inf" if high is None else high)
        interval = f"{left}{low_text}, {high_text}{right}"
        raise ValueError(
            f"{owner}: argument `{name}` must be in {interval}. {_received(name, value)}"
        )
    return value


def check_choice(owner, name, value, choices):
    """Returns `value` if it is one of `choices` (strings), else raises `ValueError`."""
    if value not in choices:
        raise ValueError(
            f"{owner}: argument `{name}` must be one of {list(choices)}. "
            f"{_received(name, value)}"
        )
    return value


def _axis_type_message(owner, axis):
    # Keras's wording (its own tests match it), then ours.
    return (f"{owner}: Expected an int or a list/tuple of ints for the argument 'axis' (a "
            f"non-empty one, without bools). {_received('axis', axis)}")


def check_axis_argument(owner, axis):
    """Accepts an int or a non-empty list/tuple of ints (no bools); returns int or tuple."""
    if isinstance(axis, (list, tuple)):
        if not axis or any(isinstance(a, bool) or not isinstance(a, numbers.Integral)
                           for a in axis):
            raise ArgumentTypeError(_axis_type_message(owner, axis))
        return tuple(int(a) for a in axis)
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ArgumentTypeError(_axis_type_message(owner, axis))
    return int(axis)


def check_channel_axis(owner, axis):
    """Returns the channel axis as an int; it must be a single integer (not a bool or list)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ArgumentTypeError(
            f"{owner}: argument `axis` must be an integer (the channel axis). "
            f"Received: axis={axis!r}"
        )
    return int(axis)


def channel_axis(owner, axis, input_shape):
    """`(non-negative channel axis, channel count)` of `input_shape`; the size must be known."""
    (positive,) = canonical_axes(owner, axis, input_shape)
    channels = input_shape[positive]
    if channels is None:
        # Keras's wording (its own tests match it).
        raise ValueError(
            f"{owner}: Axis {axis} of input tensor should have a defined dimension but the "
            f"layer received an input with shape {tuple(input_shape)}: the channel axis {axis} "
            f"of the input must have a known size. Received: input_shape={tuple(input_shape)}"
        )
    return positive, channels


def per_example_channel_axis(owner, axis, input_shape):
    """`channel_axis` for layers whose axis 0 is the examples: axis 0 is rejected first."""
    (positive,) = canonical_axes(owner, axis, input_shape)
    if positive == 0:
        raise ValueError(
            f"{owner}: axis 0 is the batch axis and cannot be the channel axis. "
            f"Received: axis={axis}, input_shape={tuple(input_shape)}"
        )
    return channel_axis(owner, axis, input_shape)


def canonical_axes(owner, axis, input_shape):
    """Maps `axis` (int or tuple) to sorted non-negative axes of `input_shape`, validated."""
    ndim = len(input_shape)
    axes = axis if isinstance(axis, tuple) else (axis,)
    for a in axes:
        if not -ndim <= a < ndim:
            raise AxisError(
                f"{owner}: axis {a} is out of range for an input of rank {ndim} "
                f"(shape {tuple(input_shape)}). {_received('axis', axis)}"
            )
    positive = sorted({a % ndim for a in axes})
    if len(positive) != len(axes):
        raise ValueError(f"{owner}: argument `axis` repeats an axis. {_received('axis', axis)}")
    return positive


def broadcast_shape(ndim, axes, input_shape):
    """Shape `[1, .., C_a, .., 1]` that a parameter over `axes` broadcasts with."""
    shape = [1] * ndim
    for a in axes:
        shape[a] = input_shape[a]
    return shape


# -------------------------------------------------------------------------------------- masks
def expand_mask(owner, mask, x, allow_prefix=False):
    """Keras's mask as a float 0/1 tensor of the rank of `x`, to broadcast against `x`.

    Keras's layout (`keras.layers.BatchNormalization._moments`, and what `Masking` and
    `Embedding` produce): the mask has the input's shape without its LAST axis, covers the
    input's leading axes and is broadcast over the last one, whichever axis holds the
    channels. With channels last that is one flag per position; with a channels-first
    `(N, C, L)` input the `(N, C)` mask flags (example, channel) pairs and is broadcast over
    `L`. Size-1 axes broadcast. Non-zero values count as valid, as Keras casts the mask to bool.

    Args:
        owner: Layer description for error messages.
        mask: `None` or a tensor of rank `ndim - 1` (the input's rank minus one).
        x: The input tensor (its dtype is the result's).
        allow_prefix: Also accept lower ranks `1 .. ndim - 2`: a prefix of the input's shape,
            broadcast over the remaining axes (e.g. `(batch, time)` for `(batch, time, h, w, c)`).

    Returns:
        `None`, or the mask with size-1 axes appended up to the rank of `x`.
    """
    if mask is None:
        return None
    ndim, rank = len(x.shape), len(mask.shape)
    if not (rank == ndim - 1 or (allow_prefix and 1 <= rank < ndim - 1)):
        allowed = ("one dimension less than the inputs, or a prefix of their shape"
                   if allow_prefix else "one dimension less than the inputs")
        # Keras's wording first ("The mask provided should be one dimension less ...").
        raise ValueError(
            f"{owner}: The mask provided should be {allowed} (Keras's layout: the input's "
            f"shape without its last axis). Received: mask.shape={tuple(mask.shape)}, "
            f"inputs.shape={tuple(x.shape)}"
        )
    for axis, (size, input_size) in enumerate(zip(mask.shape, x.shape)):
        if size not in (None, 1) and input_size is not None and size != input_size:
            # Caught here, where a broadcast would fail later with a shape error naming no
            # layer; typically a mask laid out without the channel axis, not Keras's layout.
            raise ValueError(
                f"{owner}: the mask's axis {axis} has size {size} but the input's has "
                f"{input_size}. Keras's mask layout is the input's shape without its LAST axis "
                f"(whatever the channel axis), size-1 axes broadcasting. "
                f"Received: mask.shape={tuple(mask.shape)}, inputs.shape={tuple(x.shape)}"
            )
    mask = tf.cast(tf.cast(mask, tf.bool), x.dtype)
    for _ in range(ndim - rank):  # expand_dims keeps the static shape (a reshape may not)
        mask = tf.expand_dims(mask, -1)
    return mask


def mask_varies_along(mask, axis):
    """Whether a mask from `expand_mask` may take different values along `axis` (static)."""
    return mask is not None and mask.shape[axis] != 1


# ------------------------------------------------------------------------------------- layers
class AffineNormalization(keras.layers.Layer):
    """Base for normalizations followed by an optional learned `gamma * x + beta`.

    Subclasses call `_build_affine(param_shape)` in `build` and `_apply_affine`/
    `_affine_parameters` in `call`; `get_config` and `compute_output_shape` come from here.
    """

    def __init__(
        self,
        epsilon,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        owner = self.__class__.__name__
        self.epsilon = check_float(owner, "epsilon", epsilon, low=0.0, low_open=True)
        self.center = check_bool(owner, "center", center)
        self.scale = check_bool(owner, "scale", scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = True
        self.gamma = None
        self.beta = None

    @property
    def _owner(self):
        return f"{self.__class__.__name__} layer {self.name!r}"

    def _build_affine(self, shape):
        """Creates `gamma` then `beta` (Keras's order), float32 even under mixed precision."""
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                trainable=True, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                trainable=True, autocast=False,
            )

    def _affine_parameters(self, dtype, shape=None):
        """`(gamma, beta)` cast to `dtype` and reshaped to `shape` (None where disabled)."""
        def prepare(weight):
            if weight is None:
                return None
            value = tf.cast(weight, dtype)
            return value if shape is None else tf.reshape(value, shape)
        return prepare(self.gamma), prepare(self.beta)

    def compute_output_shape(self, input_shape):
        axis = getattr(self, "axis", -1)
        canonical_axes(self._owner, axis if not isinstance(axis, list) else tuple(axis),
                       input_shape)
        return tuple(input_shape)

    def _affine_config(self):
        return {
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }

    def get_config(self):
        return {**super().get_config(), **self._affine_config()}


class BatchDependentMixin:
    """Shared by layers whose training output depends on the whole batch.

    They take `inference_statistics="moving"|"batch"` and, when `training=True` and the layer is
    trainable, update their population statistics; `trainable=False` means inference mode, as
    for Keras's BatchNormalization. `keras_norm.batch_statistics(model)` switches every such
    layer to `"batch"` temporarily.
    """

    #: Marks layers that `batch_statistics` and `recompute_statistics` act on.
    batch_dependent = True
    #: Names of population statistics that are biased variances of batch values, which
    #: `recompute_statistics(unbiased=True)` scales by m / (m - 1).
    variance_statistics = ()

    def _init_inference_statistics(self, inference_statistics):
        self.inference_statistics = check_choice(
            self.__class__.__name__, "inference_statistics", inference_statistics,
            INFERENCE_STATISTICS,
        )

    def _is_training(self, training):
        """True when the layer should use batch statistics AND update its population ones."""
        return bool(training) and self.trainable

    def _uses_batch_statistics(self, training):
        return self._is_training(training) or self.inference_statistics == "batch"


def add_statistic(layer, name, shape, initializer):
    """A float32, non-trainable population statistic, averaged over replicas on update.

    Always float32, whatever the layer's dtype policy: a float16 running variance loses the
    precision the statistic exists to keep.

    `aggregation="mean"`: under `MirroredStrategy` an unsynchronized layer's replicas see
    different batches; averaging their updates keeps one consistent moving statistic instead of
    silently diverging per-replica copies.
    """
    return layer.add_weight(
        shape=shape, name=name, initializer=initializer, dtype="float32", trainable=False,
        autocast=False, aggregation="mean",
    )


def to_statistics_dtype(inputs):
    """Casts inputs to the float dtype statistics use (float32 for half floats and ints)."""
    return tf.cast(inputs, stats.statistics_dtype(inputs.dtype))


class ChannelwiseNormalization(AffineNormalization):
    """Base of normalizations with per-channel parameters over `[batch, spatial..., channel]`.

    `build` resolves the channel axis (`self._axis`), the spatial axes (`self._spatial_axes`:
    all axes but 0 and the channel axis; none for a rank-2 input), the broadcast shape of
    per-channel parameters (`self._param_shape`) and creates `gamma`/`beta`. Subclasses create
    further per-channel weights with `_add_channel_weight` in `_build_extra`.
    """

    def __init__(self, axis, epsilon, **kwargs):
        super().__init__(epsilon=epsilon, **kwargs)
        self.axis = check_channel_axis(self.__class__.__name__, axis)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            raise ValueError(
                f"{self._owner}: expected an input of rank >= 2 (batch, ..., channels). "
                f"Received: input_shape={input_shape}"
            )
        self._axis, channels = per_example_channel_axis(self._owner, self.axis, input_shape)
        ndim = len(input_shape)
        self._channels = channels
        self._spatial_axes = [a for a in range(1, ndim) if a != self._axis]
        self._param_shape = broadcast_shape(ndim, [self._axis], input_shape)
        self._validate_channels(channels)
        self.input_spec = keras.layers.InputSpec(ndim=ndim, axes={self._axis: channels})
        self._build_affine((channels,))
        self._build_extra()

    def _validate_channels(self, channels):
        """Hook for shape-dependent checks (e.g. groups dividing the channels)."""

    def _build_extra(self):
        """Hook creating the subclass's own weights, after `gamma` and `beta`."""

    def _add_channel_weight(self, name, initializer, regularizer=None, constraint=None):
        """A trainable float32 per-channel weight of shape `(channels,)`."""
        return self.add_weight(
            shape=(self._channels,), name=name, initializer=initializer,
            regularizer=regularizer, constraint=constraint, trainable=True, autocast=False,
        )

    def _channel_parameter(self, weight, dtype):
        """A per-channel weight cast to `dtype` and shaped to broadcast with the input."""
        return tf.reshape(tf.cast(weight, dtype), self._param_shape)

    def _apply_affine(self, x, scale=None):
        """`x * scale * gamma + beta`, with the (small, broadcast) `scale` folded into gamma
        first: one full-size multiply instead of two, and no full-size product for gamma's
        gradient to keep (about 1.6x faster forward+backward under XLA)."""
        gamma, beta = self._affine_parameters(x.dtype, self._param_shape)
        if gamma is not None:
            scale = gamma if scale is None else scale * gamma
        if scale is not None:
            x = x * scale
        if beta is not None:
            x = x + beta
        return x
