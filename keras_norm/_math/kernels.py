"""Kernels: the normalizing step, as XLA-compiled forward and backward passes.

`standardize` (batch, ghost, group, instance, layer, RMS norm and FRN in training) and
`standardize_with` (Cross-Iteration BN, Batch Renormalization) compute
`gamma * (x - mean) / sqrt(var + epsilon) + beta` with hand-written backward passes; each pass is
a function decorated with `fused`, which runs it as one XLA-compiled kernel in a training
trace and as plain ops elsewhere (eagerly, and in inference graphs such as exported models).
`set_xla_kernels(False)` turns the compiled versions off (also exported as
`keras_norm.set_xla_kernels`). `normalize` is the inference-time step with given statistics.

Public: `set_xla_kernels` and `xla_kernels_enabled` (through `keras_norm`); the rest is internal
to keras_norm's layers and may change without notice.
"""

import functools
import weakref

import tensorflow as tf

from keras_norm import _compat
from keras_norm._math.moments import (Moments, all_reduce_sum, count_over, num_replicas_in_sync,
                                      sum_over, sum_to)


def normalize(x, mean, variance, epsilon, gamma=None, beta=None):
    """`gamma * (x - mean) / sqrt(variance + epsilon) + beta` as one multiply-add.

    Folding the statistics and the affine parameters into a per-channel scale and offset keeps
    the per-element work to one fused multiply-add, which XLA fuses with its neighbours.
    """
    inv = tf.math.rsqrt(variance + epsilon)
    if gamma is not None:
        inv = inv * gamma
    offset = -mean * inv
    if beta is not None:
        offset = offset + beta
    return x * inv + offset


# Whether the local (unsynchronized) passes of `standardize` and the other closed-form
# kernels run XLA-compiled. Read when a layer's call is traced.
_XLA_KERNELS = True


def set_xla_kernels(enabled):
    """Turns the XLA-compiled kernels of keras_norm's layers on (the default) or off.

    With them on, each layer's training-mode forward and backward pass runs as one compiled
    kernel in a `tf.function` (e.g. `Model.fit`) even when the model is not compiled with
    `jit_compile=True` (forward+backward 1.1-3.5x faster on the 2-core CPU of BENCHMARKS.md,
    in ratios to keras_norm's BatchNormalization; the same results within float rounding).
    Eager calls always run plain ops, and so do inference traces (no gradient tape:
    `predict`, `evaluate`, `model.export`, the TFLite converter), so exported graphs hold only
    ordinary TensorFlow ops whatever this setting. Inside a `jit_compile=True` model the
    kernels are inlined into the model's program, each behind an XLA optimization barrier
    (see `fused`). Turn them off where XLA is unavailable or unwanted for training; layers
    traced afterwards use plain TensorFlow ops.

    Args:
        enabled: Python bool.

    Returns:
        The previous setting.
    """
    global _XLA_KERNELS
    if not isinstance(enabled, bool):
        raise TypeError(f"set_xla_kernels: `enabled` must be a bool. Received: enabled={enabled!r}")
    previous, _XLA_KERNELS = _XLA_KERNELS, enabled
    return previous


def xla_kernels_enabled():
    """Whether keras_norm's layers use XLA-compiled kernels (see `set_xla_kernels`)."""
    return _XLA_KERNELS


# The `tf.function` graphs in which a kernel was traced under a recording gradient tape (a
# training step's graph, and the graphs it is traced inside). A backward kernel is traced when
# the gradient is built, after the tape has stopped recording, in that graph or in the
# gradient graph of a control-flow branch traced inside it; it compiles when one of those is
# marked. Weak: a graph is forgotten with its function.
_TRAINING_GRAPHS = weakref.WeakSet()


def use_xla_kernels():
    """Whether a kernel traced now should run XLA-compiled: when they are enabled, the call is
    traced into a graph and that graph computes gradients.

    A forward kernel compiles when a gradient tape records it (a training step: `Model.fit`,
    any `tf.GradientTape` in a `tf.function`); a backward kernel, traced while the gradient is
    built, when its graph (or one it is traced inside) holds such a forward kernel. Inference
    traces (`predict`, `evaluate`, `model.export`, the TFLite converter) record no gradient,
    so their graphs hold only ordinary TensorFlow ops, which every runtime has: the kernels
    only pay off through their closed-form gradients. Eager calls (debugging,
    `run_eagerly=True`) run the same math as plain ops, step by step, with no per-shape
    compilation."""
    if not _XLA_KERNELS or tf.executing_eagerly():
        return False
    graphs = _compat.enclosing_graphs()
    if _compat.gradient_recording():
        _TRAINING_GRAPHS.update(graphs)
        return True
    return any(graph in _TRAINING_GRAPHS for graph in graphs)


