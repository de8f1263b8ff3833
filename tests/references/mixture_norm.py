"""NumPy reference of mixture normalization (Kalayeh & Shah 2018; docs/algorithms.md section 7).

Written from the equations, in float64, with explicit loops over components: Gaussian log
densities summed over channels, log-sum-exp posteriors, two-pass weighted M-steps. It shares
no code and no algebraic shortcut (shifted sums, matrix-product quadratic forms) with the layer.
"""

import math
import statistics

import numpy as np


def quantile_centres(k):
    """E[Z | Z in bin j] for K equiprobable bins of N(0, 1), from the bin edges' densities."""
    normal = statistics.NormalDist()
    edges = [-math.inf] + [normal.inv_cdf(j / k) for j in range(1, k)] + [math.inf]
    pdf = [0.0 if math.isinf(a) else normal.pdf(a) for a in edges]
    return np.array([k * (pdf[j] - pdf[j + 1]) for j in range(k)])


def log_sum_exp(a, axis):
    top = np.max(a, axis=axis, keepdims=True)
    return top + np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True))


class MixtureNormReference:
    """The layer's algorithm, restated. Args mirror `MixtureNormalization`'s."""

    def __init__(self, weights, num_components=3, axis=-1, mixture_axes="channels",
                 em_iterations=2, momentum=0.99, epsilon=1e-3, fisher_scaling=True,
                 warm_start="aligned", min_weight=1e-3, inference_statistics="moving",
                 posterior_gradient=False):
        self.w = {k: np.array(v, dtype=np.float64) for k, v in weights.items()}
        self.k, self.axis = num_components, axis
        self.per_channel = mixture_axes == "per_channel"
        self.iterations, self.momentum, self.eps = em_iterations, momentum, epsilon
        self.fisher, self.warm, self.floor = fisher_scaling, warm_start, min_weight
        self.inference_statistics = inference_statistics
        self.posterior_gradient = posterior_gradient

    # shapes ---------------------------------------------------------------------------
    def _samples(self, x):
        xl = np.moveaxis(np.asarray(x, np.float64), self.axis, -1)
        return xl.reshape(-1, xl.shape[-1]), xl.shape

    def _restore(self, y, shape):
        return np.moveaxis(y.reshape(shape), -1, self.axis).astype(np.float32)

    def _weights_kc(self, lam, c):
        """Mixture weights as (K, C) (the same weight for every channel when not per channel)."""
        lam = np.asarray(lam, np.float64)
        return lam if lam.ndim == 2 else np.repeat(lam[:, None], c, axis=1)

    # mixture --------------------------------------------------------------------------
    def _posteriors(self, x, lam, mean, var):
        """tau (N, K, C): identical across C when one mixture spans the channel vector."""
        n, c = x.shape
        log_p = np.zeros((n, self.k, c))
        for k in range(self.k):
            v = var[k] + self.eps
            log_p[:, k, :] = -0.5 * (np.log(2 * np.pi * v) + (x - mean[k]) ** 2 / v)
        lam_kc = np.maximum(self._weights_kc(lam, c), self.floor)
        if self.per_channel:
            logits = np.log(lam_kc)[None] + log_p
        else:
            logits = np.log(lam_kc[:, :1].T) + log_p.sum(axis=2)  # (N, K)
            logits = np.repeat(logits[:, :, None], c, axis=2)
        return np.exp(logits - log_sum_exp(logits, axis=1))

    def _m_step(self, x, tau, valid, lam, mean, var):
        n_valid = valid.sum(axis=0)  # per channel: (C,)
        new_lam = np.zeros_like(np.asarray(lam))
        new_mean, new_var = mean.copy(), var.copy()
        for k in range(self.k):
            t = tau[:, k, :] * valid  # (N, C)
            s0 = t.sum(axis=0)
            lam_k = np.where(n_valid > 0, s0 / np.maximum(n_valid, 1), 0.0)
            new_lam[k] = lam_k if self.per_channel else lam_k[0]
            full = lam_k >= self.floor
            safe = np.where(full, s0, 1.0)
            mu = (t * x).sum(axis=0) / safe
            sq = (t * (x - mu) ** 2).sum(axis=0) / safe
            new_mean[k] = np.where(full, mu, mean[k])
            new_var[k] = np.where(full, sq, var[k])
        return new_lam, new_mean, new_var

    def _initial(self, x, valid):
        """Seed at the first step, the (aligned) moving mixture afterwards."""
        c = x.shape[1]
        # Per channel: the channel's valid values (a mask in Keras's layout may flag channels).
        m, v = np.zeros(c), np.zeros(c)
        for channel in range(c):
            values = x[valid[:, channel] > 0, channel]
            if len(values):
                m[channel], v[channel] = values.mean(), values.var()
        # One mixture over the channel vector: the mask flags whole samples.
        xv = x[valid[:, 0] > 0]
        n_valid = len(xv)
        if self.w["num_updates"] == 0:
            q = quantile_centres(self.k)[:, None]
            spread = np.sqrt(v + self.eps)
            lam_shape = (self.k, c) if self.per_channel else (self.k,)
            lam = np.full(lam_shape, 1.0 / self.k)
            if self.per_channel:
                mean = m + q * spread
            else:  # split along the principal axis of the standardized samples
                z = (xv - m) / spread
                correlation = z.T @ z / n_valid if n_valid else np.zeros((c, c))
                values, vectors = np.linalg.eigh(correlation)
                direction = vectors[:, -1]
                if direction @ np.arange(1, c + 1) < 0:
                    direction = -direction
                mean = m + q * np.sqrt(max(values[-1], 0.0)) * direction * spread
            return lam, mean, np.repeat(v[None], self.k, axis=0)
        lam = self.w["moving_weights"]
        mean, var = self.w["moving_mean"], self.w["moving_variance"]
        if self.warm == "moving":
            return lam.copy(), mean.copy(), var.copy()
        lam_kc = self._weights_kc(lam, c)
        lam_kc = lam_kc / lam_kc.sum(axis=0)
        centre = (lam_kc * mean).sum(axis=0)
        pooled = (lam_kc * (var + (mean - centre) ** 2)).sum(axis=0)
        ratio = (v + self.eps) / (pooled + self.eps)
        return lam.copy(), m + (mean - centre) * np.sqrt(ratio), var * ratio

    def _fit(self, x, valid, initial=None, with_m_step_posteriors=False):
        """`(lam, mean, var, tau)`: the fitted mixture and the posteriors under it.

        With `with_m_step_posteriors`, also the posteriors the last M-step weighted by.
        """
        lam, mean, var = self._initial(x, valid) if initial is None else initial
        if self.k == 1:
            tau = np.ones((len(x), 1, x.shape[1]))
            lam, mean, var = self._m_step(x, tau, valid, lam, mean, var)
            return (lam, mean, var, tau) + ((tau,) if with_m_step_posteriors else ())
        for _ in range(self.iterations):
            m_tau = self._posteriors(x, lam, mean, var)
            lam, mean, var = self._m_step(x, m_tau, valid, lam, mean, var)
        tau = self._posteriors(x, lam, mean, var)
        return (lam, mean, var, tau) + ((m_tau,) if with_m_step_posteriors else ())

    def _output(self, x, lam, mean, var, tau):
        c = x.shape[1]
        gamma, beta = self.w.get("gamma", np.ones(c)), self.w.get("beta", np.zeros(c))
        lam_kc = np.maximum(self._weights_kc(lam, c), self.floor)
        y = np.zeros_like(x)
        for k in range(self.k):
            weight = tau[:, k, :] / (np.sqrt(lam_kc[k]) if self.fisher else 1.0)
            y += weight * (x - mean[k]) / np.sqrt(var[k] + self.eps)
        return gamma * y + beta

    # modes ----------------------------------------------------------------------------
    def _valid(self, x, mask):
        """`(N, C)` flags in the samples' layout. Keras's layout: the mask has the input's shape
        without its last axis and is broadcast over the last one, whatever the channel axis."""
        x = np.asarray(x)
        if mask is None:
            return np.ones(self._samples(x)[0].shape)
        mask = np.asarray(mask, bool)
        assert mask.ndim == x.ndim - 1, (mask.shape, x.shape)
        return self._samples(np.broadcast_to(mask[..., None], x.shape))[0]

    def train(self, x, mask=None):
        xs, shape = self._samples(x)
        valid = self._valid(x, mask)
        lam, mean, var, tau = self._fit(xs, valid)
        if valid.sum() > 0:
            mo = 0.0 if (self.w["num_updates"] == 0 and self.k > 1) else self.momentum
            for name, value in (("moving_weights", lam), ("moving_mean", mean),
                                ("moving_variance", var)):
                self.w[name] = mo * self.w[name] + (1 - mo) * value
            self.w["num_updates"] = self.w["num_updates"] + 1
        return self._restore(self._output(xs, lam, mean, var, tau), shape)

    def infer(self, x, mask=None):
        xs, shape = self._samples(x)
        if self.inference_statistics == "batch":
            lam, mean, var, tau = self._fit(xs, self._valid(x, mask))
        else:
            lam, mean = self.w["moving_weights"], self.w["moving_mean"]
            var = self.w["moving_variance"]
            tau = (np.ones((len(xs), 1, xs.shape[1])) if self.k == 1
                   else self._posteriors(xs, lam, mean, var))
        return self._restore(self._output(xs, lam, mean, var, tau), shape)

    # gradients ------------------------------------------------------------------------
    def input_gradient(self, x, dy):
        """d sum(y * dy) / dx in training mode, without advancing the state.

        Posteriors constant (default): the closed form of a posterior-weighted BN per
        component, `dx_i = sum_k inv_k [w_ik g_i - r_ik/S_k sum_j w_jk g_j
        - r_ik/S_k inv_k^2 (x_i - mu_k) sum_j w_jk g_j (x_j - mu_k)]` with `g = gamma dy`,
        `w` the output's weights (final posteriors over sqrt(lambda)), `r` the posteriors the
        last M-step weighted by and `S_k = sum_i r_ik`.
        With `posterior_gradient=True`: central finite differences of the float64 forward
        pass, holding the initial mixture (a constant in the layer) fixed.
        """
        xs, shape = self._samples(x)
        g, _ = self._samples(dy)
        if self.posterior_gradient:
            return self._finite_difference(xs, g, shape)
        c = xs.shape[1]
        valid = np.ones(xs.shape)
        lam, mean, var, tau, m_tau = self._fit(xs, valid, with_m_step_posteriors=True)
        gamma = self.w.get("gamma", np.ones(c))
        g = g * gamma
        lam_kc = np.maximum(self._weights_kc(lam, c), self.floor)
        dx = np.zeros_like(xs)
        for k in range(self.k):
            w = tau[:, k, :] / (np.sqrt(lam_kc[k]) if self.fisher else 1.0)
            t = m_tau[:, k, :]
            s0 = t.sum(axis=0)
            inv = 1.0 / np.sqrt(var[k] + self.eps)
            centred = xs - mean[k]
            dx += inv * (w * g - t / s0 * (w * g).sum(axis=0)
                         - t / s0 * inv ** 2 * centred * (w * g * centred).sum(axis=0))
        return self._restore(dx, shape)

    def _finite_difference(self, xs, g, shape, h=1e-5):
        valid = np.ones(xs.shape)
        initial = self._initial(xs, valid)

        def loss(values):
            lam, mean, var, tau = self._fit(values, valid, initial)
            return (self._output(values, lam, mean, var, tau) * g).sum()

        dx = np.zeros_like(xs)
        for index in np.ndindex(*xs.shape):
            up, down = xs.copy(), xs.copy()
            up[index] += h
            down[index] -= h
            dx[index] = (loss(up) - loss(down)) / (2 * h)
        return self._restore(dx, shape)

    def state(self):
        return {k: v for k, v in self.w.items() if k not in ("gamma", "beta")}
