"""EvoNorm-B0 and EvoNorm-S0: normalization-activation layers (Liu et al., 2020).

Each replaces a normalization *and* the activation after it (do not add a ReLU behind them).
B0 divides by the larger of a batch and an instance standard deviation; S0 is a Swish-like
numerator over a group standard deviation. Neither subtracts a mean.
"""

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from keras_norm import stats
from keras_norm.layers import base


class _EvoNorm(base.ChannelwiseNormalization):
    """The part EvoNorm-B0 and -S0 share: the per-channel weight `v` and its arguments."""

    def __init__(self, axis, epsilon, v_initializer="ones", v_regularizer=None,
                 v_constraint=None, **kwargs):
        super().__init__(axis=axis, epsilon=epsilon, **kwargs)
        self.v_initializer = initializers.get(v_initializer)
        self.v_regularizer = regularizers.get(v_regularizer)
        self.v_constraint = constraints.get(v_constraint)
        self.v = None

    def _build_extra(self):
        self.v = self._add_channel_weight("v", self.v_initializer, self.v_regularizer,
                                          self.v_constraint)

    def get_config(self):
        config = {
            "axis": self.axis,
            "v_initializer": initializers.serialize(self.v_initializer),
            "v_regularizer": regularizers.serialize(self.v_regularizer),
            "v_constraint": constraints.serialize(self.v_constraint),
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="keras_norm")
class EvoNormB0(base.BatchDependentMixin, _EvoNorm):
    """EvoNorm-B0: a batch-dependent normalization-activation layer.

    Divides each value by the larger of the per-channel batch standard deviation and a learned
    linear function of the value plus its instance (per example and channel) standard
    deviation. It replaces a batch normalization *and* the activation after it.

    ```
    var_batch = variance over all axes but the channel axis        (training)
    var_batch = moving_variance                                    (inference)
    var_inst = variance over the spatial axes, per example and channel
    y = x / max(sqrt(var_batch + eps), v * x + sqrt(var_inst + eps)) * gamma + beta
    moving_variance = momentum * moving_variance + (1 - momentum) * var_batch
    ```

    Both variances are biased (divide by the count) and no mean is subtracted from `x`. The
    batch variance carries gradient in training, as in batch normalization; it is computed with
    the same machinery as `keras_norm.BatchNormalization`, so `synchronized=True` gives exact
    cross-replica statistics (one device on the global batch) under `tf.distribute`. The moving
    variance tracks the biased batch variance with Keras's convention and default momentum
    (`0.99`, i.e. PyTorch's `momentum=0.01`); timm's EvoNorm instead stores the unbiased
    variance with its momentum 0.1. The spatial axes are every axis but the batch and channel
    axes; for a rank-2 input there are none and `var_inst = 0`.

    Example:

    >>> import numpy as np, keras
    >>> from keras_norm.layers.evonorm import EvoNormB0
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3),
    ...     EvoNormB0(),  # replaces BatchNormalization + ReLU
    ... ])
    >>> model(np.zeros((2, 8, 8, 3), "float32"), training=True).shape
    TensorShape([2, 6, 6, 4])

    Args:
        axis: Integer, the channel axis. Defaults to `-1`.
        momentum: Momentum of the moving variance, in `[0, 1]`. Defaults to `0.99`.
        epsilon: Positive float added to both variances. Defaults to `1e-5` (the paper's).
        center: If `True`, add the learned offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by the learned `gamma`. Defaults to `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        v_initializer: Initializer for `v`. Defaults to `"ones"`.
        moving_variance_initializer: Initializer for the moving variance. Defaults to `"ones"`.
        beta_regularizer: Optional regularizer for `beta`. Defaults to `None`.
        gamma_regularizer: Optional regularizer for `gamma`. Defaults to `None`.
        v_regularizer: Optional regularizer for `v`. Defaults to `None`.
        beta_constraint: Optional constraint for `beta`. Defaults to `None`.
        gamma_constraint: Optional constraint for `gamma`. Defaults to `None`.
        v_constraint: Optional constraint for `v`. Defaults to `None`.
        synchronized: If `True`, compute the batch variance over the global batch of all
            replicas under a `tf.distribute` strategy. Defaults to `False`.
        inference_statistics: `"moving"` or `"batch"`: the batch variance used at inference.
            Defaults to `"moving"`.
        **kwargs: Base layer keyword arguments (e.g. `name`, `dtype`).

    Call arguments:
        inputs: Input tensor of rank >= 2, batch axis first. A Keras mask is passed on
            unchanged; masked positions still enter the statistics.
        training: Python bool. `True` uses the batch variance and updates the moving variance
            (only if the layer is trainable: `trainable=False` freezes it in inference mode).

    Reference:
        - [Liu et al., 2020, Evolving Normalization-Activation Layers](
          https://arxiv.org/abs/2004.02967)
    """

    #: Statistics that are biased variances (`recompute_statistics(unbiased=True)` corrects them).
    variance_statistics = ("moving_variance",)

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-5,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        v_initializer="ones",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        v_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        v_constraint=None,
        synchronized=False,
        inference_statistics="moving",
        **kwargs,
    ):
        super().__init__(
            axis=axis, epsilon=epsilon, center=center, scale=scale,
            beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            v_initializer=v_initializer, beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer, v_regularizer=v_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint,
            v_constraint=v_constraint, **kwargs,
        )
        owner = self.__class__.__name__
        self.momentum = base.check_float(owner, "momentum", momentum, 0.0, 1.0)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.synchronized = base.check_bool(owner, "synchronized", synchronized)
        self._init_inference_statistics(inference_statistics)
        self.moving_variance = None

    def _build_extra(self):
        super()._build_extra()
        self.moving_variance = base.add_statistic(self, "moving_variance", (self._channels,),
                                                  self.moving_variance_initializer)
        self._batch_axes = [a for a in range(len(self._param_shape)) if a != self._axis]

    def call(self, inputs, training=None):
        x = base.to_statistics_dtype(inputs)
        # The per-example moments over the spatial axes come first; the batch moments are
        # merged from them (Chan's formula on (N, C) values), so x is read twice, not four times.
        instance = stats.moments(x, self._spatial_axes) if self._spatial_axes else None
        if self._uses_batch_statistics(training):
            if instance is None:
                moments = stats.moments(x, self._batch_axes)
            else:
                moments = stats.merge_moments(instance, [0])
            if self.synchronized:
                moments = stats.merge_across_replicas(moments)
            batch_variance = moments.variance
            if self._is_training(training):
                # `self.momentum` is read now, not at build time (recompute_statistics swaps it).
                stats.assign_moving_average(self.moving_variance, batch_variance,
                                            self.momentum, tf.reduce_sum(moments.count) > 0)
        else:
            batch_variance = self._channel_parameter(self.moving_variance, x.dtype)
        # Without spatial axes (a 1x1 "map") each example and channel is one value: variance 0.
        instance_variance = tf.zeros([], x.dtype) if instance is None else instance.variance
        v = self._channel_parameter(self.v, x.dtype)
        denominator = tf.maximum(tf.sqrt(batch_variance + self.epsilon),
                                 v * x + tf.sqrt(instance_variance + self.epsilon))
        outputs = self._apply_affine(x / denominator)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = {
            "momentum": self.momentum,
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer),
            "synchronized": self.synchronized,
            "inference_statistics": self.inference_statistics,
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="keras_norm")
class EvoNormS0(_EvoNorm):
    """EvoNorm-S0: a batch-independent (grouped) normalization-activation layer.

    A Swish-like numerator `x * sigmoid(v * x)` divided by the group standard deviation of group
    normalization: per example, over the spatial axes and the channels of each of `groups`
    groups of consecutive channels. It replaces a group normalization *and* the activation
    after it, and behaves identically in training and inference.

    ```
    var_group = variance per example over the spatial axes and the channels of a group
    y = x * sigmoid(v * x) / sqrt(var_group + eps) * gamma + beta
    ```

    The variance is biased and `x` is not centred in the numerator, as in the paper.

    Example:

    >>> import numpy as np, keras
    >>> from keras_norm.layers.evonorm import EvoNormS0
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(8, 3),
    ...     EvoNormS0(groups=4),  # replaces GroupNormalization + ReLU
    ... ])
    >>> model(np.zeros((2, 8, 8, 3), "float32")).shape
    TensorShape([2, 6, 6, 8])

    Args:
        groups: Positive int, the number of channel groups; it must divide the number of
            channels. Defaults to `32` (the paper's).
        axis: Integer, the channel axis. Defaults to `-1`.
        epsilon: Positive float added to the variance. Defaults to `1e-5` (the paper's).
        center: If `True`, add the learned offset `beta`. Defaults to `True`.
        scale: If `True`, multiply by the learned `gamma`. Defaults to `True`.
        beta_initializer: Initializer for `beta`. Defaults to `"zeros"`.
        gamma_initializer: Initializer for `gamma`. Defaults to `"ones"`.
        v_initializer: Initializer for `v`. Defaults to `"ones"`.
        beta_regularizer: Optional regularizer for `beta`. Defaults to `None`.
        gamma_regularizer: Optional regularizer for `gamma`. Defaults to `None`.
        v_regularizer: Optional regularizer for `v`. Defaults to `None`.
        beta_constraint: Optional constraint for `beta`. Defaults to `None`.
        gamma_constraint: Optional constraint for `gamma`. Defaults to `None`.
        v_constraint: Optional constraint for `v`. Defaults to `None`.
        **kwargs: Base layer keyword arguments (e.g. `name`, `dtype`).

    Call arguments:
        inputs: Input tensor of rank >= 2, batch axis first. A Keras mask is passed on
            unchanged; masked positions still enter the statistics.

    Reference:
        - [Liu et al., 2020, Evolving Normalization-Activation Layers](
          https://arxiv.org/abs/2004.02967)
    """

    def __init__(
        self,
        groups=32,
        axis=-1,
        epsilon=1e-5,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        v_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        v_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        v_constraint=None,
        **kwargs,
    ):
        super().__init__(
            axis=axis, epsilon=epsilon, center=center, scale=scale,
            beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            v_initializer=v_initializer, beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer, v_regularizer=v_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint,
            v_constraint=v_constraint, **kwargs,
        )
        self.groups = base.check_int(self.__class__.__name__, "groups", groups, minimum=1)

    def _validate_channels(self, channels):
        if channels % self.groups:
            raise ValueError(
                f"{self._owner}: the number of channels ({channels}) must be a multiple of "
                f"`groups`. Received: groups={self.groups}, input channels={channels}"
            )

    def call(self, inputs):
        x = base.to_statistics_dtype(inputs)
        grouped, moments = stats.group_moments(x, self._axis, self.groups)
        v = stats.split_channels(self._channel_parameter(self.v, x.dtype), self._axis,
                                 self.groups)
        # gamma is folded into the per-(example, group) scale before it meets the full-size
        # tensor (see `_apply_affine`), here in the grouped layout.
        gamma, beta = self._affine_parameters(x.dtype, self._param_shape)
        scale = tf.math.rsqrt(moments.variance + self.epsilon)
        if gamma is not None:
            scale = scale * stats.split_channels(gamma, self._axis, self.groups)
        outputs = grouped * tf.sigmoid(v * grouped) * scale
        if beta is not None:
            outputs = outputs + stats.split_channels(beta, self._axis, self.groups)
        return tf.cast(tf.reshape(outputs, tf.shape(x)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}
