"""NumPy reference of batch normalization (plain, masked, ghost batches, renorm).

Masks are in Keras's layout, as `keras.layers.BatchNormalization._moments` reads them: the
input's shape without its LAST axis (size-1 axes broadcast), expanded at -1 and broadcast to the
input, whichever axis holds the channels. With channels last a mask flags positions; with
`axis=1` on `(N, C, L)` an `(N, C)` mask flags (example, channel) pairs for all of `L`.
"""

import numpy as np


class BatchNormReference:
    """Ioffe & Szegedy's batch norm with the extensions of keras_norm.BatchNormalization.

    Args mirror the layer's; `weights` holds the layer's initial weights by name.
    """

    def __init__(self, weights, axis=-1, momentum=0.99, epsilon=1e-3, virtual_batch_size=None,
                 renorm=False, renorm_clipping=None, renorm_momentum=0.99,
                 inference_statistics="moving"):
        self.w = {k: np.array(v, dtype=np.float64) for k, v in weights.items()}
        self.axis, self.momentum, self.eps = axis, momentum, epsilon
        self.v, self.renorm = virtual_batch_size, renorm
        self.clip = renorm_clipping or {}
        self.renorm_momentum = renorm_momentum
        self.inference_statistics = inference_statistics

    # shapes ---------------------------------------------------------------------------
    def _channels_last(self, x):
        return np.moveaxis(np.asarray(x, np.float64), self.axis, -1)

    def _restore(self, y, like):
        return np.moveaxis(y, -1, self.axis).astype(np.float32)

    def _gamma_beta(self, c):
        return self.w.get("gamma", np.ones(c)), self.w.get("beta", np.zeros(c))

    def _element_mask(self, x, mask):
        """Keras's mask as one 0/1 flag per value, in the channels-last layout (or None)."""
        if mask is None:
            return None
        mask = np.asarray(mask, bool)
        x = np.asarray(x)
        assert mask.ndim == x.ndim - 1, (mask.shape, x.shape)
        full = np.broadcast_to(mask[..., None], x.shape)  # expand at -1, broadcast (Keras)
        return np.moveaxis(full, self.axis, -1).astype(np.float64)

    @staticmethod
    def _stats(x, m):
        """Per-channel mean, biased variance and count of a channels-last array over the other
        axes; `m` (None or 0/1 of `x`'s shape) selects the values. No value: 0, 0, 0."""
        flat = x.reshape(-1, x.shape[-1])
        if m is None:
            n = np.full(x.shape[-1], float(flat.shape[0]))
            return flat.mean(0), flat.var(0), n
        m = m.reshape(flat.shape)
        n = m.sum(0)
        mean = (flat * m).sum(0) / np.maximum(n, 1)
        var = (((flat - mean) ** 2) * m).sum(0) / np.maximum(n, 1)
        return mean, var, n

    # modes ----------------------------------------------------------------------------
    def _groups(self, batch):
        if self.v is None:
            return [slice(0, batch)]
        return [slice(s, min(s + self.v, batch)) for s in range(0, batch, self.v)]

    def _normalize_batch(self, x, mask, update):
        xl, ml = self._channels_last(x), self._element_mask(x, mask)
        gamma, beta = self._gamma_beta(xl.shape[-1])
        y = np.empty_like(xl)
        means, variances, counts = [], [], []
        for g in self._groups(xl.shape[0]):
            mean, var, n = self._stats(xl[g], None if ml is None else ml[g])
            xhat = (xl[g] - mean) / np.sqrt(var + self.eps)
            if self.renorm and update:
                r, d = self._renorm_correction(mean, var)
                xhat = xhat * r + d
            y[g] = gamma * xhat + beta
            means.append(mean), variances.append(var), counts.append(n)
        if update and np.sum(counts) > 0:
            # Count-weighted over the ghost batches, per channel (a mask may flag channels).
            counts = np.asarray(counts, np.float64)
            total = np.maximum(counts.sum(0), 1)
            mean = (counts * np.asarray(means)).sum(0) / total
            var = (counts * np.asarray(variances)).sum(0) / total
            self._update(mean, var)
        return self._restore(y, x)

    def _renorm_correction(self, mean, var):
        """Batch Renormalization's clipped `(r, d)` against the current renorm statistics."""
        sigma = np.maximum(self.w["renorm_stddev"], np.sqrt(self.eps))
        r = np.sqrt(var + self.eps) / sigma
        d = (mean - self.w["renorm_mean"]) / sigma
        r = np.clip(r, self.clip.get("rmin", -np.inf), self.clip.get("rmax", np.inf))
        dmax = self.clip.get("dmax", np.inf)
        return r, np.clip(d, -dmax, dmax)

    def _update(self, mean, var):
        mo = self.momentum
        if not self.renorm:
            self.w["moving_mean"] = mo * self.w["moving_mean"] + (1 - mo) * mean
            self.w["moving_variance"] = mo * self.w["moving_variance"] + (1 - mo) * var
            return
        std, rmo = np.sqrt(var + self.eps), self.renorm_momentum
        self.w["renorm_mean"] = rmo * self.w["renorm_mean"] + (1 - rmo) * mean
        self.w["renorm_stddev"] = rmo * self.w["renorm_stddev"] + (1 - rmo) * std
        self.w["moving_mean"] = mo * self.w["moving_mean"] + (1 - mo) * mean
        self.w["moving_stddev"] = mo * self.w["moving_stddev"] + (1 - mo) * std
        self.w["moving_variance"] = np.maximum(self.w["moving_stddev"] ** 2 - self.eps, 0)

    def train(self, x, mask=None):
        return self._normalize_batch(x, mask, update=True)

    def infer(self, x, mask=None):
        if self.inference_statistics == "batch":
            return self._normalize_batch(x, mask, update=False)
        xl = self._channels_last(x)
        gamma, beta = self._gamma_beta(xl.shape[-1])
        y = gamma * (xl - self.w["moving_mean"]) / np.sqrt(self.w["moving_variance"] + self.eps)
        return self._restore(y + beta, x)

    def input_gradient(self, x, dy, mask=None):
        """Gradient of sum(y * dy) w.r.t. x for plain/ghost BN in training mode (closed form).

        With a mask `m` (n valid values per channel), every output depends on the valid
        values' statistics: `dx = inv (g - m sum(g) / n - m x_hat sum(g x_hat) / n)`, sums
        over all values, masked ones included (they are normalized too)."""
        xl, dyl = self._channels_last(x), self._channels_last(dy)
        ml = self._element_mask(x, mask)
        gamma, _ = self._gamma_beta(xl.shape[-1])
        dx = np.empty_like(xl)
        for g in self._groups(xl.shape[0]):
            xg, dg = xl[g].reshape(-1, xl.shape[-1]), dyl[g].reshape(-1, xl.shape[-1]) * gamma
            mg = np.ones_like(xg) if ml is None else ml[g].reshape(xg.shape)
            mean, var, n = self._stats(xg, mg)
            n = np.maximum(n, 1)
            if self.renorm:  # r is a constant (stop_gradient) scale on x_hat
                dg = dg * self._renorm_correction(mean, var)[0]
            inv = 1 / np.sqrt(var + self.eps)
            xhat = (xg - mean) * inv
            d = inv * (dg - mg * dg.sum(0) / n - mg * xhat * (dg * xhat).sum(0) / n)
            dx[g] = d.reshape(xl[g].shape)
        return self._restore(dx, x)

    def weight_gradients(self, x, dy, mask=None):
        """Gradients of sum(y * dy) w.r.t. gamma and beta in training mode:
        `sum dy * (x_hat r + d)` with renorm's constant `r`, `d` per (ghost) batch."""
        xl, dyl = self._channels_last(x), self._channels_last(dy)
        ml = self._element_mask(x, mask)
        corrected = np.empty_like(xl)
        for g in self._groups(xl.shape[0]):
            mean, var, _ = self._stats(xl[g], None if ml is None else ml[g])
            xhat = (xl[g] - mean) / np.sqrt(var + self.eps)
            if self.renorm:
                r, d = self._renorm_correction(mean, var)
                xhat = xhat * r + d
            corrected[g] = xhat
        axes = tuple(range(xl.ndim - 1))
        gradients = {"gamma": (dyl * corrected).sum(axes), "beta": dyl.sum(axes)}
        return {name: value for name, value in gradients.items() if name in self.w}

    def state(self):
        return {k: v for k, v in self.w.items() if k not in ("gamma", "beta")}
