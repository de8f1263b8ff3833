"""Batch normalization: a superset of `keras.layers.BatchNormalization`."""

import keras
import tensorflow as tf
from keras import initializers

from keras_norm import _compat, _math
from keras_norm.layers import base, docstrings

RENORM_CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def _clone_initializer(initializer):
    """A fresh copy of a (possibly seeded) initializer, so two weights don't share draws."""
    if isinstance(initializer, initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


def _check_renorm_clipping(owner, renorm_clipping):
    """The clipping bounds given (None values dropped); Keras's checks, with Keras's wording."""
    if renorm_clipping is None:
        return {}
    if not isinstance(renorm_clipping, dict):
        raise base.ArgumentTypeError(
            f"{owner}: argument `renorm_clipping` must be a dict with keys "
            f"{list(RENORM_CLIPPING_KEYS)}. Received: renorm_clipping={renorm_clipping!r}"
        )
    unknown = sorted(set(renorm_clipping) - set(RENORM_CLIPPING_KEYS), key=repr)
    if unknown:
        raise ValueError(
            f"{owner}: Received invalid keys for `renorm_clipping` argument: {unknown}. "
            f"Supported values: {list(RENORM_CLIPPING_KEYS)}. "
            f"Received: renorm_clipping={renorm_clipping!r}"
        )
    clipping = {key: base.check_float(owner, f"renorm_clipping['{key}']", value)
                for key, value in renorm_clipping.items() if value is not None}
    for key, value in clipping.items():
        if value < 0:
            raise ValueError(
                f"{owner}: {key} should be non-negative in the `renorm_clipping` argument. "
                f"Received: {key}={value}"
            )
    rmin, rmax = clipping.get("rmin"), clipping.get("rmax")
    if rmin is not None and rmax is not None and rmax < rmin:
        raise ValueError(
            f"{owner}: rmax should be greater than rmin in the `renorm_clipping` argument. "
            f"Received: rmax={rmax}, rmin={rmin}"
        )
    return clipping


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class BatchNormalization(base.BatchDependentMixin, base.ChannelwiseNormalization):
    """Batch normalization with synchronized, ghost-batch and batch-statistics options.

    A drop-in replacement for `keras.layers.BatchNormalization` (Keras 3): the same arguments,
    defaults, weights (names, order, shapes) and training/inference behaviour, so existing code
    and saved weights work unchanged. On top of it:

    - `synchronized=True` computes exact cross-replica statistics, equal to one device on the
      global batch even when `|mean| >> std` (Keras uses `E[x^2] - E[x]^2`): the global mean
      from all-reduced `(count, sum)`, then the all-reduced sum of squares about it (with a
      mask: each replica's `(count, mean, M2)` merged with Chan's formula). Replicas are
      weighted by their true counts (uneven last batch, masks; an empty replica gives no NaN).
      The backward pass is the closed form of `keras_norm._math.standardize`: one all-reduce
      of two per-channel sums, as PyTorch's SyncBatchNorm. Outside a strategy it is plain BN.
    - `virtual_batch_size=v` (ghost batch norm, Hoffer et al. 2017): statistics per group of
      `v` consecutive examples of each replica's batch. A batch that `v` does not divide ends
      with one smaller group. Moving statistics track the count-weighted average of the
      groups' means and variances (the plain average when all groups are full).
    - `inference_statistics="batch"`: at inference, normalize with the current batch's own
      statistics (transductive evaluation) and leave the moving statistics untouched.
    - Masks are exact (Keras adds `1e-7` to the count) and work when synchronized.
    - Under `MirroredStrategy` without synchronization, the moving statistics become the
      average of the replicas' updates (Keras keeps divergent per-replica copies).

    ```
    training:   y = gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta
    inference:  y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta
    moving_stat = momentum * moving_stat + (1 - momentum) * batch_stat
    ```

    Example:

    >>> import numpy as np, keras, keras_norm
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3),
    ...     keras_norm.BatchNormalization(virtual_batch_size=4),
    ...     keras.layers.ReLU(),
    ... ])
    >>> model(np.zeros((10, 8, 8, 3), "float32"), training=True).shape
    TensorShape([10, 6, 6, 4])

    Args:
        axis: Integer, the features (channel) axis. Defaults to `-1`.
        momentum: Momentum of the moving averages, in `[0, 1]`. Defaults to `0.99`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        {affine_args}
        {moving_initializer_args}
        renorm: Whether to use Batch Renormalization (Ioffe 2017): during training the
            normalized value is corrected to `x_hat * r + d` with
            `r = stop_gradient(clip(sigma_B / sigma))`, `d = stop_gradient(clip((mu_B - mu) /
            sigma))` from renorm moving statistics. Adds the weights `moving_stddev`,
            `renorm_mean`, `renorm_stddev` (as Keras). Defaults to `False`.
        renorm_clipping: Dict with optional keys `"rmax"`, `"rmin"`, `"dmax"` bounding `r`
            to `[rmin, rmax]` and `d` to `[-dmax, dmax]`; missing keys mean no bound. Only
            valid with `renorm=True`. Defaults to `None`.
        renorm_momentum: Momentum of the renorm moving statistics. Defaults to `0.99`.
        synchronized: If `True`, compute statistics over the global batch of all replicas
            under a `tf.distribute` strategy (exactly, see above). Defaults to `False`.
        virtual_batch_size: Positive int or `None`; size of the ghost batches each replica's
            batch is split into. Cannot be combined with `synchronized=True`. Defaults to
            `None` (the whole batch).
        {inference_statistics_arg}
        {kwargs_arg}

    Call arguments:
        inputs: Input tensor of any rank >= 2.
        training: Python bool. `True` normalizes with the batch statistics and updates the
            moving ones (only if the layer is trainable: `trainable=False` freezes the layer
            in inference mode, as in Keras).
        mask: Optional boolean tensor of the input's shape without its LAST axis (Keras's
            layout, e.g. from `keras.layers.Masking`): it covers the leading axes and is
            broadcast over the last one, whatever `axis` is, exactly as Keras's layer. With
            channels last it flags positions; with `axis=1` on `(N, C, L)` inputs the
            `(N, C)` mask flags (example, channel) pairs for all of `L`. Size-1 axes broadcast
            (e.g. `(N, T, 1)` for `(N, T, H, C)`). Masked values do not enter the statistics
            (they are still normalized); a channel with no valid value gets mean and variance
            0, as in Keras.

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167)
        - [Ioffe, 2017, Batch Renormalization](https://arxiv.org/abs/1702.03275)
        - [Hoffer et al., 2017, Train longer, generalize better](https://arxiv.org/abs/1705.08741)
    """

    #: Statistics that are biased variances (`recompute_statistics(unbiased=True)` corrects them).
    variance_statistics = ("moving_variance",)
    #: As Keras's layer, any axis may hold the channels (axis 0 too, without ghost batches).
    per_example = False

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, renorm=False, renorm_clipping=None, renorm_momentum=0.99,
                 synchronized=False, virtual_batch_size=None, inference_statistics="moving",
                 **kwargs):
        super().__init__(**base.base_arguments(locals()), **kwargs)
        owner = self.__class__.__name__
        self.renorm = base.check_bool(owner, "renorm", renorm)
        if renorm_clipping is not None and not renorm:
            raise ValueError(
                f"{owner}: argument `renorm_clipping` is only used with renorm=True. "
                f"Received: renorm_clipping={renorm_clipping!r}, renorm=False"
            )
        self._clipping = _check_renorm_clipping(owner, renorm_clipping)
        self.renorm_clipping = renorm_clipping
        self.renorm_momentum = base.check_float(owner, "renorm_momentum", renorm_momentum,
                                                0.0, 1.0)
        self.virtual_batch_size = base.check_int(owner, "virtual_batch_size",
                                                 virtual_batch_size, minimum=1,
                                                 allow_none=True)
        if self.synchronized and self.virtual_batch_size is not None:
            raise ValueError(
                f"{owner}: ghost batches are formed within each replica's batch, so "
                "`virtual_batch_size` cannot be combined with synchronized=True. "
                f"Received: virtual_batch_size={virtual_batch_size}, synchronized=True"
            )
        self.moving_mean = None
        self.moving_variance = None

    # ------------------------------------------------------------------------------- build
    def _validate_channels(self, channels, input_shape):
        if self.virtual_batch_size is not None and self._axis == 0:
            raise ValueError(
                f"{self._owner}: ghost batches split axis 0, which cannot be the channel axis. "
                f"Received: axis={self.axis}, virtual_batch_size={self.virtual_batch_size}"
            )

    def _build_extra(self):
        shape = (self._channels,)
        self._add_moving_statistics(shape)
        if self.renorm:
            def moving_stddev_initializer(shape, dtype=None):
                return tf.sqrt(_clone_initializer(self.moving_variance_initializer)(
                    shape, dtype=dtype))

            self.moving_stddev = base.add_statistic(self, "moving_stddev", shape,
                                                    moving_stddev_initializer)
            self.renorm_mean = base.add_statistic(
                self, "renorm_mean", shape, _clone_initializer(self.moving_mean_initializer))
            self.renorm_stddev = base.add_statistic(self, "renorm_stddev", shape,
                                                    moving_stddev_initializer)

    # -------------------------------------------------------------------------------- call
    def call(self, inputs, training=None, mask=None):
        x = base.to_statistics_dtype(inputs)
        mask = self._expand_mask(mask, x)  # Keras's layout, any channel axis
        gamma, beta = self._affine_parameters(x.dtype, self._param_shape)
        if not self._uses_batch_statistics(training):
            mean = tf.reshape(tf.cast(self.moving_mean, x.dtype), self._param_shape)
            variance = tf.reshape(tf.cast(self.moving_variance, x.dtype), self._param_shape)
            outputs = _math.normalize(x, mean, variance, self.epsilon, gamma, beta)
        elif self.virtual_batch_size is not None:
            outputs = self._normalize_ghost(x, mask, gamma, beta, self._is_training(training))
        elif self._can_use_fused_kernel(x, mask, training):
            outputs = self._normalize_fused(x, self._is_training(training))
        elif mask is None:
            # Batch statistics the fused kernel does not cover (renorm, synchronized, other
            # layouts and ranks, float64): a closed-form gradient instead of differentiating
            # the composed moments.
            outputs, moments = self._standardize(x, self._reduction_axes, gamma, beta, training,
                                                 self.synchronized)
            if self._is_training(training):
                self._update_statistics(moments.mean, moments.variance,
                                        tf.reduce_sum(moments.count) > 0, after=outputs)
        else:
            moments = _math.batch_moments(x, self._reduction_axes, mask, self.synchronized)
            mean, variance = moments.mean, moments.variance
            outputs = self._normalize_with(x, mean, variance, gamma, beta, training)
            if self._is_training(training):
                self._update_statistics(mean, variance, tf.reduce_sum(moments.count) > 0)
        return tf.cast(outputs, self.compute_dtype)

    # ------------------------------------------------------------------------ fused kernel
    def _can_use_fused_kernel(self, x, mask, training):
        """Whether TF's fused batch-norm kernel computes exactly what the general path does.

        The fused kernel (two-pass statistics, as accurate as ours) is about 1.4x faster on
        CPU without XLA; it covers plain NHWC float32 batch norm. Everything else (masks,
        renorm, cross-replica statistics, other layouts or ranks, float64, epsilon below the
        kernel's 1.001e-5 floor) takes the general path.
        """
        synchronized = self.synchronized and _math.num_replicas_in_sync() > 1
        return (len(x.shape) == 4 and self._axis == 3 and mask is None and x.dtype == tf.float32
                and not synchronized and not (self.renorm and self._is_training(training))
                and self.epsilon >= 1.001e-5)

    def _normalize_fused(self, x, training):
        channels = x.shape[-1]
        gamma = tf.ones([channels]) if self.gamma is None else tf.cast(self.gamma, x.dtype)
        beta = tf.zeros([channels]) if self.beta is None else tf.cast(self.beta, x.dtype)
        outputs, mean, variance = _compat.fused_batch_norm(x, gamma, beta, self.epsilon)
        if training:
            # The kernel returns the Bessel-corrected variance; the moving variance tracks the
            # biased one, as the general path (and Keras) do.
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
            variance = tf.where(count > 1, variance * (count - 1) / count, 0.0)
            self._update_statistics(mean, variance, count > 0)
        return outputs

    def _standardize(self, x, axes, gamma, beta, training, synchronized=False):
        """Unmasked batch statistics through the closed-form steps of `stats`, with the renorm
        correction when training."""
        if self.renorm and self._is_training(training):
            return _math.standardize_with(x, axes, self.epsilon, self._renormalized_statistics,
                                          gamma, beta, synchronized)
        return _math.standardize(x, axes, self.epsilon, gamma, beta, synchronized)

    def _normalize_with(self, x, mean, variance, gamma, beta, training):
        """Normalizes with batch statistics, applying the renorm correction when training."""
        if self.renorm and self._is_training(training):
            mean, variance = self._renormalized_statistics(mean, variance)
        return _math.normalize(x, mean, variance, self.epsilon, gamma, beta)

    def _normalize_ghost(self, x, mask, gamma, beta, training):
        """Per-ghost-batch statistics: regroup `(B, ...)` as `(G, v, ...)`, normalize, undo."""
        if mask is None:
            batch_size = x.shape[0]
            if batch_size is not None:
                if batch_size % self.virtual_batch_size == 0:
                    return self._normalize_ghost_even(x, gamma, beta, training)
            else:
                divides = tf.equal(tf.math.floormod(tf.shape(x)[0], self.virtual_batch_size), 0)
                return tf.cond(
                    divides, lambda: self._normalize_ghost_even(x, gamma, beta, training),
                    lambda: self._normalize_ghost_padded(x, mask, gamma, beta, training))
        return self._normalize_ghost_padded(x, mask, gamma, beta, training)

    def _normalize_ghost_even(self, x, gamma, beta, training):
        """Ghost batches that split the batch evenly, unmasked: a reshape (no padding or mask)
        and `_math.standardize`'s closed-form gradient, per group."""
        grouped = tf.reshape(x, tf.concat([[-1, self.virtual_batch_size], tf.shape(x)[1:]], 0))
        shape = [1] + self._param_shape
        gamma = None if gamma is None else tf.reshape(gamma, shape)
        beta = None if beta is None else tf.reshape(beta, shape)
        outputs, moments = self._standardize(grouped, [a + 1 for a in self._reduction_axes],
                                             gamma, beta, training)
        if training:
            batch_mean, batch_variance, count = _math.combine_groups(moments)
            self._update_statistics(batch_mean, batch_variance, tf.reduce_sum(count) > 0,
                                    after=outputs)
        return tf.reshape(outputs, tf.shape(x))

    def _normalize_ghost_padded(self, x, mask, gamma, beta, training):
        """The general ghost path: a last group smaller than the others, masks, renorm."""
        grouped, valid, batch_size = _math.split_into_groups(x, self.virtual_batch_size, mask)
        group_axes = [a + 1 for a in self._reduction_axes]
        moments = _math.moments(grouped, group_axes, valid)
        shape = [1] + self._param_shape
        gamma = None if gamma is None else tf.reshape(gamma, shape)
        beta = None if beta is None else tf.reshape(beta, shape)
        mean, variance = moments.mean, moments.variance
        outputs = self._normalize_with(grouped, mean, variance, gamma, beta, training)
        if training:
            batch_mean, batch_variance, count = _math.combine_groups(moments)
            self._update_statistics(batch_mean, batch_variance, tf.reduce_sum(count) > 0)
        return _math.merge_groups(outputs, batch_size)

    # ---------------------------------------------------------------------------- renorm
    def _renorm_correction(self, mean, variance):
        """`(r, d)` of Batch Renormalization, clipped and without gradient."""
        stddev = tf.sqrt(variance + self.epsilon)
        renorm_mean = tf.reshape(tf.cast(self.renorm_mean, mean.dtype), self._param_shape)
        # The renorm stddev can approach 0 early in training: bound it as Keras does.
        renorm_stddev = tf.maximum(
            tf.reshape(tf.cast(self.renorm_stddev, mean.dtype), self._param_shape),
            tf.sqrt(tf.constant(self.epsilon, mean.dtype)),
        )
        r = stddev / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        if "rmin" in self._clipping:
            r = tf.maximum(r, self._clipping["rmin"])
        if "rmax" in self._clipping:
            r = tf.minimum(r, self._clipping["rmax"])
        if "dmax" in self._clipping:
            d = tf.clip_by_value(d, -self._clipping["dmax"], self._clipping["dmax"])
        return tf.stop_gradient(r), tf.stop_gradient(d)

    def _renormalized_statistics(self, mean, variance):
        """Batch Renormalization as statistics to normalize by: with the constant `(r, d)` of
        `_renorm_correction`, `x_hat r + d = (x - M) / s` for `s = sqrt(var + eps) / r` and
        `M = mean - d s`. Returns `(M, s^2 - eps)`; gradients pass through `mean` and
        `variance` as in `gamma (x_hat r + d) + beta`."""
        r, d = self._renorm_correction(mean, variance)
        scale = tf.sqrt(variance + self.epsilon) / r
        return mean - d * scale, tf.square(scale) - self.epsilon

    # ------------------------------------------------------------------ moving statistics
    def _update_statistics(self, mean, variance, has_values, after=None):
        """Moves the population statistics towards the batch's (skipped for an empty batch).

        `after`: the outputs, when they were computed from the renorm statistics inside
        `_math.standardize_with`'s custom gradient and its XLA kernels. The update then waits for
        them: in a traced ghost-batch step, automatic control dependencies alone let the
        correction see the updated statistics in some runs (found by the reference test).
        """
        if after is not None and self.renorm:
            with tf.control_dependencies([after]):
                return self._update_statistics(mean, variance, has_values)
        if not self.renorm:
            _math.assign_moving_average(self.moving_mean, mean, self.momentum, has_values)
            _math.assign_moving_average(self.moving_variance, variance, self.momentum,
                                        has_values)
            return
        stddev = tf.sqrt(variance + self.epsilon)
        _math.assign_moving_average(self.renorm_mean, mean, self.renorm_momentum, has_values)
        _math.assign_moving_average(self.renorm_stddev, stddev, self.renorm_momentum,
                                    has_values)
        _math.assign_moving_average(self.moving_mean, mean, self.momentum, has_values)
        _math.assign_moving_average(self.moving_stddev, stddev, self.momentum, has_values)
        # Inference reads moving_variance; derive it from the tracked stddev (>= 0).
        moving_stddev = tf.convert_to_tensor(self.moving_stddev)
        self.moving_variance.assign(tf.nn.relu(tf.square(moving_stddev) - self.epsilon))

    # ----------------------------------------------------------------------------- config
    def get_config(self):
        config = {
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "virtual_batch_size": self.virtual_batch_size,
        }
        return {**super().get_config(), **config}
