"""NumPy references of weight-standardized and centered convolutions (float64).

A direct 2D convolution (NHWC, "valid"/"same" padding, strides, dilation, groups), its gradient
with respect to the kernel, and the kernel transforms with their closed-form backward passes.
"""

import math

import numpy as np


def standardize(kernel, epsilon):
    """`(W - mean) / sqrt(var + eps)` per output channel over its fan-in (biased variance)."""
    axes = tuple(range(kernel.ndim - 1))
    mean = kernel.mean(axes, keepdims=True)
    var = kernel.var(axes, keepdims=True)
    return (kernel - mean) / np.sqrt(var + epsilon)


def center(kernel):
    """`W - mean` per output channel over its fan-in."""
    return kernel - kernel.mean(tuple(range(kernel.ndim - 1)), keepdims=True)


def standardize_backward(kernel, epsilon, grad):
    """dL/dW from dL/dW_hat for `standardize` (the batch-norm backward over the fan-in)."""
    axes = tuple(range(kernel.ndim - 1))
    w_hat = standardize(kernel, epsilon)
    inv_std = 1.0 / np.sqrt(kernel.var(axes, keepdims=True) + epsilon)
    return inv_std * (grad - grad.mean(axes, keepdims=True)
                      - w_hat * (grad * w_hat).mean(axes, keepdims=True))


def center_backward(grad):
    return grad - grad.mean(tuple(range(grad.ndim - 1)), keepdims=True)


def _padding(size, kernel, stride, dilation, padding):
    """(output size, pad before, pad after) as TensorFlow computes them."""
    effective = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (size - effective) // stride + 1, 0, 0
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + effective - size, 0)
    return out, total // 2, total - total // 2


def _patches(x, kernel_shape, strides, padding, dilation):
    """Yields `(i, j, patch)`: the input values kernel tap (i, j) multiplies, `(N, OH, OW, C)`."""
    kh, kw = kernel_shape
    oh, top, bottom = _padding(x.shape[1], kh, strides[0], dilation[0], padding)
    ow, left, right = _padding(x.shape[2], kw, strides[1], dilation[1], padding)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    for i in range(kh):
        for j in range(kw):
            r, c = i * dilation[0], j * dilation[1]
            yield i, j, xp[:, r:r + (oh - 1) * strides[0] + 1:strides[0],
                           c:c + (ow - 1) * strides[1] + 1:strides[1], :]


def conv2d(x, kernel, strides=(1, 1), padding="valid", dilation=(1, 1), groups=1):
    """Direct convolution of NHWC `x` with `kernel (kh, kw, C / groups, filters)`."""
    x = np.asarray(x, np.float64)
    kh, kw, cin, filters = kernel.shape
    cout = filters // groups
    y = None
    for i, j, patch in _patches(x, (kh, kw), strides, padding, dilation):
        if y is None:
            y = np.zeros(patch.shape[:3] + (filters,))
        for g in range(groups):
            y[..., g * cout:(g + 1) * cout] += (
                patch[..., g * cin:(g + 1) * cin] @ kernel[i, j, :, g * cout:(g + 1) * cout])
    return y


def conv2d_kernel_gradient(x, dy, kernel_shape, strides=(1, 1), padding="valid",
                           dilation=(1, 1), groups=1):
    """dL/dkernel of `sum(conv2d(x, kernel) * dy)`."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    kh, kw, cin, filters = kernel_shape
    cout = filters // groups
    grad = np.zeros(kernel_shape)
    for i, j, patch in _patches(x, (kh, kw), strides, padding, dilation):
        for g in range(groups):
            grad[i, j, :, g * cout:(g + 1) * cout] = np.einsum(
                "nhwc,nhwo->co", patch[..., g * cin:(g + 1) * cin],
                dy[..., g * cout:(g + 1) * cout])
    return grad


class TransformedConvReference:
    """`conv2d(x, transform(W)) + bias`, identical in training and inference.

    Args:
        weights: `{"kernel": W, "bias": b}` (bias optional).
        transform: `"standardize"` or `"center"`.
        data_format: `"channels_last"` or `"channels_first"` (transposed around the NHWC conv).
        Others as for `keras.layers.Conv2D`.
    """

    def __init__(self, weights, transform, epsilon=1e-5, strides=1, padding="valid",
                 dilation_rate=1, groups=1, data_format="channels_last"):
        self.kernel = np.asarray(weights["kernel"], np.float64)
        self.bias = np.asarray(weights["bias"], np.float64) if "bias" in weights else None
        self.transform, self.eps = transform, epsilon
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.strides, self.dilation = pair(strides), pair(dilation_rate)
        self.padding, self.groups = padding, groups
        self.channels_first = data_format == "channels_first"

    def transformed_kernel(self):
        if self.transform == "standardize":
            return standardize(self.kernel, self.eps)
        return center(self.kernel)

    def _nhwc(self, x):
        x = np.asarray(x, np.float64)
        return np.transpose(x, (0, 2, 3, 1)) if self.channels_first else x

    def _restore(self, y):
        return np.transpose(y, (0, 3, 1, 2)) if self.channels_first else y

    def train(self, x):
        y = conv2d(self._nhwc(x), self.transformed_kernel(), self.strides, self.padding,
                   self.dilation, self.groups)
        if self.bias is not None:
            y = y + self.bias
        return self._restore(y).astype(np.float32)

    def infer(self, x):
        return self.train(x)

    def kernel_gradient(self, x, dy):
        """dL/dW (raw kernel) of `sum(y * dy)`."""
        grad_hat = conv2d_kernel_gradient(self._nhwc(x), self._nhwc(dy), self.kernel.shape,
                                          self.strides, self.padding, self.dilation,
                                          self.groups)
        if self.transform == "standardize":
            return standardize_backward(self.kernel, self.eps, grad_hat)
        return center_backward(grad_hat)

    def bias_gradient(self, dy):
        return self._nhwc(dy).sum((0, 1, 2))

    def state(self):
        return {}
