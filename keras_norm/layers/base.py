"""What keras_norm's layers share: argument checks, axes, masks, the affine part and config.

Keras copies the same set-up into every normalization file; here it lives once:
`NormalizationLayer` (`epsilon`, `_owner`, `compute_output_shape`), `AffineNormalization`
(gamma, beta and their arguments), `ChannelwiseNormalization` (the channel axis resolved once
in `build`), `FeatureAxesMixin` (layer/RMS norm's list of axes), `BatchDependentMixin`
(`momentum`, `synchronized`, `inference_statistics`, moving initializers), `expand_mask` and
`statistics_mask` (Keras's mask layout, checked in one place). Argument descriptions several
layers share are written once in `keras_norm.layers.docstrings`. Derived values (canonical
axes, adapted group counts) are private attributes: `get_config()` returns the user's arguments.
"""

import numbers

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from keras_norm import _math

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


def channel_axis(owner, axis, input_shape, per_example=False):
    """`(non-negative channel axis, channel count)` of `input_shape`; the size must be known.

    `per_example`: axis 0 holds the examples (per-example statistics, spatial axes) and cannot
    be the channel axis, so the input needs rank >= 2.
    """
    if per_example and len(input_shape) < 2:
        raise ValueError(
            f"{owner}: expected an input of rank >= 2 (batch, ..., channels): axis 0 is the "
            f"batch axis and cannot be the channel axis. Received: input_shape={input_shape}"
        )
    (positive,) = canonical_axes(owner, axis, input_shape)
    if per_example and positive == 0:
        raise ValueError(
            f"{owner}: axis 0 is the batch axis and cannot be the channel axis. "
            f"Received: axis={axis}, input_shape={tuple(input_shape)}"
        )
    channels = input_shape[positive]
    if channels is None:
        # Keras's wording (its own tests match it).
        raise ValueError(
            f"{owner}: Axis {axis} of input tensor should have a defined dimension but the "
            f"layer received an input with shape {tuple(input_shape)}: the channel axis {axis} "
            f"of the input must have a known size. Received: input_shape={tuple(input_shape)}"
        )
    return positive, channels


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


# -------------------------------------------------------------------------------------- masks
def expand_mask(owner, mask, x, allow_prefix=False, channel_axis=None, channels_reason=None):
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
        channel_axis, channels_reason: For layers that cannot take a flag per channel: the
            channel axis of `x` and why; a mask that varies along that axis is a `ValueError`.

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
            f"shape without its last axis). {_mask_received(mask, x)}"
        )
    for axis, (size, input_size) in enumerate(zip(mask.shape, x.shape)):
        if size not in (None, 1) and input_size is not None and size != input_size:
            # Caught here, where a broadcast would fail later with a shape error naming no
            # layer; typically a mask laid out without the channel axis, not Keras's layout.
            raise ValueError(
                f"{owner}: the mask's axis {axis} has size {size} but the input's has "
                f"{input_size}. Keras's mask layout is the input's shape without its LAST axis "
                f"(whatever the channel axis), size-1 axes broadcasting. {_mask_received(mask, x)}"
            )
    if channels_reason is not None and channel_axis < rank and mask.shape[channel_axis] != 1:
        raise ValueError(
            f"{owner}: {channels_reason}, so the mask must not vary along the channel axis "
            f"{channel_axis}. Keras's mask layout covers the input's leading axes (all but the "
            "last), so with the channels not last it flags channels. Pass a mask of size 1 on "
            f"the channel axis. {_mask_received(mask, x)}"
        )
    mask = tf.cast(tf.cast(mask, tf.bool), x.dtype)
    for _ in range(ndim - rank):  # expand_dims keeps the static shape (a reshape may not)
        mask = tf.expand_dims(mask, -1)
    return mask


def _mask_received(mask, x):
    return f"Received: mask.shape={tuple(mask.shape)}, inputs.shape={tuple(x.shape)}"


def mask_varies_along(mask, axis):
    """Whether a mask from `expand_mask` may take different values along `axis` (static)."""
    return mask is not None and mask.shape[axis] != 1


