"""RMS normalization (Zhang & Sennrich 2019): divide by the root mean square, no centering."""

import keras
import tensorflow as tf

from keras_norm import _math
from keras_norm.layers import base, docstrings


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class RMSNormalization(base.FeatureAxesMixin, base.NormalizationLayer):
    """Root mean square normalization: each example scaled by the RMS of its features.

    Layer normalization without the mean: cheaper, and as good in the paper's experiments. A
    drop-in replacement for `keras.layers.RMSNormalization` (Keras 3): the same arguments,
    defaults (`epsilon=1e-6`), weight (`scale`: name and shape) and outputs. Unlike Keras's,
    `get_config()` is not rewritten by `build`, `scale` is reshaped to the normalized axes (Keras
    broadcasts it against the trailing axes, which is wrong for e.g. `axis=1`), the statistic is
    float32 under mixed precision, the mask is passed on (Keras drops it with a warning) and used
    where it covers a normalized axis, and `scale` takes an initializer, regularizer and
    constraint.

    ```
    ms_i = mean of x_i^2 over `axis`
    y_i = scale * x_i / sqrt(ms_i + epsilon)
    ```

    Example:

    >>> import numpy as np, keras_norm
    >>> layer = keras_norm.RMSNormalization()
    >>> y = layer(np.array([[3.0, -4.0]], "float32"))  # RMS = sqrt(12.5)
    >>> np.round(y.numpy(), 4)
    array([[ 0.8485, -1.1314]], dtype=float32)

    Args:
        axis: Integer or list of integers: the axes to normalize over (typically the
            features). Defaults to `-1`.
        epsilon: Positive float added to the mean square. Defaults to `1e-6`.
        scale_initializer: Initializer for `scale`. Defaults to `"ones"`.
        scale_regularizer: Optional regularizer for `scale`. Defaults to `None`.
        scale_constraint: Optional constraint for `scale`. Defaults to `None`.
        {kwargs_arg}

    Call arguments:
        inputs: Input tensor.
        {per_example_mask_arg}
            It is passed on; it changes the statistic only where it varies along a
            normalized axis.

    Reference:
        - [Zhang & Sennrich, 2019](https://arxiv.org/abs/1910.07467)
    """

    def __init__(self, axis=-1, epsilon=1e-6, scale_initializer="ones", scale_regularizer=None,
                 scale_constraint=None, **kwargs):
        super().__init__(epsilon, **kwargs)
        self._init_feature_axes(axis)
        self._init_weight_arguments("scale", scale_initializer, scale_regularizer,
                                    scale_constraint)
        # Keep float32 inputs float32 under mixed precision.
        self.autocast = False
        self.scale = None

    def build(self, input_shape):
        shape = self._build_feature_axes(input_shape)
        self.scale = self._add_learned("scale", shape)

    def call(self, inputs, mask=None):
        x = base.to_statistics_dtype(inputs)
        axes, shape = self._feature_axes(x)
        scale = tf.reshape(tf.cast(self.scale, x.dtype), shape)
        statistics_mask = self._statistics_mask(mask, x, axes)
        if statistics_mask is None:
            # x / sqrt(mean(x^2) + eps) with a closed-form gradient (see _math.standardize).
            outputs, _ = _math.standardize(x, axes, self.epsilon, scale, center=False)
        else:
            mean_square = _math.mean_square(x, axes, statistics_mask)
            outputs = x * (tf.math.rsqrt(mean_square + self.epsilon) * scale)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), **self._weight_arguments_config("scale")}