class fused:  # noqa: N801 (used as a decorator)
    """Decorator: a function of tensors (and keyword-only Python arguments) that runs as one
    XLA-compiled kernel when `use_xla_kernels()` (traced for a training step) and as plain
    ops otherwise (eagerly, and in inference traces such as exported models).

    The compiled version is a `tf.function(jit_compile=True)` traced once per input signature
    (XLA specializes each concrete shape when it runs); `.plain` is the undecorated function,
    for callers that must stay outside XLA (cross-replica collectives). Layers pair a forward
    and a backward kernel under `tf.custom_gradient`, so that neither pass keeps full-size
    intermediates for the other. The compiled version passes its tensor arguments through an
    XLA optimization barrier, so that inside a model compiled as a whole the kernel's
    arithmetic stays its own (see `_behind_barrier`).
    """

    def __init__(self, function):
        self.plain = function
        # No AutoGraph: kernels have no tensor-dependent Python control flow, and AutoGraph
        # caches its conversion by code object, which every `_behind_barrier` wrapper shares
        # (with it on, a backward kernel's wrapper once called a forward kernel).
        self.compiled = tf.function(_behind_barrier(function), jit_compile=True,
                                    autograph=False)
        functools.update_wrapper(self, function)

    def __call__(self, *tensors, **static):
        if not use_xla_kernels():
            return self.plain(*tensors, **static)
        return self.compiled(*_compat.xla_call_arguments(tensors), **static)


def _behind_barrier(function):
    """`function` with its tensor arguments passed through an XLA optimization barrier.

    Inside a model compiled with `jit_compile=True` the kernels are inlined into one XLA
    program, and XLA would merge a backward kernel's recomputation (e.g. EvoNorm-B0's
    `1 / max(...)`) with the forward pass's copy of the same expression: one full-size
    tensor, written and read back, where the kernel recomputes it from `x` inside each
    reduction for free. The barrier keeps each kernel's arithmetic its own (EvoNorm-B0
    forward+backward under model-level XLA, (128, 32, 32, 64): 1.76x -> 1.14x keras_norm BN
    on the 2-core CPU). It changes no value. (The barrier op is TensorFlow-internal API:
    without it `_compat.optimization_barrier` warns once and passes the tensors through.)
    """

    @functools.wraps(function)
    def wrapped(*tensors, **static):
        return function(*_compat.optimization_barrier(*tensors), **static)

    return wrapped


