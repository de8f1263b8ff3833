"""Mixture normalization (Kalayeh & Shah 2018): normalize against a Gaussian mixture per batch.

Batch normalization assumes one Gaussian per channel; mixture normalization fits a K-component
Gaussian mixture to each training batch with a few EM iterations and normalizes every value
against the components it is softly assigned to (the Fisher-vector form of the abstract of
arXiv:1806.02892). The estimate is batched tensor algebra over all samples and channels at
once: thin matrix products with the `(N, K)` posteriors for one mixture over the channel vector,
K unrolled `(N, C)` slabs for per-channel mixtures. Only the (few) EM iterations and, per
channel, the (few) components are unrolled in the graph; nothing loops over samples or
channels, nothing leaves the device, and the layer compiles with XLA.
"""

import math
import statistics
from typing import NamedTuple

import keras
import tensorflow as tf

from keras_norm import _math
from keras_norm.layers import base, docstrings

MIXTURE_AXES = ("channels", "per_channel")
WARM_STARTS = ("aligned", "moving")
#: Why a mask that flags channels cannot be used with one mixture over the channel vector.
_ONE_POSTERIOR = ("with mixture_axes='channels' each position's channel vector is one sample "
                  "with one posterior (mixture_axes='per_channel', num_components=1 or "
                  "channels-last inputs take a mask per value)")


class Mixture(NamedTuple):
    """Parameters of a diagonal Gaussian mixture, in coordinates shifted by a per-channel shift.

    `weights` is `(K, 1)` for one mixture over the channel vector (`mixture_axes="channels"`)
    or `(K, C)` for one 1-D mixture per channel; `mean` and `variance` are `(K, C)`.
    """

    weights: tf.Tensor
    mean: tf.Tensor
    variance: tf.Tensor


class _Centred:
    """Samples minus a per-channel shift, `(N, C)`; their square is computed once, on demand."""

    def __init__(self, value):
        self.value = value
        self._square = None

    @property
    def square(self):
        if self._square is None:
            self._square = tf.square(self.value)
        return self._square


@tf.custom_gradient
def _weighted_sums(tau, xs, squares):
    """`(tau^T xs, tau^T xs^2)` for constant posteriors `tau` `(N, K)`; `squares = xs^2`.

    The gradient `tau @ d1 + xs * (tau @ 2 d2)` is written out: autodiff through `tf.square`
    would add two more full-size tensors (`2 * xs`, then the product).
    """
    sums = (tf.matmul(tau, xs, transpose_a=True), tf.matmul(tau, squares, transpose_a=True))

    def grad(d1, d2):
        dxs = tf.matmul(tau, d1) + xs * tf.matmul(tau, 2.0 * d2)
        return None, dxs, None

    return sums, grad


