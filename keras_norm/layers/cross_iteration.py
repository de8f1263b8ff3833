"""Cross-Iteration Batch Normalization (Yao et al. 2020, arXiv:2002.05712).

CBN normalizes the output of a convolution or dense layer with statistics pooled over the last
`k` training iterations. The statistics of an earlier iteration were measured with an earlier
kernel, so each is moved to the current kernel by a first-order Taylor step in the kernel before
pooling. This needs the kernel, so CBN wraps the layer that produces its input: it computes the
layer's linear map itself and can differentiate the statistics with respect to the kernel.
"""

import keras
import tensorflow as tf
from keras.saving import deserialize_keras_object, serialize_keras_object

from keras_norm import _compat, _math
from keras_norm.layers import base, docstrings

#: The layers CBN can wrap, by exact type (a subclass may compute something else in `call`).
SUPPORTED_LAYERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D,
                    keras.layers.Conv3D)


def _read_float(value, dtype):
    """A variable's (or kernel property's) value in `dtype`, bypassing Keras's autocast.

    Under `mixed_float16` Keras reads a wrapped layer's float32 kernel as float16 inside a layer
    call. The kernel differences `W_t - W_{t-tau}` the compensation needs are ~1e-4 of the
    weights, below float16 resolution, so the float32 value is read outside any autocast scope.
    """
    with _compat.no_autocast():  # no public way in Keras 3 (see `_compat`)
        return tf.cast(tf.convert_to_tensor(value), dtype)


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class CrossIterationBatchNormalization(base.BatchDependentMixin, base.AffineNormalization,
                                       keras.layers.Wrapper):
    """Cross-Iteration Batch Normalization: a Dense/Conv layer followed by windowed BN.

    Wraps a `keras.layers.Dense`, `Conv1D`, `Conv2D` or `Conv3D` layer and returns its
    normalized output: `activation(gamma * (y - mean) / sqrt(var + epsilon) + beta)` with
    `y = layer's linear map + bias`, the layer's own activation applied last. In training the
    mean and variance pool the current batch with the statistics of the previous
    `window_size - 1` iterations, each compensated for the kernel change since it was measured
    (first-order Taylor expansion in the kernel). This keeps BN's benefits at batch sizes where
    a single batch's statistics are too noisy (Yao et al. 2020).

    ```
    for tau = 1..k-1 (stored from iteration t - tau, per output channel c):
        mu_tau(W_t)  = mu_tau + sum(dmu_tau/dW * (W_t - W_tau))       (over W[..., c])
        var_tau(W_t) = nu_tau(W_t) - mu_tau(W_t)^2,  nu = E[y^2] compensated the same way
        drop tau if var_tau(W_t) < 0
    mean = mean over kept tau in {0..k-1} of mu_tau            (tau = 0: current batch)
    var  = mean over kept tau of max(nu_tau, mu_tau^2) - mean^2
    y_out = activation(gamma * (y - mean) / sqrt(var + epsilon) + beta)
    ```

    Example:

    >>> import numpy as np, keras
    >>> from keras_norm.layers.cross_iteration import CrossIterationBatchNormalization
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     CrossIterationBatchNormalization(
    ...         keras.layers.Conv2D(4, 3, use_bias=False, activation="relu"),
    ...         window_size=4, burn_in_steps=100),
    ... ])
    >>> model(np.zeros((2, 8, 8, 3), "float32"), training=True).shape
    TensorShape([2, 6, 6, 4])

    Design choices (where the paper or the official code leaves room):

    - Derivatives. `mu_c` depends only on `W[..., c]`, so one filter gradient of
      `sum_c mu_c` holds every `dmu_c/dW[..., c]`; likewise for the variance. Both come from
      the layer's own backward pass (the convolution's filter gradient, for Dense `x^T g`),
      taken with a gradient tape on the forward product already computed and kept out of the
      training gradient. `dmu_c/dW` is the same for every channel `c` (the mean input patch),
      so it is stored once, with the kernel's shape minus its output axis; without a mask it
      is the filter gradient of a one-channel probe on the batch's sum (one example's work).
    - Speed. Unmasked, the normalization takes `_math.standardize_with`'s closed-form
      gradient through the pooled statistics. The variance derivative costs one filter
      gradient per step on top of Conv + BN (147 ms against a 390 ms Conv + BN
      forward+backward step on (128, 32, 32, 64), 2-core CPU), so the layer takes about
      1.5x the time of the Conv + BN pair it replaces without XLA and 1.2-1.4x with it.
    - Numerics. The stored second moment is kept in centred form: the variance
      `var = nu - mu^2` (two-pass) and `dvar/dW = dnu/dW - 2 mu dmu/dW = 2 E[(y - mu) patch]`.
      The compensated variance `var + dvar/dW . dW - (dmu/dW . dW)^2` is algebraically
      identical to the paper's `nu(W_t) - mu(W_t)^2`, without the float32 cancellation of
      `E[y^2] - E[y]^2` when `|mean| >> std`; the pooled variance uses the equivalent
      `mean_tau(var_tau + (mu_tau - mean)^2)`. After dropping negative compensated variances,
      `max(nu, mu^2)` is `nu`, so the drop (as in the official code) subsumes the paper's max.
    - Gradients flow only through the current iteration's statistics (the official code); the
      pooled mean, for example, passes `1 / (number of kept iterations)` of its gradient to
      the current batch. The kernel receives no gradient through the compensation.
    - Bias. A wrapped layer's bias only shifts `y`, so statistics are stored for the bias-free
      product and the current bias is added to the pooled mean: the bias cancels exactly in
      training and, as with `Conv2D + BatchNormalization`, the moving mean includes it.
      Prefer `use_bias=False`; `beta` plays its role.
    - The layer's activation is applied after the normalization (conv - norm - activation).
    - Burn-in. For the first `burn_in_steps` training steps the layer is plain BN. The window
      is filled during the burn-in (the official code starts filling it after), so it is
      complete at the first windowed step; until the window is full, the pooled statistics use
      the iterations stored so far. The paper uses a burn-in period of plain BN before the
      window; the official layer counts it in training forward passes with default 0, and its
      published COCO configurations pass `buffer_num=3, burnin=8` (`k = 4`). Early in
      training the kernel moves fast and the first-order compensation is least accurate, so
      a burn-in of a few hundred steps (or a fraction of the first epoch) is a sensible start.
    - Conventions follow Keras BN: biased batch variance and `epsilon` inside the square root
      (the official code adds `eps` to the standard deviation and tracks the unbiased
      variance in its running statistics).
    - State. Stored statistics, derivatives and kernels live in non-trainable float32
      variables of shape `(window_size - 1, ...)` (newest first), plus an int64 training-step
      counter and a count of stored iterations; they are saved in checkpoints and `.keras`
      files, so a resumed run continues with the same window. `window_size=1` creates none of
      them and is exactly `layer` followed by `BatchNormalization` (same weights).
    - Inference uses moving averages of the current-batch statistics (as BN), or the batch's
      own statistics with `inference_statistics="batch"`; it never touches the window.
    - `synchronized=True`: the current statistics and their kernel derivatives are those of
      the global batch (exact two-pass merge, summed derivatives), so every replica keeps
      identical windows and the result equals one device on the global batch. Without it,
      each replica uses its own batch and the replicas' window updates are averaged.
    - Memory: each stored iteration holds two kernel-sized tensors (`dvar/dW` and `W`).

    Args:
        layer: The `keras.layers.Dense`, `Conv1D`, `Conv2D` or `Conv3D` layer (exact type,
            `groups=1`, not quantized) whose output is normalized. Ideally `use_bias=False`.
        window_size: Positive int `k`, the number of iterations pooled (the current one
            included). `1` is plain batch normalization. The paper uses 8 on ImageNet and 4 on
            COCO. Defaults to `4`.
        burn_in_steps: Non-negative int, number of training steps of plain BN before the
            window is used. Defaults to `0` (the official layer's default).
        momentum: Momentum of the moving averages, in `[0, 1]`. Read at call time.
            Defaults to `0.99`.
        epsilon: Positive float added to the variance. Defaults to `1e-3`.
        {affine_args}
        {moving_initializer_args}
        synchronized: If `True`, the current batch statistics and their kernel derivatives
            are computed over the global batch of all replicas under a `tf.distribute`
            strategy. Defaults to `False`.
        {inference_statistics_arg}
        {kwargs_arg}

    Call arguments:
        inputs: The wrapped layer's input.
        training: Python bool. `True` normalizes with the pooled statistics and updates the
            window and the moving statistics (only if the layer is trainable).
        mask: Optional boolean tensor in Keras's layout: the output's shape without its last
            axis (e.g. `(batch, time)` for a Dense layer on sequences), broadcast over the last
            axis as `keras.layers.BatchNormalization` does; masked positions do not enter the
            statistics or their derivatives. With a channels-first convolution the mask must
            have size 1 on the channel axis (`ValueError` otherwise).

    Reference:
        - [Yao et al., 2020, Cross-Iteration Batch Normalization](
          https://arxiv.org/abs/2002.05712)
        - [Official code](https://github.com/Howal/Cross-iterationBatchNorm)
    """

    #: What `recompute_statistics` sets; the window of past iterations and the step counters
    #: are training state that it restores afterwards.
    population_statistics = ("moving_mean", "moving_variance")
    variance_statistics = ("moving_variance",)
    #: Keras's mask layout flags channels when they are not last (a channels-first
    #: convolution's mask, passed explicitly: convolutions do not propagate masks).
    mask_channels_reason = ("the cross-iteration kernel derivatives are stored with one count "
                            "for all channels")

    def __init__(self, layer, window_size=4, burn_in_steps=0, momentum=0.99, epsilon=1e-3,
                 center=True, scale=True, beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, synchronized=False, inference_statistics="moving",
                 **kwargs):
        owner = self.__class__.__name__
        if type(layer) not in SUPPORTED_LAYERS:
            raise base.ArgumentTypeError(
                f"{owner}: argument `layer` must be a keras.layers.Dense, Conv1D, Conv2D or "
                "Conv3D layer (exact type: CBN recomputes the layer's linear map to "
                f"differentiate it). Received: layer={layer!r}"
            )
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(
                f"{owner}: grouped convolutions are not supported (the kernel derivative of "
                "the mean is stored once for all channels). "
                f"Received: layer.groups={layer.groups}"
            )
        super().__init__(layer=layer, **base.base_arguments(locals()), **kwargs)
        self.window_size = base.check_int(owner, "window_size", window_size, minimum=1)
        self.burn_in_steps = base.check_int(owner, "burn_in_steps", burn_in_steps, minimum=0)
        # Only Dense passes Keras masks on; convolutions do not support them.
        self.supports_masking = isinstance(layer, keras.layers.Dense)
        self.moving_mean = None
        self.moving_variance = None

    # ------------------------------------------------------------------------------- build
    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if not self.layer.built:
            self.layer.build(input_shape)
        self._check_layer_state()
        output_shape = tuple(self.layer.compute_output_shape(input_shape))
        # The wrapped layer's channel axis: its data format says where, not an argument.
        channels_first = getattr(self.layer, "data_format", None) == "channels_first"
        self._set_channel_axis(output_shape, 1 if channels_first else len(output_shape) - 1)
        shape = (self._channels,)
        self._build_affine(shape)
        self._add_moving_statistics(shape)
        self._kernel_shape = tuple(self.layer.kernel.shape)
        if self.window_size > 1:
            stored = self.window_size - 1
            self.window_mean = base.add_statistic(self, "window_mean", (stored,) + shape,
                                                  "zeros")
            self.window_variance = base.add_statistic(self, "window_variance",
                                                      (stored,) + shape, "zeros")
            self.window_mean_gradient = base.add_statistic(
                self, "window_mean_gradient", (stored,) + self._kernel_shape[:-1], "zeros")
            self.window_variance_gradient = base.add_statistic(
                self, "window_variance_gradient", (stored,) + self._kernel_shape, "zeros")
            self.window_kernel = base.add_statistic(self, "window_kernel",
                                                    (stored,) + self._kernel_shape, "zeros")
            self.step = self._add_counter("step")
            self.window_count = self._add_counter("window_count")
        self.input_spec = self.layer.input_spec
        self.built = True

    def _add_counter(self, name):
        # Identical on every replica (every replica counts the same steps).
        return self.add_weight(shape=(), name=name, initializer="zeros", dtype="int64",
                               trainable=False, autocast=False,
                               aggregation="only_first_replica")

    def _check_layer_state(self):
        if getattr(self.layer, "quantization_mode", None) is not None:
            raise ValueError(
                f"{self._owner}: the wrapped layer is quantized, so its kernel cannot be "
                "differentiated. Received: "
                f"layer.quantization_mode={self.layer.quantization_mode!r}"
            )

    # -------------------------------------------------------------------------------- call
    def _linear(self, x, kernel):
        """The wrapped layer's product without bias and activation (as its `call` does)."""
        layer = self.layer
        if isinstance(layer, keras.layers.Dense):
            return keras.ops.matmul(x, kernel)
        padding = layer.padding
        if padding == "causal":
            x = keras.ops.pad(x, _compat.causal_padding(layer))
            padding = "valid"
        return keras.ops.conv(x, kernel, strides=list(layer.strides), padding=padding,
                              dilation_rate=layer.dilation_rate, data_format=layer.data_format)

    def call(self, inputs, training=None, mask=None):
        self._check_layer_state()
        compute_dtype = self.layer.compute_dtype
        x = tf.cast(inputs, compute_dtype)
        statistics_dtype = _math.statistics_dtype(compute_dtype)
        kernel = _read_float(self.layer.kernel, statistics_dtype)
        kernel_compute = tf.cast(kernel, compute_dtype)
        bias = 0.0
        if self.layer.bias is not None:
            bias = tf.reshape(_read_float(self.layer.bias, statistics_dtype), self._param_shape)
        gamma, beta = self._affine_parameters(statistics_dtype, self._param_shape)

        windowed = self._is_training(training) and self.window_size > 1
        if windowed:
            # Records the product so that its kernel gradients (the derivatives of the batch
            # statistics) come from the same forward pass; `probe` is a one-channel kernel
            # whose gradient is the mean input patch, dmu/dW (the same for every channel).
            # Unmasked, every output position weighs the same, so the probe runs on the
            # batch's sum (float32): the map is linear, and one example instead of the
            # batch makes its filter gradient ~1/B of the cost (73 ms of a 390 ms Conv+BN
            # step on (128, 32, 32, 64), 2-core CPU, before).
            probe_input = x
            probe_dtype = compute_dtype
            if mask is None:
                probe_dtype = statistics_dtype
                probe_input = tf.reduce_sum(tf.cast(x, probe_dtype), axis=0, keepdims=True)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(kernel_compute)
                probe = tf.zeros(self._kernel_shape[:-1] + (1,), probe_dtype)
                tape.watch(probe)
                product = self._linear(x, kernel_compute)
                product_probe = self._linear(probe_input, probe)
            recorded = (tape, (product, product_probe), (kernel_compute, probe))
        else:
            product = self._linear(x, kernel_compute)
            recorded = None
        z = tf.cast(product, statistics_dtype)
        mask = self._expand_mask(mask, z)

        if not self._uses_batch_statistics(training):
            mean = tf.reshape(tf.cast(self.moving_mean, statistics_dtype), self._param_shape)
            variance = tf.reshape(tf.cast(self.moving_variance, statistics_dtype),
                                  self._param_shape)
            outputs = _math.normalize(z + bias, mean, variance, self.epsilon, gamma, beta)
        elif mask is None:
            outputs, moments = self._normalize_unmasked(z, bias, gamma, beta, kernel, windowed)
            self._update_state(moments, recorded, z, mask, kernel, bias, training, after=outputs)
        else:
            moments = _math.batch_moments(z, self._reduction_axes, mask, self.synchronized)
            pooled_mean, pooled_variance = moments.mean, moments.variance
            if windowed:
                pooled_mean, pooled_variance = self._pool(moments.mean, moments.variance,
                                                          kernel)
            outputs = _math.normalize(z + bias, pooled_mean + bias, pooled_variance,
                                      self.epsilon, gamma, beta)
            self._update_state(moments, recorded, z, mask, kernel, bias, training, after=outputs)
        if self.layer.activation is not None:
            outputs = self.layer.activation(outputs)
        return tf.cast(outputs, self.compute_dtype)

    def _normalize_unmasked(self, z, bias, gamma, beta, kernel, windowed):
        """Batch (or pooled) statistics without a mask: `_math.standardize_with`'s
        closed-form gradient instead of differentiating the composed moments."""
        def statistics(mean, variance):
            if not windowed:
                return mean, variance
            return self._pool(mean, variance, kernel)

        # The bias cancels in the normalization (it only shifts the moving mean): its gradient
        # is exactly zero, kept as a zero (through beta) rather than None so that optimizers
        # see every weight.
        if self.layer.bias is not None:
            zero = 0.0 * bias
            beta = zero if beta is None else beta + zero
        return _math.standardize_with(z, self._reduction_axes, self.epsilon, statistics, gamma,
                                      beta, self.synchronized)

    def _update_state(self, moments, recorded, z, mask, kernel, bias, training, after):
        """Pushes the iteration into the window (when `recorded`) and moves the population
        statistics; both wait for `after` (the outputs), whose statistics read the window."""
        if not self._is_training(training):
            return
        with tf.control_dependencies([after]):
            has_values = tf.reduce_sum(moments.count) > 0
            if recorded is not None:
                derivatives = self._kernel_derivatives(recorded, z, mask, moments)
                self._update_window(moments.mean, moments.variance, derivatives, kernel,
                                    has_values)
            _math.assign_moving_average(self.moving_mean, moments.mean + bias, self.momentum,
                                        has_values)
            _math.assign_moving_average(self.moving_variance, moments.variance, self.momentum,
                                        has_values)

    # ----------------------------------------------------------------- cross-iteration parts
    def _kernel_derivatives(self, recorded, z, mask, moments):
        """`(dmu/dW, dvar/dW)` of the current (global, if synchronized) batch, no gradient.

        `dvar/dW = 2 E[(y - mu) * patch]` is the filter gradient for the output gradient
        `2 (y - mu) / n`, `dmu/dW = E[patch]` the probe's for `1 / n`. The output gradients are
        scaled to `(y - mu) / (sd * sqrt(n))` and `1 / sqrt(n)` and the results scaled back in
        float32, so that float16 backward passes neither underflow nor overflow.
        """
        tape, (product, product_probe), sources = recorded
        count = tf.reshape(tf.reduce_max(moments.count), [])
        root = tf.math.rsqrt(tf.maximum(count, 1.0))
        weights = root if mask is None else root * mask
        sd = tf.stop_gradient(tf.sqrt(moments.variance + self.epsilon))
        centred = (z - tf.stop_gradient(moments.mean)) / sd * weights
        probe_weights = tf.broadcast_to(weights, tf.shape(product_probe))
        variance_gradient, mean_gradient = tape.gradient(
            [product, product_probe], list(sources),
            output_gradients=[tf.cast(tf.stop_gradient(centred), product.dtype),
                              tf.cast(probe_weights, product_probe.dtype)])
        channels = self._kernel_shape[-1]
        variance_gradient = (tf.cast(variance_gradient, z.dtype)
                             * (2.0 * root * tf.reshape(sd, [channels])))
        mean_gradient = tf.reshape(tf.cast(mean_gradient, z.dtype) * root,
                                   self._kernel_shape[:-1])
        if self.synchronized:
            mean_gradient, variance_gradient = _math.all_reduce_sum(
                (mean_gradient, variance_gradient))
        return tf.stop_gradient(mean_gradient), tf.stop_gradient(variance_gradient)

    def _pool(self, mean, variance, kernel):
        """Pools the current statistics with the compensated stored ones (official rule).

        Returns the pooled mean and variance, shaped like `mean`; gradients reach only the
        current `mean` and `variance`.
        """
        stored = self.window_size - 1
        channels = self._kernel_shape[-1]
        delta = tf.stop_gradient(kernel)[None] - tf.convert_to_tensor(self.window_kernel)
        delta = tf.reshape(delta, [stored, -1, channels])
        mean_gradient = tf.reshape(tf.convert_to_tensor(self.window_mean_gradient),
                                   [stored, -1, 1])
        variance_gradient = tf.reshape(tf.convert_to_tensor(self.window_variance_gradient),
                                       [stored, -1, channels])
        mean_shift = tf.reduce_sum(mean_gradient * delta, axis=1)  # (stored, C)
        variance_shift = tf.reduce_sum(variance_gradient * delta, axis=1)
        past_mean = tf.convert_to_tensor(self.window_mean) + mean_shift
        # var(W_t) = nu(W_t) - mu(W_t)^2 in centred form: var + dvar.dW - (dmu.dW)^2.
        past_variance = (tf.convert_to_tensor(self.window_variance) + variance_shift
                         - tf.square(mean_shift))
        stored_entries = tf.range(stored, dtype=tf.int64) < tf.convert_to_tensor(
            self.window_count)
        window_on = tf.convert_to_tensor(self.step) >= self.burn_in_steps
        keep = (stored_entries[:, None] & window_on) & (past_variance >= 0.0)
        keep_float = tf.cast(keep, mean.dtype)
        past_mean = tf.where(keep, past_mean, 0.0)
        past_variance = tf.where(keep, past_variance, 0.0)

        current_mean = tf.reshape(mean, [channels])
        current_variance = tf.reshape(variance, [channels])
        total = 1.0 + tf.reduce_sum(keep_float, axis=0)
        pooled_mean = (current_mean + tf.reduce_sum(past_mean, axis=0)) / total
        spread = tf.where(keep, tf.square(past_mean - pooled_mean), 0.0)
        pooled_variance = (current_variance + tf.square(current_mean - pooled_mean)
                           + tf.reduce_sum(past_variance + spread, axis=0)) / total
        return (tf.reshape(pooled_mean, self._param_shape),
                tf.reshape(pooled_variance, self._param_shape))

    def _update_window(self, mean, variance, derivatives, kernel, has_values):
        """Pushes the current iteration into the window (newest first) and counts the step.

        A batch without any value (fully masked) is not stored; the step still counts.
        """
        mean_gradient, variance_gradient = derivatives
        stored = self.window_size - 1
        channels = self._kernel_shape[-1]
        newest = [
            (self.window_mean, tf.reshape(tf.stop_gradient(mean), [channels])),
            (self.window_variance, tf.reshape(tf.stop_gradient(variance), [channels])),
            (self.window_mean_gradient, mean_gradient),
            (self.window_variance_gradient, variance_gradient),
            (self.window_kernel, tf.stop_gradient(kernel)),
        ]
        for variable, value in newest:
            old = tf.convert_to_tensor(variable)
            value = tf.cast(value, variable.dtype)[None]
            variable.assign(tf.where(has_values, tf.concat([value, old[: stored - 1]], 0), old))
        count = tf.convert_to_tensor(self.window_count)
        self.window_count.assign(tf.where(has_values, tf.minimum(count + 1, stored), count))
        self.step.assign_add(tf.constant(1, tf.int64))

    # ----------------------------------------------------------------------------- config
    def compute_output_shape(self, input_shape):
        return tuple(self.layer.compute_output_shape(input_shape))

    def get_config(self):
        layer_config = serialize_keras_object(self.layer)
        # The inner layer is built by this wrapper's own build (from its build config), so its
        # build config is left out: get_config() stays the same before and after build().
        layer_config.pop("build_config", None)
        layer_config.pop("compile_config", None)
        config = {
            "layer": layer_config,
            "window_size": self.window_size,
            "burn_in_steps": self.burn_in_steps,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        return cls(layer, **config)
