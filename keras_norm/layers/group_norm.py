"""Layer, group and instance normalization: per-example statistics over different axes.

All three normalize each example with the mean and variance of some of its own values; they
differ only in which values share statistics:

- `LayerNormalization` (Ba et al. 2016): all the values along `axis` (the features);
- `GroupNormalization` (Wu & He 2018): the spatial axes and the channels of one group;
- `InstanceNormalization` (Ulyanov et al. 2016): the spatial axes of one channel, i.e. group
  normalization with one group per channel.

None of them depends on the rest of the batch, so training and inference are the same function
and there are no moving statistics. Statistics are two-pass moments in float32
(`_math.moments`, `_math.group_moments`) whatever the input dtype.

Masks. Keras's `LayerNormalization` and `GroupNormalization` pass a mask on but never use it, so
padding enters group norm's statistics. Here a mask removes the masked values from the
statistics wherever it varies along an axis the statistics reduce over; the mask is passed on
unchanged. The layout is Keras's (as `keras.layers.BatchNormalization` reads it, and as
`Masking` and `Embedding` produce it): the input's shape without its last axis, or a shorter
prefix of the input's shape such as `(batch, time)`; it covers the input's leading axes and is
broadcast over the rest, whichever axis holds the channels. So with channels last it flags
positions; with `axis=1` on `(N, C, L)` inputs an `(N, C)` mask flags channels of each example,
and group norm leaves the flagged channels out of their group's statistics. With
`LayerNormalization(axis=-1)` the statistics of one position never mix positions, so a
`(batch, time)` mask changes nothing and outputs equal Keras's. A set of values sharing
statistics with no valid value falls back to all of its values (`_math.fallback_mask`).
"""

import numbers
import warnings

import keras
import tensorflow as tf

from keras_norm import _math
from keras_norm.layers import base, docstrings


# ------------------------------------------------------------------------------------ layers
@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class LayerNormalization(base.FeatureAxesMixin, base.AffineNormalization):
    """Layer normalization: each example normalized over its feature axes.

    A drop-in replacement for `keras.layers.LayerNormalization` (Keras 3): the same arguments,
    defaults, weights (`gamma`, `beta`: names, order, shapes) and outputs. Unlike Keras's, its
    `get_config()` is not rewritten by `build` (Keras turns `axis=-1` into `[-1]`), its
    statistics are the exact two-pass ones in float32, and a mask that covers a normalized axis
    removes the masked values from the statistics (see the module docstring).

    ```
    mean_i, var_i = mean and variance of example i over `axis`
    y_i = gamma * (x_i - mean_i) / sqrt(var_i + epsilon) + beta
    ```

    `gamma` and `beta` span the normalized axes: with `axis=[1, 2, 3]` on `(B, H, W, C)` inputs
    they have shape `(H, W, C)` (unlike group normalization with one group, whose parameters
    are per channel).

    Example:

    >>> import numpy as np, keras_norm
    >>> layer = keras_norm.LayerNormalization()
    >>> y = layer(np.array([[1.0, 2.0, 3.0, 6.0]], "float32"))
    >>> np.round(y.numpy(), 3)
    array([[-1.069, -0.534,  0.   ,  1.603]], dtype=float32)
    >>> layer = keras_norm.LayerNormalization(axis=[1, 2])
    >>> layer.build((None, 5, 3))
    >>> tuple(layer.gamma.shape)
    (5, 3)

    Args:
        axis: Integer or list of integers: the axes to normalize over (typically the
            features). Defaults to `-1`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        {affine_args}
        rms_scaling: Deprecated, as in Keras, and kept so that Keras configs load: if `True`,
            `y = gamma * x / sqrt(var + epsilon)` (no centering, no `beta`; `gamma` is created
            even with `scale=False`). This divides by the standard deviation, not the root
            mean square: use `RMSNormalization` for RMS norm. Defaults to `False`.
        {kwargs_arg}

    Call arguments:
        inputs: Input tensor with the axes `axis` names (any rank >= 1 for `axis=-1`).
        {per_example_mask_arg}
            It is passed on; it changes the statistics only where it varies along a
            normalized axis.

    Reference:
        - [Ba et al., 2016](https://arxiv.org/abs/1607.06450)
    """

    def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, rms_scaling=False, **kwargs):
        arguments = base.base_arguments(locals())
        axis = arguments.pop("axis")
        super().__init__(**arguments, **kwargs)
        self._init_feature_axes(axis)
        self.rms_scaling = base.check_bool(self.__class__.__name__, "rms_scaling", rms_scaling)
        if self.rms_scaling:
            warnings.warn(
                f"{self.__class__.__name__}: `rms_scaling=True` is deprecated (as in Keras): it "
                "divides by the standard deviation, not the root mean square. Use "
                "keras_norm.RMSNormalization for RMS normalization. Received: rms_scaling=True",
                stacklevel=2,
            )
        # Keep float32 inputs float32 under mixed precision (Keras does the same).
        self.autocast = False

    def build(self, input_shape):
        shape = self._build_feature_axes(input_shape)
        if not self.rms_scaling:
            self._build_affine(shape)
            return
        # Keras's deprecated path: gamma always, never beta (so Keras weights load).
        self.gamma = self._add_learned("gamma", shape)

    def call(self, inputs, mask=None):
        x = base.to_statistics_dtype(inputs)
        axes, shape = self._feature_axes(x)
        statistics_mask = self._statistics_mask(mask, x, axes)
        gamma, beta = self._affine_parameters(x.dtype, shape)
        if statistics_mask is None and not self.rms_scaling:
            # Unmasked: one op with a closed-form gradient (see _math.standardize).
            outputs, _ = _math.standardize(x, axes, self.epsilon, gamma, beta)
            return tf.cast(outputs, self.compute_dtype)
        moments = _math.moments(x, axes, statistics_mask)
        if self.rms_scaling:
            scale = tf.math.rsqrt(moments.variance + self.epsilon)
            outputs = x * (scale if gamma is None else scale * gamma)  # one full-size multiply
        else:
            outputs = _math.normalize(x, moments.mean, moments.variance, self.epsilon, gamma,
                                      beta)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "rms_scaling": self.rms_scaling}