def seed_offsets(num_components):
    """Conditional means of N(0, 1) in `num_components` equiprobable bins, in increasing order.

    `E[Z | a_k < Z < a_{k+1}] = K (phi(a_k) - phi(a_{k+1}))` with `a_k = Phi^-1(k / K)`: the
    centres of a quantile split of a standard normal (0 for K = 1, +-0.798 for K = 2).
    """
    normal = statistics.NormalDist()
    edges = [-math.inf] + [normal.inv_cdf(k / num_components)
                           for k in range(1, num_components)] + [math.inf]

    def density(a):
        return 0.0 if math.isinf(a) else normal.pdf(a)

    return [num_components * (density(lo) - density(hi)) for lo, hi in zip(edges, edges[1:])]


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class MixtureNormalization(base.BatchDependentMixin, base.ChannelwiseNormalization):
    """Mixture normalization: normalizes each value against a Gaussian mixture fitted per batch.

    Each position of each example is a sample `x_i` (the C-vector of channels). In training, a
    K-component Gaussian mixture with diagonal covariances is fitted to the batch by
    `em_iterations` EM steps, and every sample is normalized against its soft-assigned
    components (Kalayeh & Shah 2018; docs/algorithms.md section 7):

    ```
    tau_ik  = lambda_k N(x_i | mu_k, var_k + eps) / sum_j lambda_j N(x_i | mu_j, var_j + eps)
    lambda_k = mean_i tau_ik,  mu_k = sum_i tau_ik x_i / sum_i tau_ik,
    var_k   = sum_i tau_ik (x_i - mu_k)^2 / sum_i tau_ik                      (M-step)
    x_hat_i = sum_k tau_ik / sqrt(lambda_k) * (x_i - mu_k) / sqrt(var_k + eps)
    y_i     = gamma * x_hat_i + beta
    moving_stat = momentum * moving_stat + (1 - momentum) * batch_stat   (lambda, mu, var)
    inference: the same x_hat with tau, lambda, mu, var from the moving mixture
    ```

    With `num_components=1`, `tau = lambda = 1` and the layer is exactly
    `keras_norm.BatchNormalization` (outputs, gradients, moving statistics, inference); it then
    runs batch norm's statistics code (`_math.batch_moments`, `_math.normalize`) directly.

    The paper's full text was not available: the choices made where the abstract and the
    Fisher-vector form leave it open, each with its reason, are in docs/algorithms.md section 7.
    In short: EM runs in log space on samples shifted by the batch's exact mean; the first batch
    is seeded by a quantile split along its principal direction and copied into the moving
    mixture, later batches warm-start from the moving mixture (`warm_start`); a component whose
    weight falls below `min_weight` keeps its previous mean and variance; posteriors are
    constants for the gradient unless `posterior_gradient=True`; `synchronized=True` makes every
    EM step, the output and the gradients equal one device on the global batch.

    Weights: `gamma`, `beta` `(C,)`; the moving mixture `moving_weights` (`(K,)`, or `(K, C)`
    per channel), `moving_mean` and `moving_variance` `(K, C)` (float32), initialised to the
    seed of standardized data (section 7.8), so inference before any training is a proper
    mixture normalization; `num_updates` (int64, the number of training updates, saved with the
    model).

    Example:

    >>> import numpy as np
    >>> from keras_norm.layers.mixture_norm import MixtureNormalization
    >>> layer = MixtureNormalization(num_components=3)
    >>> x = np.random.default_rng(0).normal(size=(8, 6, 6, 4)).astype("float32")
    >>> layer(x, training=True).shape
    TensorShape([8, 6, 6, 4])
    >>> tuple(layer.moving_mean.shape)  # (K, C): a mean per component and channel
    (3, 4)
    >>> int(layer.num_updates.numpy())  # seeded from this first batch
    1

    Args:
        num_components: Integer `K >= 1`, the number of mixture components. Defaults to `3`.
        axis: Integer, the channel axis. Defaults to `-1`.
        mixture_axes: `"channels"` (one diagonal mixture over the channel vector at each
            position) or `"per_channel"` (an independent 1-D mixture per channel). Defaults
            to `"channels"`.
        em_iterations: Integer `>= 1`, EM iterations (E-step then M-step) per batch, unrolled
            in the graph. Defaults to `2`.
        momentum: Momentum of the moving mixture, in `[0, 1]`; read at every call (it may be a
            `tf.Variable`). Defaults to `0.99`.
        epsilon: Positive float added to every component variance. Defaults to `1e-3`.
        {affine_args}
        fisher_scaling: If `True`, divide each component's term by `sqrt(lambda_k)` (the
            Fisher-vector form); if `False`, `x_hat = sum_k tau_k (x - mu_k) /
            sqrt(var_k + eps)`. Defaults to `True`.
        posterior_gradient: If `True`, differentiate through the posteriors of every unrolled
            EM step; if `False`, posteriors are constants and gradients flow through the final
            means and variances only. Defaults to `False`.
        warm_start: `"aligned"` (the moving mixture re-centred and re-scaled per channel to
            the batch's mean and variance) or `"moving"` (as it is): how EM starts after the
            first batch. Defaults to `"aligned"`.
        min_weight: Float in `(0, 1 / num_components)`: floor on the mixture weights, and the
            weight below which a component counts as empty. Defaults to `1e-3`.
        synchronized: If `True`, fit the mixture to the global batch of all replicas under a
            `tf.distribute` strategy (exactly). Defaults to `False`.
        inference_statistics: `"moving"` (the moving mixture) or `"batch"` (fit the mixture to
            the inference batch, leaving the moving mixture untouched). Defaults to
            `"moving"`.
        {kwargs_arg}

    Call arguments:
        inputs: Input tensor of any rank >= 2.
        training: Python bool. `True` fits the mixture to the batch, normalizes with it and
            updates the moving mixture (only if the layer is trainable: `trainable=False`
            runs the layer in inference mode, as for BatchNormalization).
        mask: Optional boolean tensor in Keras's layout (as `keras.layers.BatchNormalization`
            reads it): the input's shape without its LAST axis, covering the leading axes and
            broadcast over the last one, whatever `axis` is. Masked values do not enter the
            mixture estimate (they are still normalized). With channels last it flags
            samples; with the channels not last it flags channels of each example, which
            `mixture_axes="per_channel"` and `num_components=1` handle per value, and
            `mixture_axes="channels"` (one posterior per position) rejects with a
            `ValueError` unless the mask has size 1 on the channel axis.

    Reference:
        - [Kalayeh & Shah, 2018, Training Faster by Separating Modes of Variation in
          Batch-normalized Models](https://arxiv.org/abs/1806.02892)
    """

    #: The statistics `keras_norm.recompute_statistics` averages; `num_updates` is training
    #: state, which it restores after its pass.
    population_statistics = ("moving_weights", "moving_mean", "moving_variance")
    #: As batch normalization, any axis may hold the channels.
    per_example = False

    @property
    def variance_statistics(self):
        """Statistics `recompute_statistics(unbiased=True)` scales by `m / (m - 1)`.

        Only with K = 1 (BN's moving variance): a component's variance averages over an
        effective `sum_i tau_ik` values that changes from batch to batch, so BN's Bessel
        factor does not apply to it; the mixture variances stay biased.
        """
        return ("moving_variance",) if self.num_components == 1 else ()

    def __init__(self, num_components=3, axis=-1, mixture_axes="channels", em_iterations=2,
                 momentum=0.99, epsilon=1e-3, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, fisher_scaling=True,
                 posterior_gradient=False, warm_start="aligned", min_weight=1e-3,
                 synchronized=False, inference_statistics="moving", **kwargs):
        super().__init__(**base.base_arguments(locals()), **kwargs)
        owner = self.__class__.__name__
        self.num_components = base.check_int(owner, "num_components", num_components, 1)
        self.mixture_axes = base.check_choice(owner, "mixture_axes", mixture_axes,
                                              MIXTURE_AXES)
        self.em_iterations = base.check_int(owner, "em_iterations", em_iterations, 1)
        self.fisher_scaling = base.check_bool(owner, "fisher_scaling", fisher_scaling)
        self.posterior_gradient = base.check_bool(owner, "posterior_gradient",
                                                  posterior_gradient)
        self.warm_start = base.check_choice(owner, "warm_start", warm_start, WARM_STARTS)
        self.min_weight = base.check_float(owner, "min_weight", min_weight, 0.0, None,
                                           low_open=True)
        if self.min_weight * self.num_components >= 1.0:
            raise ValueError(
                f"{owner}: argument `min_weight` must be below 1 / num_components = "
                f"{1.0 / self.num_components:g}, or every component could count as empty. "
                f"Received: min_weight={min_weight!r}, num_components={num_components!r}"
            )
        self._offsets = seed_offsets(self.num_components)
        self.moving_weights = None
        self.moving_mean = None
        self.moving_variance = None
        self.num_updates = None

    # ------------------------------------------------------------------------------- build
    def _build_extra(self):
        channels, k = self._channels, self.num_components
        self._per_channel = self.mixture_axes == "per_channel"
        weight_shape = (k, channels) if self._per_channel else (k,)
        # The initial moving mixture is the seed a standardized input would get (see the class
        # docstring), so inference before any training is a proper mixture normalization.
        spread = 1.0 if self._per_channel else 1.0 / math.sqrt(channels)
        offsets = self._offsets

        def weights_initializer(shape, dtype=None):
            return tf.fill(shape, tf.constant(1.0 / k, dtype or "float32"))

        def mean_initializer(shape, dtype=None):
            column = tf.constant([[q * spread] for q in offsets], dtype or "float32")
            return tf.broadcast_to(column, shape)

        self.moving_weights = base.add_statistic(self, "moving_weights", weight_shape,
                                                 weights_initializer)
        self.moving_mean = base.add_statistic(self, "moving_mean", (k, channels),
                                              mean_initializer)
        self.moving_variance = base.add_statistic(self, "moving_variance", (k, channels),
                                                  "ones")
        # Every replica performs the same increment; the first replica's is kept.
        self.num_updates = self.add_weight(
            shape=(), name="num_updates", initializer="zeros", dtype="int64",
            trainable=False, autocast=False, aggregation="only_first_replica",
        )
        ndim = len(self._param_shape)
        self._to_last = None
        if self._axis != ndim - 1:
            self._to_last = [a for a in range(ndim) if a != self._axis] + [self._axis]
            self._from_last = list(range(self._axis)) + [ndim - 1] + list(
                range(self._axis, ndim - 1))

    # -------------------------------------------------------------------------------- call
    def call(self, inputs, training=None, mask=None):
        x = base.to_statistics_dtype(inputs)
        use_batch = self._uses_batch_statistics(training)
        one_posterior = use_batch and self.num_components > 1 and not self._per_channel
        mask = self._expand_mask(mask, x, _ONE_POSTERIOR if one_posterior else None)
        if self.num_components == 1:
            return tf.cast(self._call_single(x, mask, training), self.compute_dtype)
        # Inference with the moving mixture does not read the mask (as BatchNormalization).
        valid = self._sample_mask(mask, x) if use_batch else None
        if self._to_last is not None:
            x = tf.transpose(x, self._to_last)
        samples = tf.reshape(x, [-1, self._channels])
        gamma, beta = self._affine_parameters(samples.dtype)
        if use_batch:
            shift, xs, mixture, tau, count, first = self._fit(samples, valid)
        else:
            shift, mixture = self._moving_mixture(samples.dtype)
            xs = _Centred(samples - shift)
            tau = self._posteriors(xs, mixture)
        outputs = self._normalize(xs.value, mixture, tau, gamma, beta)
        if self._is_training(training):
            # Per-channel counts (a mask that flags channels) update if any value was valid.
            self._update_statistics(shift, mixture, tf.reduce_max(count), first)
        outputs = tf.reshape(outputs, tf.shape(x))
        if self._to_last is not None:
            outputs = tf.transpose(outputs, self._from_last)
        return tf.cast(outputs, self.compute_dtype)

    def _call_single(self, x, mask, training):
        """K = 1: tau = lambda = 1 and the mixture is the batch's mean and variance: BN's code,
        on the input as it is (no transpose, no reshape)."""
        gamma, beta = self._affine_parameters(x.dtype, self._param_shape)
        if not self._uses_batch_statistics(training):
            mean = tf.reshape(tf.cast(self.moving_mean, x.dtype), self._param_shape)
            variance = tf.reshape(tf.cast(self.moving_variance, x.dtype), self._param_shape)
            return _math.normalize(x, mean, variance, self.epsilon, gamma, beta)
        moments = _math.batch_moments(x, self._reduction_axes, mask, self.synchronized)
        mean, variance = moments.mean, moments.variance
        outputs = _math.normalize(x, mean, variance, self.epsilon, gamma, beta)
        if self._is_training(training):
            count = tf.reduce_max(moments.count)
            weights = tf.ones(self.moving_weights.shape, x.dtype)
            self._update_statistics(tf.zeros_like(mean), Mixture(weights, mean, variance),
                                    count, first=None)
        return outputs

    def _sample_mask(self, mask, x):
        """The mask from `base.expand_mask` in the samples' layout: `(N, 1)`, one flag per
        sample, or `(N, C)`, one per value, when it varies along the channel axis (Keras's
        layout with channels not last); `None` without a mask."""
        if mask is None:
            return None
        per_value = base.mask_varies_along(mask, self._axis)  # only per channel (see call)
        # Full size on every axis but the channels', then the samples' layout.
        shape = tf.unstack(tf.shape(x))
        shape[self._axis] = self._channels if per_value else 1
        mask = tf.broadcast_to(mask, tf.stack(shape))
        if self._to_last is not None:
            mask = tf.transpose(mask, self._to_last)
        return tf.reshape(mask, [-1, self._channels if per_value else 1])

    # ------------------------------------------------------------------------ EM pieces
    def _centred_moments(self, samples, valid):
        """Exact two-pass batch mean and variance that also return `x - mean` and its square.

        The same two passes as `_math.batch_moments` (global mean first, then the centred sum
        of squares; all-reduced when synchronized), arranged so that the centred samples and
        their squares, which every E- and M-step reads, are computed once and shared.
        """
        if valid is None:
            count = tf.cast(tf.shape(samples)[0], samples.dtype)
            total = tf.reduce_sum(samples, axis=0, keepdims=True)
        else:
            # One count per channel when the mask flags values (per-channel mixtures only).
            count = (tf.reduce_sum(valid) if valid.shape[-1] == 1
                     else tf.reduce_sum(valid, axis=0, keepdims=True))
            total = tf.reduce_sum(samples * valid, axis=0, keepdims=True)
        if self.synchronized:
            count, total = _math.all_reduce_sum((count, total))
        shift = tf.stop_gradient(tf.math.divide_no_nan(total, count))
        xs = _Centred(samples - shift)
        squares = xs.square if valid is None else xs.square * valid
        sum_squares = tf.reduce_sum(squares, axis=0, keepdims=True)
        if self.synchronized:
            sum_squares = _math.all_reduce_sum(sum_squares)
        variance = tf.stop_gradient(tf.math.divide_no_nan(sum_squares, count))
        return shift, xs, variance, count

    def _posteriors(self, xs, mixture):
        """E-step in log space: `(N, K)` posteriors, or per channel a list of K `(N, C)`."""
        variance = mixture.variance + self.epsilon
        log_weights = tf.math.log(tf.maximum(mixture.weights, self.min_weight))
        if self._per_channel:
            # The K components are unrolled: K full-size slabs beat one (N, K, C) tensor with
            # a softmax over its middle axis by 2-3x, with and without XLA.
            half_precision = 0.5 / variance
            constant = log_weights - 0.5 * tf.math.log(variance)
            logits = [constant[k] - half_precision[k] * tf.math.squared_difference(
                xs.value, mixture.mean[k]) for k in range(self.num_components)]
            top = logits[0]
            for logit in logits[1:]:
                top = tf.maximum(top, logit)
            exps = [tf.exp(logit - top) for logit in logits]
            inverse_total = 1.0 / tf.add_n(exps)
            return [e * inverse_total for e in exps]
        precision = 1.0 / variance
        scaled_mean = mixture.mean * precision
        # -0.5 sum_c (x - mu)^2 / v  =  x . (mu / v) - 0.5 x^2 . (1 / v) - 0.5 sum_c mu^2 / v
        constant = tf.reshape(log_weights, [-1]) - 0.5 * tf.reduce_sum(
            tf.math.log(variance) + mixture.mean * scaled_mean, axis=1)
        logits = (tf.matmul(xs.value, scaled_mean, transpose_b=True)
                  - 0.5 * tf.matmul(xs.square, precision, transpose_b=True) + constant)
        return tf.nn.softmax(logits, axis=1)

    def _maximize(self, xs, tau, valid, count, previous):
        """M-step from shifted sufficient statistics, all-reduced when synchronized."""
        if self._per_channel:
            if valid is not None:
                tau = [t * valid for t in tau]
            s0 = tf.stack([tf.reduce_sum(t, axis=0) for t in tau])
            s1 = tf.stack([tf.reduce_sum(t * xs.value, axis=0) for t in tau])
            s2 = tf.stack([tf.reduce_sum(t * xs.square, axis=0) for t in tau])
        else:
            if valid is not None:
                tau = tau * valid
            s0 = tf.reshape(tf.reduce_sum(tau, axis=0), [-1, 1])
            if self.posterior_gradient:
                s1 = tf.matmul(tau, xs.value, transpose_a=True)
                s2 = tf.matmul(tau, xs.square, transpose_a=True)
            else:
                s1, s2 = _weighted_sums(tau, xs.value, xs.square)
        if self.synchronized:
            s0, s1, s2 = _math.all_reduce_sum((s0, s1, s2))
        weights = tf.math.divide_no_nan(s0, count)
        empty = weights < self.min_weight
        # Safe denominators: a NaN in the branch tf.where discards would still poison gradients.
        s0 = tf.where(empty, tf.ones_like(s0), s0)
        mean = s1 / s0
        variance = tf.nn.relu(s2 / s0 - tf.square(mean))
        if not self.posterior_gradient:
            # Gradients flow through the final M-step only: without this, the fallback branch
            # (zero gradient) would still make the backward pass run through earlier M-steps.
            previous = tf.nest.map_structure(tf.stop_gradient, previous)
        mean = tf.where(empty, previous.mean, mean)
        variance = tf.where(empty, previous.variance, variance)
        return Mixture(weights, mean, variance)

    def _seed(self, xs, valid, count, variance, first):
        """Deterministic initial mixture: a quantile split along the principal direction."""
        k, dtype = self.num_components, xs.value.dtype
        offsets = tf.constant([[q] for q in self._offsets], dtype)
        spread = tf.sqrt(variance + self.epsilon)
        weights_shape = [k, self._channels] if self._per_channel else [k, 1]
        weights = tf.fill(weights_shape, tf.constant(1.0 / k, dtype))
        seed_variance = tf.tile(variance, [k, 1])
        if self._per_channel:
            return Mixture(weights, offsets * spread, seed_variance)
        channels = self._channels

        def local_correlation():
            standardized = xs.value / spread
            weighted = standardized if valid is None else standardized * valid
            return tf.matmul(standardized, weighted, transpose_a=True)

        def principal_axis():
            values, vectors = tf.linalg.eigh(tf.math.divide_no_nan(correlation, count))
            direction = vectors[:, -1]
            # eigh's sign is arbitrary: orient it by a fixed generic vector (1, 2, .., C).
            orientation = tf.reduce_sum(direction * tf.range(1, channels + 1, dtype=dtype))
            direction = tf.where(orientation < 0, -direction, direction)
            return direction * tf.sqrt(tf.nn.relu(values[-1]))

        # Only the first batch needs the correlation matrix and its eigenvectors: both sit in
        # conditionals. The all-reduce stays outside them (collectives cannot run inside a
        # conditional under tf.distribute), so synchronized replicas sum a C x C matrix, zero
        # after the first step, at every step.
        zeros = tf.zeros([channels, channels], dtype)
        correlation = tf.cond(first, local_correlation, lambda: zeros)
        if self.synchronized:
            correlation = _math.all_reduce_sum(correlation)
        axis = tf.cond(first, principal_axis, lambda: tf.zeros([channels], dtype))
        return Mixture(weights, offsets * axis * spread, seed_variance)

    def _warm_start(self, shift, variance, dtype):
        """The moving mixture in shifted coordinates, aligned to the batch when asked."""
        moving_shift, mixture = self._moving_mixture(dtype)
        if self.warm_start == "moving":
            return Mixture(mixture.weights, mixture.mean + (moving_shift - shift),
                           mixture.variance)
        weights = tf.math.divide_no_nan(
            mixture.weights, tf.reduce_sum(mixture.weights, axis=0, keepdims=True))
        # mixture.mean is centred on the moving mixture's overall mean already.
        pooled = tf.reduce_sum(weights * (mixture.variance + tf.square(mixture.mean)), axis=0,
                               keepdims=True)
        ratio = (variance + self.epsilon) / (pooled + self.epsilon)
        return Mixture(mixture.weights, mixture.mean * tf.sqrt(ratio),
                       mixture.variance * ratio)

    def _moving_mixture(self, dtype):
        """`(shift, mixture)`: the moving mixture centred on its overall mean."""
        weights = tf.cast(self.moving_weights, dtype)
        if not self._per_channel:
            weights = tf.reshape(weights, [-1, 1])
        mean = tf.cast(self.moving_mean, dtype)
        variance = tf.cast(self.moving_variance, dtype)
        normalized = tf.math.divide_no_nan(weights,
                                           tf.reduce_sum(weights, axis=0, keepdims=True))
        shift = tf.reduce_sum(normalized * mean, axis=0, keepdims=True)
        return shift, Mixture(weights, mean - shift, variance)

    def _fit(self, samples, valid):
        """Fits the batch mixture; returns `(shift, xs, mixture, tau, count, first)`."""
        shift, xs, variance, count = self._centred_moments(samples, valid)
        first = tf.equal(self.num_updates, 0)
        seed = self._seed(xs, valid, count, variance, first)
        warm = self._warm_start(shift, variance, samples.dtype)
        mixture = Mixture(*[tf.stop_gradient(tf.where(first, s, w)) for s, w in zip(seed, warm)])
        for _ in range(self.em_iterations):  # a few unrolled EM steps, not a loop over data
            tau = self._maybe_stop(self._posteriors(xs, mixture))
            mixture = self._maximize(xs, tau, valid, count, mixture)
        tau = self._maybe_stop(self._posteriors(xs, mixture))
        return shift, xs, mixture, tau, count, first

    def _maybe_stop(self, tau):
        return tau if self.posterior_gradient else tf.nest.map_structure(tf.stop_gradient, tau)

    # ------------------------------------------------------------------------- normalize
    def _normalize(self, xs, mixture, tau, gamma, beta):
        """`sum_k w_ik (x_i - mu_k) inv_k (+ beta)` as `x * scale_i + offset_i`.

        One mixture over channels: `scale = w @ inv` and `offset = [w, 1] @ [-mu inv; beta]`
        (two thin matrix products). Per channel: the same sums over the unrolled components.
        """
        weights = mixture.weights
        inv = tf.math.rsqrt(mixture.variance + self.epsilon)
        if gamma is not None:
            inv = inv * gamma
        if self.fisher_scaling:
            inv = inv * tf.math.rsqrt(tf.maximum(weights, self.min_weight))
        # `offset = -mu * inv`, added rather than subtracted: the backward pass then needs no
        # full-size negation.
        offset = -mixture.mean * inv
        if self._per_channel:
            scale = tf.add_n([t * inv[k] for k, t in enumerate(tau)])
            outputs = xs * scale + tf.add_n([t * offset[k] for k, t in enumerate(tau)])
            return outputs if beta is None else outputs + beta
        scale = tf.matmul(tau, inv)
        if beta is not None:
            ones = tf.ones([tf.shape(tau)[0], 1], tau.dtype)
            tau = tf.concat([tau, ones], axis=1)
            offset = tf.concat([offset, tf.expand_dims(beta, 0)], axis=0)
        return xs * scale + tf.matmul(tau, offset)

    # ------------------------------------------------------------------ moving statistics
    def _update_statistics(self, shift, mixture, count, first):
        """EMA of the batch mixture (a copy at the first update when K > 1)."""
        has_values = count > 0
        momentum = self.momentum
        if first is not None:  # the statistics are float32 whatever the input dtype
            momentum = tf.where(first, tf.constant(0.0, tf.float32),
                                tf.cast(momentum, tf.float32))
        _math.assign_moving_average(self.moving_weights, mixture.weights, momentum, has_values)
        _math.assign_moving_average(self.moving_mean, mixture.mean + shift, momentum,
                                    has_values)
        _math.assign_moving_average(self.moving_variance, mixture.variance, momentum,
                                    has_values)
        self.num_updates.assign_add(tf.cast(has_values, "int64"))

    # ----------------------------------------------------------------------------- config
    def get_config(self):
        config = {
            "num_components": self.num_components,
            "mixture_axes": self.mixture_axes,
            "em_iterations": self.em_iterations,
            "fisher_scaling": self.fisher_scaling,
            "posterior_gradient": self.posterior_gradient,
            "warm_start": self.warm_start,
            "min_weight": self.min_weight,
        }
        return {**super().get_config(), **config}
