"""Moving Average Batch Normalization (Yan et al., ICLR 2020).

Small batches make four batch statistics noisy: the mean and variance in the forward pass and
`g = E[dL/dy]`, `psi = E[dL/dy * x_hat]` in the backward pass. MABN drops centering (the paired
convolution centres its kernel instead, see `CenteredConv2D`), and replaces the remaining forward
statistic `chi = E[x^2]` and backward statistic `psi` by simple moving averages over the last
`buffer_size` iterations. Its input gradient is therefore not the derivative of its forward
function: the layer defines it with `tf.custom_gradient`, and the backward pass writes the
current `psi` into a buffer that the next iterations' backward passes average over.
"""

import keras
import tensorflow as tf

from keras_norm import _math
from keras_norm.layers import base, docstrings


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class MovingAverageBatchNormalization(base.BatchDependentMixin, base.ChannelwiseNormalization):
    """Batch normalization with moving-average forward and backward statistics (MABN).

    Normalizes by the root of a simple moving average (SMA) of the per-channel second moment
    `chi_B = E[x^2]` over the last `buffer_size` training iterations, with no centering, and
    replaces the backward statistic `psi_B = E[g_z * z]` of the input gradient by its SMA over
    the same window. This keeps the statistics of both passes stable at small batch sizes
    (the paper trains at 2 images per GPU), where batch normalization degrades. Pair it with
    a convolution whose kernel is centred over its fan-in (`CenteredConv2D`), which takes the
    place of the dropped mean subtraction.

    ```
    training (iteration t, SMAs over iterations t-b+1..t, b = buffer_size):
        chi_B   = E[x^2]                        per channel, over every other axis
        chi_bar = SMA(chi_B)                    only chi_B of iteration t carries a gradient
        z       = x / sqrt(chi_bar + epsilon)
        r       = stop_gradient(clip(sqrt(chi_bar + epsilon) / sqrt(chi_ema + epsilon),
                                     1 / r_max, r_max))       (r = 1 for t < warmup_steps)
        y       = gamma * r * z + beta
        chi_ema = momentum * chi_ema + (1 - momentum) * chi_bar
    backward (custom gradient):
        g_z     = dL/dy * gamma * r
        psi_B   = E[g_z * z]
        dL/dx   = (g_z - z * SMA(psi_B)) / sqrt(chi_bar + epsilon)
    inference:
        y       = gamma * x / sqrt(chi_ema + epsilon) + beta
    ```

    Design choices (where the paper and its official code leave room):

    - Buffers: the layer keeps the last `buffer_size` values of `chi_B` and of `psi_B` in the
      non-trainable weights `second_moment_buffer` and `backward_buffer` (shape
      `(buffer_size, channels)`, newest first, saved in checkpoints), shifted with tensor ops.
      The SMA of iteration t averages the current value and the `buffer_size - 1` newest
      stored ones; while the buffer fills it divides by the number of values it holds
      (`step_counter`, `backward_step_counter` count them), so the first iteration is plain
      "BN without centering" and no zero padding leaks in. The official code instead uses
      the current value alone until `warmup_iters` and then the full buffer.
    - Warm-up: one argument, `warmup_steps`, the number of training iterations during which
      `r = 1`; afterwards `r` is clipped to `[1 / r_max, r_max]`. The SMA is used from the
      first iteration. The official code fixes `r = 1` for `max(1000, warmup_iters)`
      iterations; the default here is 1000.
    - Defaults follow the official code: `buffer_size=16` (it simulates batch 32 with
      batch-2 statistics: buffer = real_B / B), `momentum=0.98`, `epsilon=1e-5`, `r_max=5`.
    - The backward buffer is written from inside the gradient function, with the writes made
      control dependencies of the returned input gradient: they run eagerly, in
      `tf.function`, under XLA, under `tf.distribute` and when only the forward pass is a
      `tf.function` and the gradient is taken outside it. Consequently the backward state
      advances once per gradient computation through the layer (to its input, `gamma` or
      `beta`, so also when the layer sits directly on the model's input): a forward pass
      whose output gets no gradient leaves it unchanged, and computing the gradient twice
      from a persistent tape advances it twice.
    - `r` and the stored buffer entries carry no gradient; `gamma` and `beta` get the usual
      gradients `sum(dL/dy * r * z)` and `sum(dL/dy)`.
    - `synchronized=True`: `chi_B` and `psi_B` are the sums over all replicas divided by the
      global count (one all-reduce of a per-channel vector each), so under `MirroredStrategy`
      outputs, gradients and state equal one device on the global batch. Without it, each
      replica uses its own batch; the buffers then hold the replica average of the values.
    - Any batch size works, 1 and a last partial batch included (the official code needs
      batch 32). A training batch with no values leaves every statistic unchanged.
    - `E[x^2]` is summed directly in float32 (no cancellation as in `E[x^2] - E[x]^2`).
      Masks are propagated to the next layer but not used in the statistics.
    - Calling the layer twice per training step (weight sharing) advances the buffers twice.
    - Weights: `gamma`, `beta`, then the non-trainable float32 `moving_second_moment`
      (`chi_ema`, initialized to ones), `second_moment_buffer`, `backward_buffer`,
      `step_counter`, `backward_step_counter`. `momentum` is read at every call, so a tool
      may replace it (e.g. by a variable turning the EMA into a cumulative average, as
      population-statistics recomputation does); training-mode passes made for that purpose
      also push their `chi_B` into the buffer and advance `step_counter`.

    Example:

    >>> import numpy as np, keras
    >>> from keras_norm.layers.moving_average import MovingAverageBatchNormalization
    >>> layer = MovingAverageBatchNormalization(buffer_size=4, warmup_steps=10)
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    >>> layer(x, training=True).shape
    TensorShape([2, 8, 8, 3])

    Args:
        axis: Integer, the features (channel) axis. Defaults to `-1`.
        buffer_size: Positive int, the number of iterations (the current one included) the
            simple moving averages of `chi_B` and `psi_B` run over. `1` gives batch
            statistics without centering. Defaults to `16`.
        warmup_steps: Non-negative int, the number of training iterations during which the
            renormalization factor `r` is fixed to 1. Defaults to `1000`.
        momentum: Momentum of the exponential moving average `moving_second_moment` of
            `chi_bar` used at inference, in `[0, 1]`. Defaults to `0.98`.
        epsilon: Positive float added to the second moment. Defaults to `1e-5`.
        r_max: Float `>= 1`, the bound of the renormalization factor `r` after warm-up.
            Defaults to `5.0`.
        {affine_args}
        synchronized: If `True`, compute `chi_B` and `psi_B` over the global batch of all
            replicas under a `tf.distribute` strategy. Defaults to `False`.
        inference_statistics: `"moving"` (use `moving_second_moment`) or `"batch"` (use the
            current batch's own `chi_B`, leaving every statistic untouched) at inference.
            Defaults to `"moving"`.
        {kwargs_arg}

    Call arguments:
        inputs: Input tensor of any rank >= 2.
        training: Python bool. `True` normalizes with the moving-average statistics, updates
            the buffers and `moving_second_moment`, and makes the input gradient the MABN one
            (only if the layer is trainable: `trainable=False` freezes it in inference mode).

    Reference:
        - [Yan et al., 2020, Towards Stabilizing Batch Statistics in Backward Propagation of
          Batch Normalization](https://arxiv.org/abs/2001.06838)
    """

    #: The population statistic `recompute_statistics` sets; the buffers and step counters
    #: are training state that it restores afterwards.
    population_statistics = ("moving_second_moment",)
    #: As batch normalization, any axis may hold the channels.
    per_example = False

    def __init__(self, axis=-1, buffer_size=16, warmup_steps=1000, momentum=0.98, epsilon=1e-5,
                 r_max=5.0, center=True, scale=True, beta_initializer="zeros",
                 gamma_initializer="ones", beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, synchronized=False,
                 inference_statistics="moving", **kwargs):
        super().__init__(**base.base_arguments(locals()), **kwargs)
        owner = self.__class__.__name__
        self.buffer_size = base.check_int(owner, "buffer_size", buffer_size, minimum=1)
        self.warmup_steps = base.check_int(owner, "warmup_steps", warmup_steps, minimum=0)
        self.r_max = base.check_float(owner, "r_max", r_max, low=1.0)
        self.moving_second_moment = None
        self.second_moment_buffer = None
        self.backward_buffer = None
        self.step_counter = None
        self.backward_step_counter = None

    # ------------------------------------------------------------------------------- build
    def _build_extra(self):
        channels = self._channels
        self.moving_second_moment = base.add_statistic(
            self, "moving_second_moment", (channels,), "ones")
        buffer_shape = (self.buffer_size, channels)
        self.second_moment_buffer = base.add_statistic(
            self, "second_moment_buffer", buffer_shape, "zeros")
        self.backward_buffer = base.add_statistic(self, "backward_buffer", buffer_shape, "zeros")
        # Float32 counters (replica-mean aggregation needs floats). Exact up to 2**24 steps;
        # beyond that they stop growing, which is harmless: they are only compared with
        # `warmup_steps` and `buffer_size`.
        self.step_counter = base.add_statistic(self, "step_counter", (), "zeros")
        self.backward_step_counter = base.add_statistic(
            self, "backward_step_counter", (), "zeros")

    # -------------------------------------------------------------------------------- call
    def call(self, inputs, training=None):
        x = base.to_statistics_dtype(inputs)
        gamma, beta = self._affine_parameters(x.dtype, self._param_shape)
        if self._is_training(training):
            outputs = self._train(x, gamma, beta)
        else:
            if self.inference_statistics == "batch":
                second_moment, _ = self._second_moment(x)
            else:
                second_moment = tf.reshape(tf.cast(self.moving_second_moment, x.dtype),
                                           self._param_shape)
            outputs = _math.normalize(x, 0.0, second_moment, self.epsilon, gamma, beta)
        return tf.cast(outputs, self.compute_dtype)

    def _second_moment(self, x):
        """`(E[x^2], count)` per channel, over the global batch when synchronized."""
        axes = self._reduction_axes
        square_sum = tf.reduce_sum(tf.square(x), axes, keepdims=True)
        count = _math.count_over(x, axes)
        if self.synchronized:
            square_sum, count = _math.all_reduce_sum((square_sum, count))
        # divide_no_nan: an empty batch (or replica) gives 0, not NaN.
        return tf.math.divide_no_nan(square_sum, count), count

    def _simple_moving_average(self, current, buffer, stored):
        """Mean of `current` and the newest `min(stored, buffer_size - 1)` buffer rows.

        `current` has the parameter shape, `buffer` is `(buffer_size, C)` newest first,
        `stored` a scalar: the number of values pushed so far.
        """
        past = buffer[: self.buffer_size - 1]
        used = tf.minimum(stored, float(self.buffer_size - 1))
        valid = tf.cast(tf.range(self.buffer_size - 1, dtype=stored.dtype) < used, past.dtype)
        past_sum = tf.reduce_sum(past * valid[:, None], axis=0)
        return (current + tf.reshape(past_sum, self._param_shape)) / (used + 1.0)

    def _pushed(self, buffer, value, stored, has_values):
        """`(buffer, count)` after pushing `value` as the newest row (unchanged if empty)."""
        row = tf.reshape(value, (1, -1))
        shifted = tf.concat([row, buffer[: self.buffer_size - 1]], axis=0)
        new_buffer = tf.where(has_values, shifted, buffer)
        return new_buffer, stored + tf.cast(has_values, stored.dtype)

    def _train(self, x, gamma, beta):
        dtype = x.dtype
        # The custom gradient below carries the whole input gradient, that through chi_B too.
        second_moment, count = self._second_moment(x)
        second_moment = tf.stop_gradient(second_moment)
        has_values = count > 0
        buffer = tf.cast(self.second_moment_buffer, dtype)
        stored = tf.cast(self.step_counter, dtype)
        average = self._simple_moving_average(second_moment, buffer, stored)
        inv = tf.math.rsqrt(average + self.epsilon)

        moving = tf.reshape(tf.cast(self.moving_second_moment, dtype), self._param_shape)
        r = tf.sqrt(average + self.epsilon) * tf.math.rsqrt(moving + self.epsilon)
        r = tf.clip_by_value(r, 1.0 / self.r_max, self.r_max)
        r = tf.stop_gradient(tf.where(stored < float(self.warmup_steps), tf.ones_like(r), r))

        outputs = self._normalize(x, inv, r, gamma, beta, count, has_values)

        new_buffer, new_count = self._pushed(buffer, second_moment, stored, has_values)
        self.second_moment_buffer.assign(new_buffer)
        self.step_counter.assign(new_count)
        _math.assign_moving_average(self.moving_second_moment, average, self.momentum,
                                    has_values)
        return outputs

    def _normalize(self, x, inv, r, gamma, beta, count, has_values):
        """`y = gamma * r * (x * inv) + beta` with MABN's gradient for `x`, `gamma`, `beta`.

        Forward and backward are folded into per-channel factors, so that each pass reads
        the activations as few times as possible: the forward pass is one multiply-add
        `x * (gamma r inv) + beta`; the backward pass takes the two per-channel sums
        `sum(dy * x)` and `sum(dy)` (one fused reduction under XLA), from which
        `psi_B = gamma r inv sum(dy * x) / n`, `dL/dgamma = r inv sum(dy * x)` and
        `dL/dbeta = sum(dy)`, then one multiply-add
        `dL/dx = dy * (gamma r inv) - x * (inv^2 SMA(psi_B))`.
        """
        # Read in the forward pass: the backward pass of this iteration sees the buffer as it
        # was when the forward pass ran.
        buffer = tf.cast(self.backward_buffer, x.dtype)
        stored = tf.cast(self.backward_step_counter, x.dtype)
        axes = self._reduction_axes
        parameters = [p for p in (gamma, beta) if p is not None]

        @tf.custom_gradient
        def normalize(x, *parameters):
            rest = list(parameters)
            gamma_ = rest.pop(0) if gamma is not None else None
            beta_ = rest.pop(0) if beta is not None else None
            factor = r if gamma_ is None else gamma_ * r
            outputs = x * (factor * inv)
            if beta_ is not None:
                outputs = outputs + beta_

            def grad(dy):
                dy_x = tf.reduce_sum(dy * x, axes, keepdims=True)
                # psi_B = E[g_z * z] with g_z = dy * gamma * r and z = x * inv.
                psi_sum = factor * inv * dy_x
                if self.synchronized:
                    psi_sum = _math.all_reduce_sum(psi_sum)
                psi = tf.math.divide_no_nan(psi_sum, count)
                psi_average = self._simple_moving_average(psi, buffer, stored)
                updates = self._write_backward_state(*self._pushed(buffer, psi, stored,
                                                                   has_values))
                grads = [dy * (factor * inv) - x * (tf.square(inv) * psi_average)]
                if gamma_ is not None:
                    grads.append(r * inv * dy_x)
                if beta_ is not None:
                    grads.append(tf.reduce_sum(dy, axes, keepdims=True))
                # Control dependencies of every gradient (any one of them may be the only one
                # used): without them the writes are pruned when the forward pass is a
                # tf.function and the gradient is taken outside it.
                with tf.control_dependencies(updates):
                    return [tf.identity(g) for g in grads]

            return outputs, grad

        return normalize(x, *parameters)

    def _write_backward_state(self, new_buffer, new_count):
        """Assigns the backward buffer and counter from the gradient function; returns the ops.

        Assigns through `variable.value` (the `tf.Variable`) with `read_value=False`, which
        returns the assign operation itself: the gradient function makes its result depend
        on these ops, so that they are not pruned from a backward graph (Keras's `assign`
        returns the assigned value, on which a control dependency orders nothing). Eagerly
        the assignments run at once and there are no ops to return.
        """
        ops = [
            self.backward_buffer.value.assign(
                tf.cast(new_buffer, self.backward_buffer.dtype), read_value=False),
            self.backward_step_counter.value.assign(
                tf.cast(new_count, self.backward_step_counter.dtype), read_value=False),
        ]
        return [op for op in ops if op is not None]

    # ----------------------------------------------------------------------------- config
    def get_config(self):
        config = {
            "buffer_size": self.buffer_size,
            "warmup_steps": self.warmup_steps,
            "r_max": self.r_max,
        }
        return {**super().get_config(), **config}
