"""Moments: the statistics every keras_norm layer normalizes with.

Moments are kept in float32 as `(count, mean, M2)` (`Moments`), never as `(sum x, sum x^2)`:
the variance `E[x^2] - E[x]^2` loses all precision in float32 when `|mean| >> std` (Keras 3's
synchronized batch norm has this defect). Each replica computes its own two-pass mean and
centred sum of squares; replicas (and ghost batches, and per-example parts) are merged with
Chan et al.'s parallel formula, which is exact in the same cases as the two-pass one:

    n = sum n_r,   mean = sum n_r mean_r / n,   M2 = sum [M2_r + n_r (mean_r - mean)^2]

A replica (or a masked-out group) with `n_r = 0` contributes nothing and never produces a NaN.

Also here: masks (`fallback_mask`), ghost-batch and channel-group reshapes, the moving-average
update and the gradient reductions the closed-form kernels share (`sum_over`, `sum_to`).
Internal to keras_norm; may change without notice.
"""

from typing import NamedTuple

import tensorflow as tf


class Moments(NamedTuple):
    """Sufficient statistics of a set of values: count, mean and centred sum of squares.

    All three broadcast against the tensor they were computed from (reduced axes kept as 1).
    `count` is a float tensor; it may be smaller than the mean's shape (a scalar-like tensor
    when every channel saw the same number of values).
    """

    count: tf.Tensor
    mean: tf.Tensor
    m2: tf.Tensor

    @property
    def variance(self):
        """The biased (population) variance `M2 / n`; 0 where nothing was counted."""
        return divide_by_count(self.m2, self.count)


def divide_by_count(total, count):
    """`total / count` for a sum `total` over `count` values: 0 where nothing was counted (the
    sum of nothing is 0, so dividing it by 1 there gives `tf.math.divide_no_nan`'s 0).

    Not `divide_no_nan` itself in the moments that inference paths take (per-example norms):
    TensorFlow Lite's converter (TF 2.19-2.21) lowers it to a broadcast that fails to run on
    rank-5 tensors with an unknown batch size (group layouts `(B, H, W, G, C/G)`).
    """
    return total / tf.where(tf.equal(count, 0), tf.ones_like(count), count)


def statistics_dtype(dtype):
    """The dtype statistics are computed in: float32 for half precision and integers."""
    dtype = tf.as_dtype(dtype)
    return tf.float64 if dtype == tf.float64 else tf.float32


def count_over(x, axes):
    """The number of values of `x` along `axes` (a float scalar in `x`'s dtype)."""
    # An explicit int32 index: `tf.gather(..., [])` would see a float index.
    indices = tf.constant(list(axes), tf.int32)
    return tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), indices)), x.dtype)


def moments(x, axes, mask=None):
    """Two-pass moments of `x` over `axes`, keeping the reduced axes.

    Args:
        x: A float tensor (upcast by the caller to `statistics_dtype`).
        axes: Axes to reduce.
        mask: Optional tensor broadcastable to `x`; values where it is 0/False are ignored.

    Returns:
        `Moments` with the reduced axes kept as size 1.
    """
    axes = list(axes)
    if mask is None:
        count = tf.reshape(count_over(x, axes), [1] * len(x.shape))
        # Not reduce_mean: an empty replica (count 0) must give 0, not NaN.
        mean = divide_by_count(tf.reduce_sum(x, axes, keepdims=True), count)
        # d Var / d mean is zero, so the second pass needs no gradient through the mean.
        m2 = tf.reduce_sum(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes,
                           keepdims=True)
        return Moments(count, mean, m2)
    weights = tf.cast(tf.broadcast_to(tf.cast(mask, x.dtype), tf.shape(x)), x.dtype)
    count = tf.reduce_sum(weights, axes, keepdims=True)
    mean = divide_by_count(tf.reduce_sum(x * weights, axes, keepdims=True), count)
    centred = (x - tf.stop_gradient(mean)) * weights
    m2 = tf.reduce_sum(tf.square(centred), axes, keepdims=True)
    return Moments(count, mean, m2)