def statistics_mask(owner, mask, x, statistics_axes):
    """The float mask statistics over `statistics_axes` should use, or `None` if it cannot matter.

    For per-example normalizations: the mask is in Keras's layout or a shorter prefix of the
    input's shape, such as Keras's `(batch, time)` masks (`expand_mask` with `allow_prefix`).
    Returns it at the rank of `x` (size 1 where it does not vary), or `None` when it varies
    along none of `statistics_axes`: it then cannot change the statistics (a fully masked set
    falls back to all its values, see `_math.fallback_mask`).
    """
    mask = expand_mask(owner, mask, x, allow_prefix=True)
    if not any(mask_varies_along(mask, a) for a in statistics_axes):
        return None
    return mask


# ---------------------------------------------------------------------------- base classes
#: The arguments the base classes take; `base_arguments` picks them out of a layer's own.
BASE_ARGUMENTS = ("axis", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
                  "beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint",
                  "momentum", "moving_mean_initializer", "moving_variance_initializer",
                  "synchronized", "inference_statistics")


def base_arguments(arguments):
    """The base classes' share of a layer's `__init__` arguments (pass `locals()`).

    Every layer keeps its full explicit signature (Keras's positional order, `help()`,
    `inspect.signature`); this hands the arguments the bases check and store to
    `super().__init__` in one line instead of a dozen keyword pairs per layer.
    """
    return {name: arguments[name] for name in BASE_ARGUMENTS if name in arguments}


#: The arguments of a learned weight, `{weight}_{kind}`, and the Keras module reading them.
_WEIGHT_ARGUMENTS = (("initializer", initializers), ("regularizer", regularizers),
                     ("constraint", constraints))