def _check_groups(owner, groups):
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise base.ArgumentTypeError(
            f"{owner}: argument `groups` must be an integer (a positive number of groups, or -1 "
            f"for one group per channel). Received: groups={groups!r}"
        )
    if groups == 0 or groups < -1:
        raise ValueError(
            f"{owner}: argument `groups` must be a positive integer, or -1 for one group per "
            f"channel (instance normalization). Received: groups={groups!r}"
        )
    return int(groups)


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class GroupNormalization(base.ChannelwiseNormalization):
    """Group normalization: each example normalized per group of channels.

    The channels are split into `groups` groups of consecutive channels; each example is
    normalized with the mean and variance of each group over the spatial axes and the group's
    channels, then scaled and shifted per channel. It does not depend on the batch, so it works
    at any batch size (Wu & He report 10.6% lower ImageNet error than batch norm at batch 2).
    `groups=1` normalizes each example over all its values; `groups=-1` uses one group per
    channel (instance normalization, see `InstanceNormalization`).

    A drop-in replacement for `keras.layers.GroupNormalization` (Keras 3): the same arguments,
    defaults, weights (`gamma`, `beta`, per channel) and outputs. Unlike Keras's, `get_config()`
    keeps `groups=-1` (Keras rewrites it to the channel count in `build`), `groups=True` is
    rejected, statistics are two-pass in float32, any channel axis and rank >= 2 work, and a
    mask removes padding from the statistics (see the module docstring).

    ```
    x: (B, ..., C) viewed as (B, ..., G, C / G)
    mean_bg, var_bg = moments of example b, group g over the spatial axes and C / G channels
    y = gamma_c * (x - mean_bg) / sqrt(var_bg + epsilon) + beta_c
    ```

    Example:

    >>> import numpy as np, keras, keras_norm
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(16, 3, padding="same"),
    ...     keras_norm.GroupNormalization(groups=4),
    ...     keras.layers.ReLU(),
    ... ])
    >>> model(np.zeros((2, 8, 8, 3), "float32")).shape
    TensorShape([2, 8, 8, 16])

    Args:
        groups: Number of groups, which must divide the number of channels; `-1` means one
            group per channel. Defaults to `32`.
        axis: Integer, the channel axis (`1` for channels-first inputs). Defaults to `-1`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        {affine_args}
        {kwargs_arg}

    Call arguments:
        inputs: Input tensor of rank >= 2 (batch, then channels among the other axes).
        {per_example_mask_arg}
            Whichever axis holds the channels: with `axis=1` on `(N, C, L)` an `(N, C)` mask
            flags channels. Masked values do not enter the statistics (they are still
            normalized); a group of an example with no valid value uses all its values. It is
            passed on unchanged.

    Reference:
        - [Wu & He, 2018](https://arxiv.org/abs/1803.08494)
    """

    def __init__(self, groups=32, axis=-1, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None, gamma_constraint=None, **kwargs):
        super().__init__(**base.base_arguments(locals()), **kwargs)
        self.groups = _check_groups(self.__class__.__name__, groups)
        # Keep float32 inputs float32 under mixed precision (Keras does the same).
        self.autocast = False

    def _validate_channels(self, channels, input_shape):
        groups = channels if self.groups == -1 else self.groups
        # The rule, and Keras's wording of it (Keras's own tests match that).
        received = f"Received: groups={self.groups}, input_shape={tuple(input_shape)}"
        if groups > channels:
            raise ValueError(
                f"{self._owner}: Number of groups ({groups}) cannot be more than the number of "
                f"channels ({channels}): the number of channels ({channels}) must be divisible "
                f"by groups ({groups}). {received}"
            )
        if channels % groups:
            raise ValueError(
                f"{self._owner}: the number of channels ({channels}) must be divisible by groups "
                f"({groups}) (in Keras's words: \"Number of groups ({groups}) must be a multiple "
                f"of the number of channels ({channels})\"). {received}"
            )
        self._groups = groups
        self._one_channel_per_group = groups == channels
        ndim = len(input_shape)
        self._group_param_shape = ([1] * self._axis + [groups, channels // groups]
                                   + [1] * (ndim - self._axis - 1))
        # The axes a set of values sharing statistics spans: the channel axis too, unless
        # every group is one channel.
        self._statistics_axes = self._spatial_axes + (
            [] if self._one_channel_per_group else [self._axis])
        # The spatial axes in the grouped layout (channel axis split into groups, channels
        # per group).
        self._reduction_axes_grouped = [a for a in range(1, ndim + 1) if a != self._axis]

    def call(self, inputs, mask=None):
        x = base.to_statistics_dtype(inputs)
        mask = base.statistics_mask(self._owner, mask, x, self._statistics_axes)
        if mask is None and self._one_channel_per_group:
            # One channel per group (instance norm): no group axis to split off; XLA's CPU
            # backend reduces the unsplit layout faster.
            gamma, beta = self._affine_parameters(x.dtype, self._param_shape)
            outputs, _ = _math.standardize(x, self._spatial_axes, self.epsilon, gamma, beta)
            return tf.cast(outputs, self.compute_dtype)
        gamma, beta = self._affine_parameters(x.dtype, self._group_param_shape)
        if mask is None:
            # Unmasked: one op with a closed-form gradient (see _math.standardize).
            grouped = _math.split_channels(x, self._axis, self._groups)
            outputs, _ = _math.standardize(grouped, self._reduction_axes_grouped, self.epsilon,
                                           gamma, beta)
            return tf.cast(tf.reshape(outputs, tf.shape(inputs)), self.compute_dtype)
        # Keras's layout with the channels not last: the mask flags channels too, and the
        # flagged ones leave their group's statistics (see _math.group_moments).
        grouped, moments = _math.group_moments(x, self._axis, self._groups, mask)
        outputs = _math.normalize(grouped, moments.mean, moments.variance, self.epsilon, gamma,
                                  beta)
        return tf.cast(tf.reshape(outputs, tf.shape(inputs)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class InstanceNormalization(GroupNormalization):
    """Instance normalization: each example normalized per channel over its spatial axes.

    Group normalization with one group per channel (`GroupNormalization(groups=-1)`), with the
    same weights (`gamma`, `beta`, per channel); its config has no `groups`. The default
    `epsilon=1e-3` follows Keras's normalization layers and TensorFlow Addons'
    `InstanceNormalization` (PyTorch uses `1e-5`).

    ```
    mean_bc, var_bc = moments of example b, channel c over the spatial axes
    y = gamma_c * (x - mean_bc) / sqrt(var_bc + epsilon) + beta_c
    ```

    Example:

    >>> import numpy as np, keras_norm
    >>> x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype("float32")
    >>> y = keras_norm.InstanceNormalization(epsilon=1e-6)(x).numpy()
    >>> bool(np.allclose(y.mean(axis=(1, 2)), 0, atol=1e-5))
    True

    Args:
        axis: Integer, the channel axis (`1` for channels-first inputs). Defaults to `-1`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        {affine_args}
        {kwargs_arg}

    Call arguments:
        inputs: Input tensor of rank >= 3 to have spatial axes (rank 2 gives zeros + `beta`).
        mask: As for `GroupNormalization`.

    Reference:
        - [Ulyanov et al., 2016](https://arxiv.org/abs/1607.08022)
    """

    def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, **kwargs):
        if "groups" in kwargs:
            raise base.ArgumentTypeError(
                f"{self.__class__.__name__}: argument `groups` is not accepted: instance "
                "normalization uses one group per channel. Use GroupNormalization(groups=...) "
                f"for other groupings. Received: groups={kwargs['groups']!r}"
            )
        super().__init__(groups=-1, **base.base_arguments(locals()), **kwargs)

    def get_config(self):
        config = super().get_config()
        del config["groups"]
        return config