def standardize(x, axes, epsilon, gamma=None, beta=None, synchronized=False, center=True):
    """`gamma * (x - mean) / sqrt(var + epsilon) + beta` with moments over `axes` and a
    hand-written backward pass: the training-mode step of batch, ghost, group, instance and
    layer norm (unmasked inputs), and with `center=False` of RMS norm and FRN.

    Equivalent to `normalize(x, *batch_moments(x, axes, synchronized=...), ...)` and
    differentiable the same way, but cheaper: automatic differentiation of the composed ops
    keeps several full-size intermediates and, when synchronized, differentiates both forward
    all-reduces; the closed form (as in PyTorch's SyncBatchNorm), with `g = dy * gamma`,

        dx = 1 / sigma * (g - mean(g) - x_hat * mean(g * x_hat))

    needs two reductions over `axes` and, when synchronized, one all-reduce of their results.
    The means run over the global batch when `synchronized`, so each replica's input gradient
    equals what one device computes on the concatenated batch. The centred second pass uses
    the (global) mean: an exact two-pass variance, no `E[x^2] - E[x]^2` cancellation.

    Without synchronization, the forward and the backward pass each run as one XLA-compiled
    kernel (see `set_xla_kernels`), also when the surrounding model is not compiled: the
    elementwise work fuses into the reductions' passes, and the backward pass recomputes
    `x - mean` from `x` instead of keeping it, so the layer saves nothing full-size but its
    input. The synchronized path runs as ordinary graph ops because TensorFlow cannot compile
    cross-replica collectives on every device.

    Args:
        x: Float input in its statistics dtype (see `statistics_dtype`).
        axes: The reduction axes. Batch norm: all but the channel axis; ghost batches
            `(G, v, ...)`: all but the group and channel axes; group norm on `(B, ..., G, C/G)`:
            all but the examples and groups; layer norm: the feature axes.
        epsilon: Added to the variance.
        gamma, beta: Optional scale and offset broadcastable to `x`. Where they have size 1 on
            an axis the statistics keep (the examples in group norm, the groups of ghost
            batches), their gradients are summed over it; they may vary along reduced axes
            (layer norm's per-feature parameters).
        synchronized: Whether statistics (and their gradients) span all replicas.
        center: If `False`, no mean is subtracted: `x / sqrt(mean(x ** 2) + epsilon)`, the
            second moment about zero (RMS norm, FRN), and the returned mean is 0.

    Returns:
        `(outputs, Moments)`; the moments (for moving averages) carry no gradient.
    """
    rank = len(x.shape)
    sync = synchronized and num_replicas_in_sync() > 1
    gamma, beta = affine_or_identity(x, gamma, beta)
    static = {"axes": tuple(axes), "center": bool(center), "sync": sync}
    forward_pass, backward_pass = _standardize_forward, _standardize_backward
    if sync:  # collectives stay outside XLA (see above)
        forward_pass, backward_pass = forward_pass.plain, backward_pass.plain

    @tf.custom_gradient
    def forward(x, gamma, beta):
        outputs, count, mean, m2, inv_std = forward_pass(x, gamma, beta, epsilon=float(epsilon),
                                                         **static)

        def backward(d_outputs, *_statistics_gradients):
            # The statistics outputs feed moving averages only, so their gradients are unused.
            return backward_pass(d_outputs, x, mean, inv_std, count, gamma, beta, **static)

        return (outputs, tf.reshape(count, [1] * rank), mean, m2), backward

    return outputs_and_moments(*forward(x, gamma, beta))


def affine_or_identity(x, gamma, beta):
    """`(gamma, beta)` with `None` replaced by a broadcastable 1 and 0 in `x`'s dtype (for
    closed-form steps that always take both)."""
    ones = [1] * len(x.shape)
    return (tf.ones(ones, x.dtype) if gamma is None else gamma,
            tf.zeros(ones, x.dtype) if beta is None else beta)


def outputs_and_moments(outputs, count, mean, m2):
    """`(outputs, Moments)` from a closed-form step's results; the moments feed moving
    averages and carry no gradient."""
    return outputs, Moments(*(tf.stop_gradient(t) for t in (count, mean, m2)))


