"""RMS normalization (Zhang & Sennrich 2019): divide by the root mean square, no centering."""

import keras
import tensorflow as tf
from keras import constraints, initializers, regularizers

from keras_norm import stats
from keras_norm.layers import base
from keras_norm.layers.group_norm import FeatureAxesMixin


@keras.saving.register_keras_serializable(package="keras_norm")
class RMSNormalization(FeatureAxesMixin, keras.layers.Layer):
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
        **kwargs: Base layer keyword arguments (e.g. `name`, `dtype`).

    Call arguments:
        inputs: Input tensor.
        mask: Optional boolean mask in Keras's layout: the input's shape without its last
            axis, or a shorter prefix of the input's shape (`(batch, time)`), broadcast over
            the remaining axes (see `keras_norm.layers.group_norm`). It is passed on; it
            changes the statistic only where it varies along a normalized axis.

    Reference:
        - [Zhang & Sennrich, 2019](https://arxiv.org/abs/1910.07467)
    """

    def __init__(
        self,
        axis=-1,
        epsilon=1e-6,
        scale_initializer="ones",
        scale_regularizer=None,
        scale_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._init_feature_axes(axis)
        self.epsilon = base.check_float(self.__class__.__name__, "epsilon", epsilon, low=0.0,
                                        low_open=True)
        self.scale_initializer = initializers.get(scale_initializer)
        self.scale_regularizer = regularizers.get(scale_regularizer)
        self.scale_constraint = constraints.get(scale_constraint)
        self.supports_masking = True
        # Keep float32 inputs float32 under mixed precision.
        self.autocast = False
        self.scale = None

    def build(self, input_shape):
        shape = self._build_feature_axes(input_shape)
        self.scale = self.add_weight(
            shape=shape, name="scale", initializer=self.scale_initializer,
            regularizer=self.scale_regularizer, constraint=self.scale_constraint,
            trainable=True, autocast=False,
        )

    def call(self, inputs, mask=None):
        x = base.to_statistics_dtype(inputs)
        axes, shape = self._feature_axes(x)
        scale = tf.reshape(tf.cast(self.scale, x.dtype), shape)
        statistics_mask = self._statistics_mask(mask, x, axes)
        if statistics_mask is None:
            # x / sqrt(mean(x^2) + eps) with a closed-form gradient (see stats.standardize).
            outputs, _ = stats.standardize(x, axes, self.epsilon, scale, center=False)
        else:
            mean_square = stats.mean_square(x, axes, statistics_mask)
            outputs = x * (tf.math.rsqrt(mean_square + self.epsilon) * scale)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = {
            "axis": self.axis,
            "epsilon": self.epsilon,
            "scale_initializer": initializers.serialize(self.scale_initializer),
            "scale_regularizer": regularizers.serialize(self.scale_regularizer),
            "scale_constraint": constraints.serialize(self.scale_constraint),
        }
        return {**super().get_config(), **config}
