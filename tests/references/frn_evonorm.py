"""NumPy references of FRN + TLU (Singh & Krishnan 2019) and EvoNorm-B0/S0 (Liu et al. 2020).

Float64, written from the papers' equations with explicit loops over examples, channels and
groups: nothing is shared with the layers' vectorised code.
"""

import numpy as np


class _ChannelReference:
    """Shared: weights by name, channels-last views, affine parameters."""

    def __init__(self, weights, axis=-1, epsilon=1e-5):
        self.w = {k: np.array(v, dtype=np.float64) for k, v in weights.items()}
        self.axis, self.eps = axis, epsilon

    def _channels_last(self, x):
        """`(N, spatial..., C)` float64 view, spatial flattened to one axis: `(N, S, C)`."""
        xl = np.moveaxis(np.asarray(x, np.float64), self.axis, -1)
        return xl.reshape(xl.shape[0], -1, xl.shape[-1]), xl.shape

    def _restore(self, y, shape):
        return np.moveaxis(y.reshape(shape), -1, self.axis).astype(np.float32)

    def _param(self, name, default, channels):
        return self.w.get(name, np.full(channels, default, np.float64))

    def _affine(self, y):
        c = y.shape[-1]
        return y * self._param("gamma", 1.0, c) + self._param("beta", 0.0, c)

    def infer(self, x):
        return self.train(x)

    def state(self):
        return {}


class FilterResponseNormReference(_ChannelReference):
    """`max(gamma * x / sqrt(mean_spatial(x^2) + eps) + beta, tau)` per example and channel."""

    def __init__(self, weights, axis=-1, epsilon=1e-6, learned_epsilon=False, use_tlu=True):
        super().__init__(weights, axis, epsilon)
        self.learned_epsilon, self.use_tlu = learned_epsilon, use_tlu

    def train(self, x):
        xl, shape = self._channels_last(x)
        eps = self.eps + (abs(self.w["learned_epsilon"][0]) if self.learned_epsilon else 0.0)
        y = np.empty_like(xl)
        for n in range(xl.shape[0]):
            for c in range(xl.shape[2]):
                values = xl[n, :, c]
                nu2 = np.mean(values ** 2)
                y[n, :, c] = values / np.sqrt(nu2 + eps)
        y = self._affine(y)
        if self.use_tlu:
            y = np.maximum(y, self.w["tau"])
        return self._restore(y, shape)

    def input_gradient(self, x, dy):
        """d sum(z * dy) / dx, written per (example, channel) from
        `z = max(gamma * x * (nu2 + eps)^(-1/2) + beta, tau)`, `nu2 = mean(x^2)`."""
        xl, shape = self._channels_last(x)
        dyl, _ = self._channels_last(dy)
        eps = self.eps + (abs(self.w["learned_epsilon"][0]) if self.learned_epsilon else 0.0)
        channels = xl.shape[2]
        gamma, beta = self._param("gamma", 1.0, channels), self._param("beta", 0.0, channels)
        dx = np.empty_like(xl)
        for n in range(xl.shape[0]):
            for c in range(channels):
                values, upstream = xl[n, :, c], dyl[n, :, c]
                inv = 1.0 / np.sqrt(np.mean(values ** 2) + eps)
                if self.use_tlu:  # the TLU passes the gradient where the affine output wins
                    upstream = upstream * (gamma[c] * values * inv + beta[c] >= self.w["tau"][c])
                g = upstream * gamma[c]
                dx[n, :, c] = inv * g - inv ** 3 * values * np.mean(g * values)
        return self._restore(dx, shape)


class EvoNormB0Reference(_ChannelReference):
    """`x / max(sqrt(var_batch + eps), v x + sqrt(var_instance + eps)) * gamma + beta`."""

    def __init__(self, weights, axis=-1, momentum=0.99, epsilon=1e-5,
                 inference_statistics="moving"):
        super().__init__(weights, axis, epsilon)
        self.momentum, self.inference_statistics = momentum, inference_statistics

    def _forward(self, x, batch_variance):
        xl, shape = self._channels_last(x)
        y = np.empty_like(xl)
        for c in range(xl.shape[2]):
            v = self.w["v"][c]
            for n in range(xl.shape[0]):
                values = xl[n, :, c]
                instance_std = np.sqrt(np.var(values) + self.eps)
                denominator = np.maximum(np.sqrt(batch_variance[c] + self.eps),
                                         v * values + instance_std)
                y[n, :, c] = values / denominator
        return self._restore(self._affine(y), shape)

    def _batch_variance(self, x):
        xl, _ = self._channels_last(x)
        return np.array([np.var(xl[:, :, c]) for c in range(xl.shape[2])])

    def train(self, x):
        variance = self._batch_variance(x)
        y = self._forward(x, variance)
        mo = self.momentum
        self.w["moving_variance"] = mo * self.w["moving_variance"] + (1 - mo) * variance
        return y

    def infer(self, x):
        if self.inference_statistics == "batch":
            return self._forward(x, self._batch_variance(x))
        return self._forward(x, self.w["moving_variance"])

    def state(self):
        return {"moving_variance": self.w["moving_variance"]}


class EvoNormS0Reference(_ChannelReference):
    """`x * sigmoid(v x) / sqrt(var_group + eps) * gamma + beta`, groups of channels."""

    def __init__(self, weights, groups=32, axis=-1, epsilon=1e-5):
        super().__init__(weights, axis, epsilon)
        self.groups = groups

    def train(self, x):
        xl, shape = self._channels_last(x)
        channels = xl.shape[2]
        size = channels // self.groups
        y = np.empty_like(xl)
        for n in range(xl.shape[0]):
            for g in range(self.groups):
                members = slice(g * size, (g + 1) * size)
                std = np.sqrt(np.var(xl[n, :, members]) + self.eps)
                for c in range(g * size, (g + 1) * size):
                    values = xl[n, :, c]
                    swish = values / (1.0 + np.exp(-self.w["v"][c] * values))
                    y[n, :, c] = swish / std
        return self._restore(self._affine(y), shape)

    def input_gradient(self, x, dy):
        """d sum(y * dy) / dx per (example, group), from `y = h r gamma + beta` with
        `h = x sigmoid(v x)` and `r = (var + eps)^(-1/2)` over the group's values."""
        xl, shape = self._channels_last(x)
        dyl, _ = self._channels_last(dy)
        channels = xl.shape[2]
        size = channels // self.groups
        gamma = self._param("gamma", 1.0, channels)
        dx = np.empty_like(xl)
        for n in range(xl.shape[0]):
            for g in range(self.groups):
                members = slice(g * size, (g + 1) * size)
                values = xl[n, :, members]
                mean, count = values.mean(), values.size
                r = 1.0 / np.sqrt(values.var() + self.eps)
                d_r = 0.0
                for c in range(g * size, (g + 1) * size):
                    column, v = xl[n, :, c], self.w["v"][c]
                    s = 1.0 / (1.0 + np.exp(-v * column))
                    d_r += np.sum(dyl[n, :, c] * gamma[c] * column * s)
                    # Through the numerator h = x s(v x).
                    dx[n, :, c] = dyl[n, :, c] * gamma[c] * r * (s + v * column * s * (1 - s))
                # Through r: dr/dvar = -r^3 / 2, dvar/dx = 2 (x - mean) / count.
                dx[n, :, members] += d_r * (-0.5 * r ** 3) * 2.0 * (values - mean) / count
        return self._restore(dx, shape)