def standardize_with(x, axes, epsilon, statistics_fn, gamma=None, beta=None,
                     synchronized=False):
    """`gamma * (x - M) / sqrt(V + epsilon) + beta` with `(M, V) = statistics_fn(mean, var)`
    of the batch moments over `axes`, with a hand-written backward pass.

    For layers that normalize with statistics derived from the batch's (Cross-Iteration BN
    pools them with compensated statistics of earlier iterations; Batch Renormalization's
    `x_hat r + d` with constant `r, d` is `(x - M) / sqrt(V + eps)` for `M = mean - d s`,
    `V = s^2 - eps`, `s = sqrt(var + eps) / r`): gradients reach `x`
    through `mean` and `var` as `statistics_fn` passes them on. `statistics_fn` must act
    channel by channel (each output value depends only on the same position of `mean` and
    `var`) and read no state that the caller updates in the same step after this call. Its
    per-channel derivatives are taken once, in the forward pass (so the backward pass reads
    no variable again), and with `dM, dV` the loss's gradients of `M, V`:

        dmean = dM dM/dmean + dV dV/dmean,   dvar = dM dM/dvar + dV dV/dvar
        dx = dy gamma / sigma + dmean / n + dvar 2 (x - mean) / n
        dM = -sum(dy gamma) / sigma,   dV = -sum(dy gamma (x - M)) / (2 sigma^3)

    with `sigma = sqrt(V + epsilon)`. With `statistics_fn` the identity this is
    `standardize`. Moments and the sums of `dM`, `dV` span all replicas when `synchronized`.

    Args:
        x: Float input in its statistics dtype.
        axes: The reduction axes (`gamma` and `beta` must have size 1 along them).
        epsilon: Added to `V`.
        statistics_fn: Callable `(mean, var) -> (M, V)` on tensors shaped like the moments.
        gamma, beta: Optional scale and offset, broadcastable to the moments.
        synchronized: Whether the statistics span all replicas.

    Returns:
        `(outputs, Moments)`: the batch's own moments (no gradient).
    """
    rank = len(x.shape)
    sync = synchronized and num_replicas_in_sync() > 1
    gamma, beta = affine_or_identity(x, gamma, beta)
    for name, parameter in (("gamma", gamma), ("beta", beta)):
        if any(parameter.shape[a] != 1 for a in axes):
            raise ValueError(f"standardize_with: `{name}` must have size 1 along the reduced "
                             f"axes {list(axes)}. Received: {name}.shape={parameter.shape}")
    static = {"axes": tuple(axes), "center": True, "sync": sync}
    statistics_pass, backward_pass = _standardize_statistics, _standardize_with_backward
    if sync:  # collectives stay outside XLA (see `standardize`)
        statistics_pass, backward_pass = statistics_pass.plain, backward_pass.plain

    @tf.custom_gradient
    def forward(x, gamma, beta):
        count, mean, m2, _ = statistics_pass(x, epsilon=float(epsilon), **static)
        variance = tf.math.divide_no_nan(m2, count)
        derived_mean, derived_variance, jacobian = _channelwise_jacobian(statistics_fn, mean,
                                                                         variance)
        inv_std = tf.math.rsqrt(derived_variance + epsilon)
        outputs = _standardize_affine(x, derived_mean, inv_std, gamma, beta)

        def backward(d_outputs, *_statistics_gradients):
            return backward_pass(d_outputs, x, mean, derived_mean, inv_std, count, gamma, beta,
                                 *jacobian, axes=tuple(axes), sync=sync)

        return (outputs, tf.reshape(count, [1] * rank), mean, m2), backward

    return outputs_and_moments(*forward(x, gamma, beta))


def _channelwise_jacobian(statistics_fn, mean, variance):
    """`(M, V, [dM/dmean, dM/dvar, dV/dmean, dV/dvar])` of a channel-wise function: the
    gradient of `sum(M)` is then each channel's own derivative."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([mean, variance])
        derived_mean, derived_variance = statistics_fn(mean, variance)
        total_mean, total_variance = (tf.reduce_sum(derived_mean),
                                      tf.reduce_sum(derived_variance))
    zero = tf.UnconnectedGradients.ZERO
    jacobian = (tuple(tape.gradient(total_mean, [mean, variance], unconnected_gradients=zero)),
                tuple(tape.gradient(total_variance, [mean, variance],
                                    unconnected_gradients=zero)))
    del tape
    return (tf.stop_gradient(derived_mean), tf.stop_gradient(derived_variance),
            [tf.stop_gradient(t) for pair in jacobian for t in pair])


@fused
def _standardize_with_backward(d_outputs, x, mean, derived_mean, inv_std, count, gamma, beta,
                               mean_by_mean, mean_by_variance, variance_by_mean,
                               variance_by_variance, *, axes, sync):
    """`standardize_with`'s backward pass (formulas there): the gradients of `x`, `gamma` and
    `beta`, with `d{M,V}/d{mean,var}` the per-channel derivatives of the statistics map.
    Separate reductions: on a batch layout XLA's CPU backend reduces stacked terms slower."""
    sum_dy = tf.reduce_sum(d_outputs, list(axes), keepdims=True)
    sum_dy_centred = tf.reduce_sum(d_outputs * (x - derived_mean), list(axes), keepdims=True)
    d_gamma = sum_to(sum_dy_centred * inv_std, gamma)
    d_beta = sum_to(sum_dy, beta)
    d_derived_mean = -gamma * sum_dy * inv_std
    d_derived_variance = -0.5 * gamma * sum_dy_centred * inv_std ** 3
    if sync:
        d_derived_mean, d_derived_variance = all_reduce_sum((d_derived_mean, d_derived_variance))
    d_mean = d_derived_mean * mean_by_mean + d_derived_variance * variance_by_mean
    d_variance = d_derived_mean * mean_by_variance + d_derived_variance * variance_by_variance
    d_x = (d_outputs * (gamma * inv_std) + tf.math.divide_no_nan(d_mean, count)
           + tf.math.divide_no_nan(2.0 * d_variance, count) * (x - mean))
    return d_x, d_gamma, d_beta


