"""EvoNorm-B0 and EvoNorm-S0: normalization-activation layers (Liu et al., 2020).

Each replaces a normalization *and* the activation after it (do not add a ReLU behind them).
B0 divides by the larger of a batch and an instance standard deviation; S0 is a Swish-like
numerator over a group standard deviation. Neither subtracts a mean.
"""

import keras
import tensorflow as tf

from keras_norm import _math
from keras_norm.layers import base, docstrings


class _EvoNorm(base.ChannelwiseNormalization):
    """The part EvoNorm-B0 and -S0 share: the per-channel weight `v` and its arguments."""

    def __init__(self, axis, epsilon, v_initializer="ones", v_regularizer=None,
                 v_constraint=None, **kwargs):
        super().__init__(axis=axis, epsilon=epsilon, **kwargs)
        self._init_weight_arguments("v", v_initializer, v_regularizer, v_constraint)
        self.v = None

    def _build_extra(self):
        self.v = self._add_learned("v", (self._channels,))

    def get_config(self):
        return {**super().get_config(), **self._weight_arguments_config("v")}


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
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

    >>> import numpy as np
    >>> from keras_norm.layers.evonorm import EvoNormB0
    >>> layer = EvoNormB0(momentum=0.9)  # replaces BatchNormalization + ReLU
    >>> x = np.random.default_rng(0).normal(0.0, 2.0, size=(4, 6, 6, 8)).astype("float32")
    >>> layer(x, training=True).shape
    TensorShape([4, 6, 6, 8])
    >>> [weight.name for weight in layer.weights]
    ['gamma', 'beta', 'v', 'moving_variance']
    >>> bool(layer.moving_variance.numpy().mean() > 1.0)  # moved towards the batch's ~4
    True

    Args:
        axis: Integer, the channel axis. Defaults to `-1`.
        momentum: Momentum of the moving variance, in `[0, 1]`. Defaults to `0.99`.
        epsilon: Positive float added to both variances. Defaults to `1e-5` (the paper's).
        {affine_args}
        {v_args}
        moving_variance_initializer: Initializer for the moving variance. Defaults to `"ones"`.
        synchronized: If `True`, compute the batch variance over the global batch of all
            replicas under a `tf.distribute` strategy. Defaults to `False`.
        inference_statistics: `"moving"` or `"batch"`: the batch variance used at inference.
            Defaults to `"moving"`.
        {kwargs_arg}

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

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-5, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones", v_initializer="ones",
                 moving_variance_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 v_regularizer=None, beta_constraint=None, gamma_constraint=None, v_constraint=None,
                 synchronized=False, inference_statistics="moving", **kwargs):
        super().__init__(v_initializer=v_initializer, v_regularizer=v_regularizer,
                         v_constraint=v_constraint, **base.base_arguments(locals()), **kwargs)
        self.moving_variance = None

    def _build_extra(self):
        super()._build_extra()
        self._add_moving_statistics((self._channels,))

    def call(self, inputs, training=None):
        x = base.to_statistics_dtype(inputs)
        v = self._channel_parameter(self.v, x.dtype)
        gamma, beta = self._affine_parameters(x.dtype, self._param_shape)
        gamma = tf.ones(self._param_shape, x.dtype) if gamma is None else gamma
        beta = tf.zeros(self._param_shape, x.dtype) if beta is None else beta
        moving_variance = None
        if not self._uses_batch_statistics(training):
            moving_variance = self._channel_parameter(self.moving_variance, x.dtype)
        outputs, batch = _evonorm_b0(
            x, v, gamma, beta, moving_variance, spatial_axes=tuple(self._spatial_axes),
            epsilon=self.epsilon, synchronized=self.synchronized)
        if self._is_training(training):
            # `self.momentum` is read now, not at build time (recompute_statistics swaps it).
            _math.assign_moving_average(self.moving_variance, batch.variance, self.momentum,
                                        tf.reduce_sum(batch.count) > 0)
        return tf.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
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

    >>> import numpy as np
    >>> from keras_norm.layers.evonorm import EvoNormS0
    >>> layer = EvoNormS0(groups=4)  # replaces GroupNormalization + ReLU
    >>> x = np.random.default_rng(0).normal(size=(2, 6, 6, 8)).astype("float32")
    >>> bool(np.allclose(layer(x, training=True), layer(x, training=False)))  # no batch state
    True

    Args:
        groups: Positive int, the number of channel groups; it must divide the number of
            channels. Defaults to `32` (the paper's).
        axis: Integer, the channel axis. Defaults to `-1`.
        epsilon: Positive float added to the variance. Defaults to `1e-5` (the paper's).
        {affine_args}
        {v_args}
        {kwargs_arg}

    Call arguments:
        inputs: Input tensor of rank >= 2, batch axis first. A Keras mask is passed on
            unchanged; masked positions still enter the statistics.

    Reference:
        - [Liu et al., 2020, Evolving Normalization-Activation Layers](
          https://arxiv.org/abs/2004.02967)
    """

    def __init__(self, groups=32, axis=-1, epsilon=1e-5, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones", v_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, v_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, v_constraint=None, **kwargs):
        super().__init__(v_initializer=v_initializer, v_regularizer=v_regularizer,
                         v_constraint=v_constraint, **base.base_arguments(locals()), **kwargs)
        self.groups = base.check_int(self.__class__.__name__, "groups", groups, minimum=1)

    def _validate_channels(self, channels, input_shape):
        if channels % self.groups:
            raise ValueError(
                f"{self._owner}: the number of channels ({channels}) must be a multiple of "
                f"`groups`. Received: groups={self.groups}, input channels={channels}"
            )

    def call(self, inputs):
        x = base.to_statistics_dtype(inputs)
        grouped = _math.split_channels(x, self._axis, self.groups)
        axes = tuple(a for a in range(1, len(grouped.shape)) if a != self._axis)

        def grouped_parameter(weight, default):
            value = default if weight is None else self._channel_parameter(weight, x.dtype)
            return _math.split_channels(tf.broadcast_to(value, self._param_shape), self._axis,
                                        self.groups)

        v = grouped_parameter(self.v, None)
        gamma = grouped_parameter(self.gamma, tf.ones(self._param_shape, x.dtype))
        beta = grouped_parameter(self.beta, tf.zeros(self._param_shape, x.dtype))
        outputs = _evonorm_s0(grouped, v, gamma, beta, axes, self.epsilon)
        return tf.cast(tf.reshape(outputs, tf.shape(x)), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


# ------------------------------------------------------------------ EvoNorm-B0 closed form
def _evonorm_b0(x, v, gamma, beta, moving_variance, *, spatial_axes, epsilon, synchronized):
    """`x / max(sqrt(var_b + eps), v x + sqrt(var_i + eps)) * gamma + beta` with a
    hand-written backward pass.

    `var_b` is the batch variance (merged across replicas when `synchronized`) or, when
    `moving_variance` is given, that constant. Returns `(outputs, batch Moments)`; the
    moments carry no gradient (they feed the moving average).

    The batch moments are merged from the instance moments (Chan's formula on `(N, C)`
    values), so the forward pass reads `x` three times (two-pass instance moments, then the
    output); the backward pass twice (the sums below, then the input gradient). With
    `d = max(s_b, v x + s_i)`, `A = [s_b >= v x + s_i]` and `q = -dy gamma x / d^2`:

        dx = dy gamma / d + q v (1 - A) + dvar_i 2 (x - mean_i) / n_i + dvar_b 2 (x - mean_b) / n_b
        dvar_i = sum_spatial q (1 - A) / (2 s_i),   dvar_b = sum_batch q A / (2 s_b)
        dv = sum q x (1 - A),   dgamma = sum dy x / d,   dbeta = sum dy

    When synchronized, `dvar_b` is summed over replicas (one all-reduce of a per-channel
    vector), as one device computes it on the global batch.
    """
    use_batch = moving_variance is None
    sync = use_batch and synchronized and _math.num_replicas_in_sync() > 1
    rank = len(x.shape)

    @tf.custom_gradient
    def forward(x, v, gamma, beta):
        instance = _b0_instance_moments(x, axes=spatial_axes)
        batch = _math.Moments(tf.zeros([1] * rank, x.dtype), tf.zeros([1] * rank, x.dtype),
                              tf.zeros([1] * rank, x.dtype))
        if use_batch:
            batch = _math.merge_moments(instance, [0])
            if sync:
                batch = _math.merge_across_replicas(batch)
            batch_variance = batch.variance
        else:
            batch_variance = moving_variance
        batch_std = tf.sqrt(batch_variance + epsilon)
        instance_std = tf.sqrt(instance.variance + epsilon)
        outputs = _b0_outputs(x, v, gamma, beta, batch_std, instance_std)

        def backward(d_outputs, *_statistics_gradients):
            d_v, d_gamma, d_beta, d_instance_std, d_batch_std = _b0_backward_sums(
                d_outputs, x, v, gamma, beta, batch_std, instance_std, spatial_axes=spatial_axes)
            # d std / d var = 1 / (2 std); d var / dx = 2 (x - mean) / n: the 2s cancel.
            instance_coefficient = tf.math.divide_no_nan(d_instance_std / instance_std,
                                                         instance.count)
            batch_coefficient = tf.zeros([1] * rank, x.dtype)
            if use_batch:
                if sync:
                    d_batch_std = _math.all_reduce_sum(d_batch_std)
                batch_coefficient = tf.math.divide_no_nan(d_batch_std / batch_std, batch.count)
            d_x = _b0_backward_input(d_outputs, x, v, gamma, batch_std, instance_std,
                                     instance.mean, batch.mean, instance_coefficient,
                                     batch_coefficient)
            return d_x, d_v, d_gamma, d_beta

        count = tf.broadcast_to(batch.count, tf.shape(batch.mean))
        return (outputs, count, batch.mean, batch.m2), backward

    return _math.outputs_and_moments(*forward(x, v, gamma, beta))


@_math.fused
def _b0_instance_moments(x, *, axes):
    """Per-example, per-channel moments over the spatial axes (none: each value alone)."""
    return _math.moments(x, axes)


@_math.fused
def _b0_outputs(x, v, gamma, beta, batch_std, instance_std):
    return x / tf.maximum(batch_std, v * x + instance_std) * gamma + beta


def _b0_denominator(x, v, batch_std, instance_std):
    """`(1 / d, A)`: the reciprocal of the denominator and where the batch term wins it
    (float 0/1; ties count as the batch's, as `tf.maximum`'s gradient does)."""
    instance_term = v * x + instance_std
    batch_wins = tf.cast(batch_std >= instance_term, x.dtype)
    return 1.0 / tf.maximum(batch_std, instance_term), batch_wins


@_math.fused
def _b0_backward_sums(d_outputs, x, v, gamma, beta, batch_std, instance_std, *, spatial_axes):
    """The reductions of EvoNorm-B0's backward pass (see `_evonorm_b0`).

    All five are sums over the spatial axes of terms of the same inputs, taken as one
    reduction of the terms stacked on a new last axis: XLA's CPU backend then reads `x` and
    `dy` once for all of them instead of once per sum (four such sums on a (128, 32, 32, 64)
    input: 93 ms separately, 67 ms stacked, on the 2-core CPU). `gamma` is factored out of
    the sums (`q = -gamma dy x / d^2`); the batch sums finish on the per-example results.
    """
    inv_denominator, batch_wins = _b0_denominator(x, v, batch_std, instance_std)
    ratio_dy = d_outputs * x * inv_denominator            # dy x / d
    weighted = ratio_dy * inv_denominator                  # dy x / d^2 = -q / gamma
    instance_wins = 1.0 - batch_wins
    terms = tf.stack([ratio_dy, weighted * instance_wins * x, weighted * batch_wins,
                      weighted * instance_wins, d_outputs], axis=-1)
    (sum_ratio_dy, sum_v_term, sum_batch_term, sum_instance_term,
     sum_dy) = tf.unstack(_math.sum_over(terms, list(spatial_axes)), axis=-1)
    d_gamma = _math.sum_to(sum_ratio_dy, gamma)
    d_v = _math.sum_to(-gamma * sum_v_term, v)
    d_batch_std = -gamma * tf.reduce_sum(sum_batch_term, [0], keepdims=True)
    d_instance_std = -gamma * sum_instance_term
    d_beta = _math.sum_to(sum_dy, beta)
    return d_v, d_gamma, d_beta, d_instance_std, d_batch_std


@_math.fused
def _b0_backward_input(d_outputs, x, v, gamma, batch_std, instance_std, instance_mean,
                       batch_mean, instance_coefficient, batch_coefficient):
    """The input gradient of EvoNorm-B0 (see `_evonorm_b0`)."""
    inv_denominator, batch_wins = _b0_denominator(x, v, batch_std, instance_std)
    g = d_outputs * gamma * inv_denominator
    # g (1 - x v (1 - A) / d): the direct term and the numerator's share of the instance term.
    d_x = g * (1.0 - x * v * (1.0 - batch_wins) * inv_denominator)
    return (d_x + instance_coefficient * (x - instance_mean)
            + batch_coefficient * (x - batch_mean))


# ------------------------------------------------------------------ EvoNorm-S0 closed form
def _evonorm_s0(grouped, v, gamma, beta, axes, epsilon):
    """`x * sigmoid(v x) / sqrt(var + eps) * gamma + beta` on the grouped layout, variance
    over `axes` (per example and group), with a hand-written backward pass.

    With `s = sigmoid(v x)`, `h = x s` and `r = 1 / sqrt(var + eps)` (`y = h r gamma + beta`):

        dh = dy gamma r,   dx = dh (s + v x s (1 - s)) - r^3 (x - mean) mean(dy gamma h)
        dv = sum dh x^2 s (1 - s),   dgamma = sum dy h r,   dbeta = sum dy

    (the second term of dx is the variance's: d var / dx = 2 (x - mean) / n, d r / d var =
    -r^3 / 2). Sums run over what the parameters are shared by.

    Three kernels: the forward pass, the backward sums, the input gradient. Each recomputes
    the gate `s` from `x` and nothing full-size is kept but `x`: in one backward kernel XLA
    writes `s` out (a sigmoid is too costly to duplicate into two fusions) and reads it back
    twice, which measured slower than computing it twice (forward+backward under model-level
    XLA, (128, 32, 32, 64), 2-core CPU: 1.5x -> 1.0x keras_norm BN).
    """

    @tf.custom_gradient
    def forward(x, v, gamma, beta):
        outputs, mean, inv_std = _s0_forward(x, v, gamma, beta, axes=axes, epsilon=epsilon)

        def backward(d_outputs):
            d_inv_std, d_v, d_gamma, d_beta = _s0_backward_sums(
                d_outputs, x, inv_std, v, gamma, beta, axes=axes)
            d_x = _s0_backward_input(d_outputs, x, mean, inv_std, d_inv_std, v, gamma,
                                     axes=axes)
            return d_x, d_v, d_gamma, d_beta

        return outputs, backward

    return forward(grouped, v, gamma, beta)


@_math.fused
def _s0_forward(x, v, gamma, beta, *, axes, epsilon):
    group = _math.moments(x, axes)
    inv_std = tf.math.rsqrt(group.variance + epsilon)
    outputs = x * tf.sigmoid(v * x) * (gamma * inv_std) + beta
    return outputs, group.mean, inv_std


@_math.fused
def _s0_backward_sums(d_outputs, x, inv_std, v, gamma, beta, *, axes):
    """`(d loss / d r, dv, dgamma, dbeta)` of EvoNorm-S0 (see `_evonorm_s0`)."""
    # Axes along which the per-channel parameters are constant (the spatial ones): reduced
    # first, on the input's size; the channels within a group are summed on small results.
    inner = [a for a in axes if gamma.shape[a] == 1]
    s = tf.sigmoid(v * x)
    # The three sums over the spatial axes as one reduction of stacked terms (see
    # `_b0_backward_sums`); gamma and r are constant there and scale the small results.
    terms = tf.stack([d_outputs * x * s, d_outputs * tf.square(x) * s * (1.0 - s), d_outputs],
                     axis=-1)
    sum_dy_h, sum_v_term, sum_dy = tf.unstack(_math.sum_over(terms, inner), axis=-1)
    d_inv_std = tf.reduce_sum(sum_dy_h * gamma, axes, keepdims=True)
    d_v = _math.sum_to(sum_v_term * gamma * inv_std, v)
    d_gamma = _math.sum_to(sum_dy_h * inv_std, gamma)
    d_beta = _math.sum_to(sum_dy, beta)
    return d_inv_std, d_v, d_gamma, d_beta


@_math.fused
def _s0_backward_input(d_outputs, x, mean, inv_std, d_inv_std, v, gamma, *, axes):
    """The input gradient of EvoNorm-S0 (see `_evonorm_s0`): the gate's path, then the
    variance's, spread over every value of its set."""
    s = tf.sigmoid(v * x)
    d_x_numerator = d_outputs * (gamma * inv_std) * (s + v * x * s * (1.0 - s))
    count = _math.count_over(x, axes)
    return d_x_numerator - (x - mean) * (inv_std ** 3 * d_inv_std / count)