class NormalizationLayer(keras.layers.Layer):
    """Root of keras_norm's normalization layers: `epsilon`, error messages, output shape."""

    def __init__(self, epsilon, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = check_float(self.__class__.__name__, "epsilon", epsilon, low=0.0,
                                   low_open=True)
        self.supports_masking = True

    @property
    def _owner(self):
        """The layer as errors name it: class and name."""
        return f"{self.__class__.__name__} layer {self.name!r}"

    def compute_output_shape(self, input_shape):
        # The shape is unchanged; the axis is still checked against it, as Keras does.
        axis = getattr(self, "axis", -1)
        canonical_axes(self._owner, tuple(axis) if isinstance(axis, list) else axis,
                       input_shape)
        return tuple(input_shape)

    # ------------------------------------------------------------------- learned weights
    def _init_weight_arguments(self, name, initializer, regularizer=None, constraint=None):
        """Stores a weight's `{name}_initializer`, `_regularizer` and `_constraint` arguments."""
        for (kind, module), value in zip(_WEIGHT_ARGUMENTS, (initializer, regularizer, constraint)):
            setattr(self, f"{name}_{kind}", module.get(value))

    def _weight_arguments_config(self, *names):
        """The serialized `{name}_initializer`, `_regularizer`, `_constraint` of each name."""
        return {f"{name}_{kind}": module.serialize(getattr(self, f"{name}_{kind}"))
                for name in names for kind, module in _WEIGHT_ARGUMENTS}

    def _add_learned(self, name, shape, initializer=None):
        """A trainable weight from the layer's `{name}_initializer` (unless given),
        `_regularizer` and `_constraint` arguments (those it has). Never autocast: the layers
        compute in float32 and keep their weights float32 under mixed precision."""
        return self.add_weight(
            shape=shape, name=name,
            initializer=(getattr(self, f"{name}_initializer") if initializer is None
                         else initializer),
            regularizer=getattr(self, f"{name}_regularizer", None),
            constraint=getattr(self, f"{name}_constraint", None), trainable=True,
            autocast=False,
        )

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


class AffineNormalization(NormalizationLayer):
    """Base for normalizations followed by an optional learned `gamma * x + beta`.

    Subclasses call `_build_affine(param_shape)` in `build` and `_apply_affine`/
    `_affine_parameters` in `call`; `get_config` and `compute_output_shape` come from here.
    Layers with per-channel parameters record their channel axis with `_set_channel_axis`.
    """

    #: Why this layer cannot use a mask that flags channels, or None where it can.
    mask_channels_reason = None

    def __init__(self, epsilon, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, **kwargs):
        super().__init__(epsilon, **kwargs)
        owner = self.__class__.__name__
        self.center = check_bool(owner, "center", center)
        self.scale = check_bool(owner, "scale", scale)
        self._init_weight_arguments("beta", beta_initializer, beta_regularizer, beta_constraint)
        self._init_weight_arguments("gamma", gamma_initializer, gamma_regularizer,
                                    gamma_constraint)
        self.gamma = None
        self.beta = None

    def _build_affine(self, shape):
        """Creates `gamma` then `beta` (Keras's order), float32 even under mixed precision."""
        if self.scale:
            self.gamma = self._add_learned("gamma", shape)
        if self.center:
            self.beta = self._add_learned("beta", shape)

    def _affine_parameters(self, dtype, shape=None):
        """`(gamma, beta)` cast to `dtype` and reshaped to `shape` (None where disabled)."""
        def prepare(weight):
            if weight is None:
                return None
            value = tf.cast(weight, dtype)
            return value if shape is None else tf.reshape(value, shape)
        return prepare(self.gamma), prepare(self.beta)

    # ----------------------------------------------------------- per-channel parameters
    def _set_channel_axis(self, shape, axis):
        """Records the channel axis `axis` (non-negative) of inputs of `shape`: `_axis`,
        `_channels`, `_reduction_axes` (every other axis), `_spatial_axes` (every other axis
        but 0) and `_param_shape` (what a per-channel parameter broadcasts with)."""
        ndim = len(shape)
        self._axis, self._channels = axis, shape[axis]
        self._reduction_axes = [a for a in range(ndim) if a != axis]
        self._spatial_axes = [a for a in range(1, ndim) if a != axis]
        self._param_shape = [1] * axis + [self._channels] + [1] * (ndim - axis - 1)

    def _expand_mask(self, mask, x, channels_reason=None):
        """`expand_mask` on the channel axis; `channels_reason` (default: the class's
        `mask_channels_reason`) says why a mask that flags channels (varies along the channel
        axis) cannot be used, or is None where it can."""
        return expand_mask(self._owner, mask, x, channel_axis=self._axis,
                           channels_reason=channels_reason or self.mask_channels_reason)

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

    def get_config(self):
        config = {"center": self.center, "scale": self.scale,
                  **self._weight_arguments_config("beta", "gamma")}
        return {**super().get_config(), **config}


class ChannelwiseNormalization(AffineNormalization):
    """Base of normalizations with per-channel parameters and an `axis` argument (an int).

    `build` resolves the channel axis once (`_set_channel_axis`), sets the `input_spec`, runs
    the `_validate_channels` hook, creates `gamma`/`beta`, then the subclass's own weights in
    `_build_extra` (so the weights' order is always gamma, beta, then the layer's).

    `per_example = True` (default): axis 0 holds the examples, so it cannot be the channel axis
    and inputs need rank >= 2. Batch normalizations set `False`: any axis may be the channels.
    """

    per_example = True

    def __init__(self, axis, epsilon, **kwargs):
        super().__init__(epsilon=epsilon, **kwargs)
        self.axis = check_channel_axis(self.__class__.__name__, axis)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        axis, channels = channel_axis(self._owner, self.axis, input_shape, self.per_example)
        self._set_channel_axis(input_shape, axis)
        self._validate_channels(channels, input_shape)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={axis: channels})
        self._build_affine((channels,))
        self._build_extra()

    def _validate_channels(self, channels, input_shape):
        """Hook for shape-dependent checks (e.g. groups dividing the channels)."""

    def _build_extra(self):
        """Hook creating the subclass's own weights, after `gamma` and `beta`."""

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