@fused
def _standardize_affine(x, mean, inv_std, scale, offset):
    """`(x - mean) * inv_std * scale + offset`: the output pass of `standardize_with`."""
    return (x - mean) * (scale * inv_std) + offset


@fused
def _standardize_statistics(x, *, axes, epsilon, center, sync):
    """`(count, mean, m2, inv_std)`: `standardize`'s forward pass without the output (the
    statistics pass of `standardize_with`)."""
    count, mean, m2, inv_std, _ = _standardize_moments(x, axes, epsilon, center, sync)
    return count, mean, m2, inv_std


def _standardize_moments(x, axes, epsilon, center, sync):
    """`(count, mean, m2, inv_std, x - mean)` over `axes`: two passes (mean, then the centred
    sum of squares), merged across replicas when `sync`."""
    count = count_over(x, axes)
    if center:
        total = tf.reduce_sum(x, axes, keepdims=True)
        if sync:
            count, total = all_reduce_sum((count, total))
        mean = tf.math.divide_no_nan(total, count)
        centred = x - mean
    else:
        if sync:
            count = all_reduce_sum(count)
        mean = tf.zeros([1] * len(x.shape), x.dtype)
        centred = x
    m2 = tf.reduce_sum(tf.square(centred), axes, keepdims=True)
    if sync:
        m2 = all_reduce_sum(m2)
    inv_std = tf.math.rsqrt(tf.math.divide_no_nan(m2, count) + epsilon)
    return count, mean, m2, inv_std, centred


@fused
def _standardize_forward(x, gamma, beta, *, axes, epsilon, center, sync):
    """`standardize`'s forward pass: `(outputs, count, mean, m2, inv_std)`."""
    count, mean, m2, inv_std, centred = _standardize_moments(x, axes, epsilon, center, sync)
    outputs = centred * (gamma * inv_std) + beta
    return outputs, count, mean, m2, inv_std


@fused
def _standardize_backward(d_outputs, x, mean, inv_std, count, gamma, beta, *, axes, center,
                          sync):
    """`standardize`'s backward pass: the gradients of `x`, `gamma` and `beta`."""
    # Reduced axes along which gamma and beta are constant (all of them in batch norm; the
    # spatial axes in group norm): the backward pass reduces over these first, on the input's
    # size, and does the rest on the small results. Along the others (group norm's channels
    # within a group, layer norm's features) the parameters vary.
    inner = [axis for axis in axes if gamma.shape[axis] == 1 and beta.shape[axis] == 1]
    outer = [axis for axis in axes if axis not in inner]
    # Recomputed rather than kept from the forward pass: one subtraction fused into this
    # kernel costs less than holding a second full-size tensor until the backward pass.
    centred = x - mean if center else x
    sum_dy = sum_over(d_outputs, inner)
    sum_dy_centred = sum_over(d_outputs * centred, inner)
    # gamma and beta get this replica's own gradient; the optimizer sums replicas.
    d_gamma = sum_to(sum_dy_centred * inv_std, gamma)
    d_beta = sum_to(sum_dy, beta)
    # The sums of g = dy * gamma and g * (x - mean) over all of `axes`.
    sum_g = sum_over(sum_dy * gamma, outer)
    sum_g_centred = sum_over(sum_dy_centred * gamma, outer)
    if sync:
        sum_g, sum_g_centred = all_reduce_sum((sum_g, sum_g_centred))
    projection = tf.math.divide_no_nan(sum_g_centred, count) * tf.square(inv_std)
    d_x = d_outputs * (gamma * inv_std) - centred * (inv_std * projection)
    if center:
        d_x = d_x - inv_std * tf.math.divide_no_nan(sum_g, count)
    return d_x, d_gamma, d_beta
