"""The math every keras_norm layer uses (private: may change without notice).

- `moments`: `(count, mean, M2)` moments in float32, masks, the cross-replica (Chan) merge,
  ghost-batch and channel-group reshapes, moving-average updates.
- `kernels`: the normalizing step (`standardize`, `standardize_with`, `normalize`) with
  closed-form gradients, and the `fused` decorator that runs such a pass as one XLA-compiled
  kernel in training traces (`set_xla_kernels` turns that off).

Layers use the names re-exported here (`_math.standardize(...)`, `@_math.fused`).
"""

from keras_norm._math.kernels import (affine_or_identity, fused, normalize,  # noqa: F401
                                      outputs_and_moments, set_xla_kernels, standardize,
                                      standardize_with, use_xla_kernels, xla_kernels_enabled)
from keras_norm._math.moments import (Moments, all_reduce_sum, assign_moving_average,  # noqa: F401
                                      batch_moments, combine_groups, count_over,
                                      divide_by_count, fallback_mask, group_moments,
                                      mean_square, merge_across_replicas, merge_groups,
                                      merge_moments, moments, num_replicas_in_sync,
                                      split_channels, split_into_groups, statistics_dtype,
                                      sum_over, sum_to)
