"""Convolutions with a transformed kernel: weight standardization and kernel centring.

`WeightStandardizedConv2D` (Qiao et al., 2019) standardizes each output channel's kernel over
its fan-in before convolving; `CenteredConv2D` only subtracts the fan-in mean (the "centered
convolution" of Moving Average Batch Normalization, Yan et al., 2020). Both are
`keras.layers.Conv2D` subclasses sharing one mechanism, `KernelTransformMixin`: the stored
weight is the raw kernel (what `get_weights()` returns and the optimizer updates), the transform
runs in float32 on every call and the gradient flows through it to the raw kernel.
"""

import keras
import tensorflow as tf

from keras_norm import _math
from keras_norm.layers import base, docstrings


class KernelTransformMixin:
    """Convolves with `transform_kernel(kernel)` instead of the raw kernel.

    Put it before the Keras convolution class in the bases. The kernel variable is created
    without autocasting, so under `mixed_float16` the transform reads the float32 kernel and
    only its result is cast to the compute dtype.
    """

    def add_weight(self, *args, **kwargs):
        if kwargs.get("name") == "kernel":
            kwargs["autocast"] = False  # the transform needs the float32 kernel
        return super().add_weight(*args, **kwargs)

    def transform_kernel(self, kernel):
        """Maps the float32 raw kernel `(*kernel_size, in / groups, filters)` to the one used."""
        raise NotImplementedError

    def _fan_in_moments(self, kernel):
        """Two-pass float32 moments of each output channel's kernel over its fan-in."""
        return _math.moments(kernel, list(range(len(kernel.shape) - 1)))

    def convolution_op(self, inputs, kernel):
        kernel = self.transform_kernel(tf.cast(tf.convert_to_tensor(kernel), tf.float32))
        return super().convolution_op(inputs, tf.cast(kernel, self.compute_dtype))

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.kernel)
        if self.use_bias:
            # Not Keras's `ops.add(outputs, reshape(bias))`: it guesses the channel axis from the
            # shapes and, for a channels-first output whose width equals `filters`, adds the
            # bias along the width (Keras 3.15). `bias_add` is told the format.
            data_format = "N...C" if self.data_format == "channels_last" else "NC..."
            outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, outputs.dtype),
                                     data_format=data_format)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class WeightStandardizedConv2D(KernelTransformMixin, keras.layers.Conv2D):
    """2D convolution with a weight-standardized kernel.

    Before convolving, each output channel's kernel is standardized over its fan-in (kernel
    height, kernel width and the input channels of its group), with biased variance:

    ```
    mean_o = mean(W[:, :, :, o]),  var_o = mean((W[:, :, :, o] - mean_o) ** 2)
    W_hat[:, :, :, o] = (W[:, :, :, o] - mean_o) / sqrt(var_o + epsilon)
    y = conv2d(x, W_hat) + bias
    ```

    The layer stores the raw kernel `W` (so `get_weights()`, checkpoints and the optimizer see
    `W`); `W_hat` is recomputed in float32 on every call and the gradient flows through the
    standardization to `W`. It pairs with group normalization for small batches.

    Implementations differ in where `epsilon` goes: the paper's code divides by the unbiased
    `std + 1e-5`, timm's `StdConv2d` uses `sqrt(var + 1e-6)`, BiT `sqrt(var + 1e-10)`. Here
    `epsilon` is inside the square root with the biased variance (timm/BiT form).

    Example:

    >>> import numpy as np, keras
    >>> from keras_norm.layers.weight_standardization import WeightStandardizedConv2D
    >>> conv = WeightStandardizedConv2D(8, 3, padding="same", use_bias=False)
    >>> conv(np.zeros((2, 16, 16, 3), "float32")).shape
    TensorShape([2, 16, 16, 8])

    Args:
        {conv2d_args}
        epsilon: Positive float added to each output channel's kernel variance (keyword only).
            Defaults to `1e-5`.
        **kwargs: Other `keras.layers.Conv2D` / base layer keyword arguments.

    Call arguments:
        inputs: A 4D tensor, as for `keras.layers.Conv2D`. (On CPU, TensorFlow runs
            `data_format="channels_first"` convolutions only under XLA.)

    Reference:
        - [Qiao et al., 2019, Micro-Batch Training with Batch-Channel Normalization and Weight
          Standardization](https://arxiv.org/abs/1903.10520)
    """

    def __init__(self, filters, kernel_size, *args, epsilon=1e-5, **kwargs):
        super().__init__(filters, kernel_size, *args, **kwargs)
        self.epsilon = base.check_float(self.__class__.__name__, "epsilon", epsilon, low=0.0,
                                        low_open=True)

    def transform_kernel(self, kernel):
        moments = self._fan_in_moments(kernel)
        return _math.normalize(kernel, moments.mean, moments.variance, self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_norm")
@docstrings.document
class CenteredConv2D(KernelTransformMixin, keras.layers.Conv2D):
    """2D convolution whose kernel has zero mean over each output channel's fan-in.

    ```
    W_hat[:, :, :, o] = W[:, :, :, o] - mean(W[:, :, :, o])
    y = conv2d(x, W_hat) + bias
    ```

    Moving Average Batch Normalization (Yan et al., 2020) removes centring from the
    normalization and centres the preceding convolution's weights instead; this is that
    convolution. The layer stores the raw kernel `W`; `W_hat` is recomputed in float32 on every
    call and the gradient flows through the centring to `W`.

    Example:

    >>> import numpy as np, tensorflow as tf
    >>> from keras_norm.layers.weight_standardization import CenteredConv2D
    >>> conv = CenteredConv2D(8, 3, use_bias=False)
    >>> conv.build((None, 16, 16, 3))
    >>> kernel = conv.transform_kernel(tf.convert_to_tensor(conv.kernel))
    >>> bool(np.allclose(tf.reduce_mean(kernel, axis=[0, 1, 2]), 0.0, atol=1e-6))
    True

    Args:
        {conv2d_args}
        **kwargs: Other `keras.layers.Conv2D` / base layer keyword arguments.

    Call arguments:
        inputs: A 4D tensor, as for `keras.layers.Conv2D`.

    Reference:
        - [Yan et al., 2020, Towards Stabilizing Batch Statistics in Backward Propagation of
          Batch Normalization](https://arxiv.org/abs/2001.06838)
    """

    def transform_kernel(self, kernel):
        return kernel - self._fan_in_moments(kernel).mean