# ------------------------------------------------------------------------------ feature axes
class FeatureAxesMixin:
    """Keras's `axis` argument of `LayerNormalization`/`RMSNormalization`, without its defects.

    `axis` is an int or a list of ints; the weights span the normalized axes (sizes in sorted
    order, as Keras). Keras rewrites `self.axis` in `build`; here it stays what the user gave
    (a tuple is kept as a list, its JSON form) and the canonical axes are derived per call, so a
    layer built with a negative axis also accepts inputs of another rank, as Keras's does.
    """

    def _init_feature_axes(self, axis):
        checked = check_axis_argument(self.__class__.__name__, axis)
        self._axis_argument = checked
        self.axis = list(checked) if isinstance(checked, tuple) else checked

    def _build_feature_axes(self, input_shape):
        """Validates the axes against `input_shape`; returns the weights' shape."""
        axes = canonical_axes(self._owner, self._axis_argument, input_shape)
        sizes = tuple(input_shape[a] for a in axes)
        if None in sizes:
            raise ValueError(
                f"{self._owner}: the normalized axes {axes} of the input must have known sizes. "
                f"Received: input_shape={tuple(input_shape)}, axis={self.axis!r}"
            )
        self._feature_sizes = sizes
        spelled = self._axis_argument if isinstance(self._axis_argument, tuple) else (
            self._axis_argument,)
        self.input_spec = keras.layers.InputSpec(
            min_ndim=max(a + 1 if a >= 0 else -a for a in spelled),
            axes={a: input_shape[a] for a in spelled},
        )
        return sizes

    def _feature_axes(self, x):
        """`(axes, param_shape)` for this input: sorted non-negative axes, broadcast shape."""
        axes = canonical_axes(self._owner, self._axis_argument, x.shape)
        shape = [1] * len(x.shape)
        for a, size in zip(axes, self._feature_sizes):
            shape[a] = size
        return axes, shape

    def _statistics_mask(self, mask, x, axes):
        mask = statistics_mask(self._owner, mask, x, axes)
        return None if mask is None else _math.fallback_mask(mask, axes)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


# ---------------------------------------------------------------------- batch statistics
class BatchDependentMixin:
    """Shared by layers whose training output depends on the whole batch.

    Takes (keyword) `momentum`, `synchronized`, `inference_statistics` and, where the layer
    has them, `moving_mean_initializer` / `moving_variance_initializer`; checks, stores and
    configures them. In training (`training=True` and the layer trainable) such a layer
    updates its population statistics; `trainable=False` means inference mode, as for Keras's
    BatchNormalization. `keras_norm.batch_statistics(model)` switches every such layer to
    `inference_statistics="batch"` temporarily.
    """

    #: Marks layers that `batch_statistics` and `recompute_statistics` act on.
    batch_dependent = True
    #: Names of population statistics that are biased variances of batch values, which
    #: `recompute_statistics(unbiased=True)` scales by m / (m - 1).
    variance_statistics = ()
    #: The moving-statistic initializer arguments a layer may take.
    MOVING_INITIALIZERS = ("moving_mean_initializer", "moving_variance_initializer")

    def __init__(self, *, momentum, synchronized=False, inference_statistics="moving",
                 **kwargs):
        moving = {name: kwargs.pop(name) for name in self.MOVING_INITIALIZERS if name in kwargs}
        super().__init__(**kwargs)
        owner = self.__class__.__name__
        # Read at every call, not only here: `recompute_statistics` may swap in a variable.
        self.momentum = check_float(owner, "momentum", momentum, 0.0, 1.0)
        self._moving_initializers = tuple(moving)
        for name, initializer in moving.items():
            setattr(self, name, initializers.get(initializer))
        self.synchronized = check_bool(owner, "synchronized", synchronized)
        self.inference_statistics = check_choice(
            owner, "inference_statistics", inference_statistics, INFERENCE_STATISTICS)

    def _add_moving_statistics(self, shape):
        """Creates `moving_mean` and/or `moving_variance`: those the layer takes an initializer
        for, in that order."""
        for argument in self._moving_initializers:
            name = argument[: -len("_initializer")]
            setattr(self, name, add_statistic(self, name, shape, getattr(self, argument)))

    def _is_training(self, training):
        """True when the layer should use batch statistics AND update its population ones."""
        return bool(training) and self.trainable

    def _uses_batch_statistics(self, training):
        return self._is_training(training) or self.inference_statistics == "batch"

    def get_config(self):
        config = {
            "momentum": self.momentum,
            **{name: initializers.serialize(getattr(self, name))
               for name in self._moving_initializers},
            "synchronized": self.synchronized,
            "inference_statistics": self.inference_statistics,
        }
        return {**super().get_config(), **config}


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
    return tf.cast(inputs, _math.statistics_dtype(inputs.dtype))