def num_replicas_in_sync():
    """The number of replicas the current replica context all-reduces over (1 outside one)."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return 1
    return tf.distribute.get_replica_context().num_replicas_in_sync


def all_reduce_sum(value):
    """Sums `value` (a tensor or nest of tensors) over replicas; identity outside a strategy.

    The all-reduce is differentiable: the gradient reaching each replica is the sum of the
    upstream gradients of all replicas, as it is on one device with the concatenated batch.
    """
    if num_replicas_in_sync() == 1:
        return value
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)


def merge_across_replicas(local):
    """Merges per-replica `Moments` into global ones with Chan et al.'s stable formula.

    Two small all-reduces (per-channel vectors): `(n, n * mean)` gives the global mean, then
    `M2_r + n_r (mean_r - mean)^2` gives the global M2. Outside a multi-replica context the
    moments are returned unchanged.
    """
    if num_replicas_in_sync() == 1:
        return local
    count = tf.broadcast_to(local.count, tf.shape(local.mean))
    total_count, total_sum = all_reduce_sum((count, count * local.mean))
    mean = tf.math.divide_no_nan(total_sum, total_count)
    # The gradient through the global mean here is zero (sum n_r (mean_r - mean) = 0); the
    # gradient through each replica's own mean is what carries the cross term.
    spread = count * tf.math.squared_difference(local.mean, tf.stop_gradient(mean))
    m2 = all_reduce_sum(local.m2 + spread)
    return Moments(total_count, mean, m2)


def merge_moments(parts, axes):
    """Merges `Moments` computed over disjoint parts (e.g. per example) along `axes`.

    Chan et al.'s formula on the small per-part tensors: the moments of the union equal the
    two-pass moments over all values, so a layer that needs both per-example and batch
    statistics reads its input once for both.
    """
    axes = list(axes)
    count = tf.broadcast_to(parts.count, tf.shape(parts.mean))
    total = tf.reduce_sum(count, axes, keepdims=True)
    mean = tf.math.divide_no_nan(tf.reduce_sum(count * parts.mean, axes, keepdims=True), total)
    spread = count * tf.math.squared_difference(parts.mean, mean)
    m2 = tf.reduce_sum(parts.m2 + spread, axes, keepdims=True)
    return Moments(total, mean, m2)


def batch_moments(x, axes, mask=None, synchronized=False):
    """Moments of `x` over `axes`, merged across replicas when `synchronized`."""
    local = moments(x, axes, mask)
    return merge_across_replicas(local) if synchronized else local


def combine_groups(group_moments, group_axis=0):
    """Merges the moments of independent groups (ghost batches) along `group_axis`.

    Returns the count-weighted average of the groups' means and variances, i.e. the statistics
    the moving averages of ghost batch norm track: with equal group sizes this is the plain
    average of the groups' statistics, as in tf-keras's `virtual_batch_size`.
    """
    count = tf.broadcast_to(group_moments.count, tf.shape(group_moments.mean))
    total = tf.reduce_sum(count, group_axis, keepdims=True)
    mean = tf.math.divide_no_nan(tf.reduce_sum(count * group_moments.mean, group_axis,
                                               keepdims=True), total)
    variance = tf.math.divide_no_nan(tf.reduce_sum(group_moments.m2, group_axis,
                                                   keepdims=True), total)
    return mean, variance, total


def split_into_groups(x, group_size, mask=None):
    """Reshapes a batch `(B, ...)` into `(G, group_size, ...)` ghost batches.

    A batch that `group_size` does not divide is zero-padded to the next multiple; the padding
    is masked out, so the last group is simply smaller.

    Args:
        x: Tensor `(B, ...)`.
        group_size: Python int, examples per ghost batch.
        mask: Optional mask of the same rank as `x` (size-1 axes allowed).

    Returns:
        `(grouped_x, valid, batch_size)`: `valid` is a float mask `(G, group_size, ...)` that is
        0 on the padding and on masked-out values.
    """
    batch_size = tf.shape(x)[0]
    pad = tf.math.floormod(-batch_size, group_size)
    rest_shape = tf.shape(x)[1:]
    padding = [[0, pad]] + [[0, 0]] * (len(x.shape) - 1)
    grouped = tf.reshape(tf.pad(x, padding), tf.concat([[-1, group_size], rest_shape], 0))
    valid = tf.concat([tf.ones([batch_size], x.dtype), tf.zeros([pad], x.dtype)], 0)
    valid = tf.reshape(valid, [-1, group_size] + [1] * (len(x.shape) - 1))
    if mask is not None:
        mask = tf.pad(tf.cast(mask, x.dtype), [[0, pad]] + [[0, 0]] * (len(mask.shape) - 1))
        mask = tf.reshape(mask, tf.concat([[-1, group_size], tf.shape(mask)[1:]], 0))
        valid = valid * mask
    return grouped, valid, batch_size


def merge_groups(grouped, batch_size):
    """Inverse of `split_into_groups`: `(G, v, ...)` back to `(B, ...)`, dropping padding."""
    flat = tf.reshape(grouped, tf.concat([[-1], tf.shape(grouped)[2:]], 0))
    return flat[:batch_size]


def sum_over(value, axes):
    """`value` summed over `axes` (kept as size 1); `value` itself when there are none."""
    return tf.reduce_sum(value, axes, keepdims=True) if axes else value


def sum_to(gradient, parameter):
    """`gradient` summed over the axes on which `parameter` has size 1 (and it has not)."""
    axes = [axis for axis, size in enumerate(parameter.shape)
            if size == 1 and gradient.shape[axis] != 1]
    return tf.reduce_sum(gradient, axes, keepdims=True) if axes else gradient


def assign_moving_average(variable, value, momentum, update=None):
    """`variable <- momentum * variable + (1 - momentum) * value` (Keras's convention).

    Args:
        variable: A Keras variable (float32 statistic).
        value: The new observation, broadcastable to the variable's shape.
        momentum: Python float or tensor.
        update: Optional scalar bool tensor; where False the variable keeps its value (used
            when a batch contributed no values at all, e.g. fully masked).
    """
    value = tf.cast(tf.reshape(value, variable.shape), variable.dtype)
    old = tf.convert_to_tensor(variable)
    new = old * momentum + value * (1.0 - momentum)
    if update is not None:
        new = tf.where(update, new, old)
    variable.assign(new)


# ------------------------------------------------------------ per-example and grouped statistics


def mean_square(x, axes, mask=None):
    """`mean(x^2)` over `axes` (kept as size 1): the second moment about zero.

    What RMS norm and filter response norm divide by. With a mask, values where it is 0/False
    are ignored; a set of values with no valid one gives 0, not NaN.
    """
    axes = list(axes)
    if mask is None:
        return tf.reduce_mean(tf.square(x), axes, keepdims=True)
    weights = tf.cast(mask, x.dtype)
    count = tf.reduce_sum(tf.broadcast_to(weights, tf.shape(x)), axes, keepdims=True)
    total = tf.reduce_sum(tf.square(x) * weights, axes, keepdims=True)
    return divide_by_count(total, count)


def fallback_mask(mask, axes):
    """A float 0/1 `mask` in which each set of values reduced over `axes` with no valid value
    becomes fully valid.

    Per-example normalizations (layer, group, instance, RMS) take statistics over each
    example's own values. Where a mask leaves such a set empty (an all-padding sequence), a
    0 mean and variance would only scale it by `1 / sqrt(epsilon)`; falling back to all of its
    values normalizes it as if it were unmasked. `mask` has the rank of the tensor the
    statistics are taken of (size-1 axes allowed); the result has the shape of `mask`.
    """
    mask = tf.convert_to_tensor(mask)
    any_valid = tf.reduce_max(mask, list(axes), keepdims=True)
    return tf.maximum(mask, 1.0 - any_valid)


def split_channels(x, axis, groups):
    """Reshapes the channel axis `axis` (non-negative, static size C) into `(groups, C/groups)`.

    The group index comes first, so group `g` holds channels `g*C/groups ... (g+1)*C/groups-1`
    (contiguous channels, as in Wu & He's reference code). Unknown dimensions stay dynamic.
    """
    dynamic = tf.shape(x)
    shape = [size if size is not None else dynamic[i] for i, size in enumerate(x.shape)]
    channels = shape[axis]
    return tf.reshape(x, shape[:axis] + [groups, channels // groups] + shape[axis + 1:])


def group_moments(x, axis, groups, mask=None):
    """Per-example moments of each group of channels (group norm's statistics).

    Args:
        x: Tensor `(B, ..., C, ...)` with the channels on the non-negative axis `axis`.
        axis: The channel axis (not 0: axis 0 is the examples).
        groups: Python int dividing `C`.
        mask: Optional 0/1 float mask of the rank of `x` (size-1 axes broadcast, the channel
            axis included); values where it is 0 are ignored, and a set (example, group) with
            no valid value uses all of its values (`fallback_mask`).

    Returns:
        `(grouped, moments)`: `grouped` is `split_channels(x, axis, groups)`; `moments` reduce
        every axis of `grouped` except the examples (0) and the groups (`axis`), so they
        broadcast against `grouped`.
    """
    grouped = split_channels(x, axis, groups)
    axes = [a for a in range(1, len(grouped.shape)) if a != axis]
    if mask is None:
        return grouped, moments(grouped, axes)
    # A mask that varies along the channels (Keras's layout with the channels not last) is
    # split into groups as `x` is; one of size 1 there broadcasts over each group's channels.
    weights = (tf.expand_dims(mask, axis) if mask.shape[axis] == 1
               else split_channels(mask, axis, groups))
    return grouped, moments(grouped, axes, fallback_mask(weights, axes))
