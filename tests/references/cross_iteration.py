"""NumPy reference of Cross-Iteration Batch Normalization (Yao et al. 2020), float64.

Written from the paper's equations, with the official code's choices (drop a stored iteration
whose compensated variance is negative, gradients only through the current iteration), in the
paper's own variables: per channel `mu = E[z]`, `nu = E[z^2]` and their kernel derivatives
`dmu/dW = E[patch]`, `dnu/dW = 2 E[z * patch]`, computed from explicit input patches (im2col)
with Python loops. `z` is the wrapped layer's product without its bias; the layer adds the
current bias to the pooled mean (the bias cancels in training), and the moving mean tracks
`E[z] + bias` as BN after a biased convolution does.

`state()` converts to the layer's stored (centred) form: `window_variance = nu - mu^2`,
`window_variance_gradient = dnu/dW - 2 mu dmu/dW`, `window_mean_gradient = E[patch]` with the
kernel's shape minus its output axis.
"""

import itertools

import numpy as np


def _activation(name):
    if name in (None, "linear"):
        return (lambda v: v), (lambda v: np.ones_like(v))
    if name == "relu":
        return (lambda v: np.maximum(v, 0.0)), (lambda v: (v > 0).astype(np.float64))
    raise ValueError(f"reference has no activation {name!r}")


class Patches:
    """im2col for an N-d convolution (channels last) with TF's padding rules, and its adjoint.

    `conv=None` is a Dense layer: the patch is the input's last axis itself.
    """

    def __init__(self, kernel_shape, conv=None):
        self.conv = conv
        self.ksize = tuple(kernel_shape[:-2]) if conv is not None else ()

    def _geometry(self, spatial):
        rank = len(self.ksize)
        strides = self.conv.get("strides", (1,) * rank)
        dilation = self.conv.get("dilation_rate", (1,) * rank)
        padding = self.conv.get("padding", "valid")
        pads, outs = [], []
        for size, k, s, d in zip(spatial, self.ksize, strides, dilation):
            span = (k - 1) * d + 1
            if padding == "same":
                out = -(-size // s)
                total = max((out - 1) * s + span - size, 0)
                pads.append((total // 2, total - total // 2))
            elif padding == "causal":
                pads.append((span - 1, 0))
                out = (size + span - 1 - span) // s + 1
            else:
                pads.append((0, 0))
                out = (size - span) // s + 1
            outs.append(out)
        return pads, outs, strides, dilation

    def _slices(self, offset, outs, strides, dilation):
        return tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                     for o, n, s, d in zip(offset, outs, strides, dilation))

    def extract(self, x):
        """`(..., K)` patches of channels-last `x`, K = prod(kernel_size) * channels_in."""
        if self.conv is None:
            return x
        n, spatial, cin = x.shape[0], x.shape[1:-1], x.shape[-1]
        pads, outs, strides, dilation = self._geometry(spatial)
        xp = np.pad(x, [(0, 0)] + pads + [(0, 0)])
        rank = len(self.ksize)
        patches = np.zeros((n, *outs, *self.ksize, cin))
        for offset in itertools.product(*[range(k) for k in self.ksize]):
            index = (slice(None),) * (1 + rank) + offset
            patches[index] = xp[(slice(None),) + self._slices(offset, outs, strides, dilation)]
        return patches.reshape(n, *outs, -1)

    def adjoint(self, dpatches, x_shape):
        """Gradient with respect to `x` of `sum(patches(x) * dpatches)`."""
        if self.conv is None:
            return dpatches
        n, spatial, cin = x_shape[0], x_shape[1:-1], x_shape[-1]
        pads, outs, strides, dilation = self._geometry(spatial)
        rank = len(self.ksize)
        dpatches = dpatches.reshape(n, *outs, *self.ksize, cin)
        dxp = np.zeros([n] + [s + a + b for s, (a, b) in zip(spatial, pads)] + [cin])
        for offset in itertools.product(*[range(k) for k in self.ksize]):
            index = (slice(None),) * (1 + rank) + offset
            dxp[(slice(None),) + self._slices(offset, outs, strides, dilation)] += \
                dpatches[index]
        crop = tuple(slice(a, a + s) for s, (a, _) in zip(spatial, pads))
        return dxp[(slice(None),) + crop]


class CrossIterationReference:
    """CBN on top of a Dense (`conv=None`) or convolution (`conv` = its geometry) layer.

    Args:
        weights: The layer's initial weights by name (`kernel`, optional `bias`, `gamma`,
            `beta`, `moving_mean`, `moving_variance`; window state is taken as empty).
        conv: None for Dense, else a dict with `strides`, `padding` ("valid", "same",
            "causal"), `dilation_rate`, `data_format`.
        activation: "linear" or "relu".
        window_size, burn_in_steps, momentum, epsilon, inference_statistics: as the layer.
    """

    def __init__(self, weights, conv=None, activation="linear", window_size=4, burn_in_steps=0,
                 momentum=0.99, epsilon=1e-3, inference_statistics="moving"):
        self.w = {k: np.array(v, np.float64) for k, v in weights.items()}
        self.kernel_shape = self.w["kernel"].shape
        self.channels = self.kernel_shape[-1]
        self.conv = conv
        self.channels_first = conv is not None and conv.get("data_format") == "channels_first"
        self.patches = Patches(self.kernel_shape, conv)
        self.act, self.act_grad = _activation(activation)
        self.k, self.burn_in = window_size, burn_in_steps
        self.momentum, self.eps = momentum, epsilon
        self.inference_statistics = inference_statistics
        self.step = 0
        self.past = []  # newest first: dicts mu, nu, dmu (K,), dnu (K, C), kernel (K, C)
        self.dropped = 0  # stored iterations dropped for a negative compensated variance

    # --------------------------------------------------------------------------- helpers
    def set_kernel(self, kernel):
        """Mirrors an optimizer (or a test) changing the wrapped layer's kernel."""
        self.w["kernel"] = np.array(kernel, np.float64)

    def _to_last(self, x):
        x = np.asarray(x, np.float64)
        return np.moveaxis(x, 1, -1) if self.channels_first else x

    def _from_last(self, y):
        return np.moveaxis(y, -1, 1) if self.channels_first else y

    def _forward(self, x, mask):
        """Flattened patches `(P, K)`, products `z` `(P, C)` and weights `(P,)` (mask)."""
        patches = self.patches.extract(self._to_last(x))
        out_shape = patches.shape[:-1]
        flat = patches.reshape(-1, patches.shape[-1])
        z = flat @ self.w["kernel"].reshape(-1, self.channels)
        weight = np.ones(len(flat)) if mask is None else np.asarray(mask, np.float64).ravel()
        return flat, z, weight, out_shape

    def _bias(self):
        return self.w.get("bias", np.zeros(self.channels))

    def _current(self, flat, z, weight):
        """The paper's per-iteration statistics and kernel derivatives of the current batch."""
        m = weight.sum()
        mu = (weight[:, None] * z).sum(0) / m
        nu = (weight[:, None] * z ** 2).sum(0) / m
        dmu = (weight[:, None] * flat).sum(0) / m                      # (K,): same for all c
        dnu = 2.0 * (weight[:, None] * flat).T @ z / m                 # (K, C)
        return dict(mu=mu, nu=nu, dmu=dmu, dnu=dnu, kernel=self.w["kernel"].reshape(
            -1, self.channels).copy()), m

    def _pooled(self, current):
        """Compensate every stored iteration to the current kernel; drop negative variances."""
        mus, nus = [current["mu"]], [current["nu"]]
        keep = [np.ones(self.channels, bool)]
        if self.k > 1 and self.step >= self.burn_in:
            w_now = self.w["kernel"].reshape(-1, self.channels)
            for past in self.past:
                delta = w_now - past["kernel"]
                mu = past["mu"] + (past["dmu"][:, None] * delta).sum(0)
                nu = past["nu"] + (past["dnu"] * delta).sum(0)
                ok = nu - mu ** 2 >= 0
                self.dropped += int((~ok).sum())
                mus.append(mu), nus.append(nu), keep.append(ok)
        mus, nus, keep = np.array(mus), np.array(nus), np.array(keep)
        n = keep.sum(0)
        mu_bar = np.where(keep, mus, 0).sum(0) / n
        nu_bar = np.where(keep, np.maximum(nus, mus ** 2), 0).sum(0) / n
        return mu_bar, nu_bar - mu_bar ** 2, n

    # ----------------------------------------------------------------------------- modes
    def train(self, x, mask=None):
        flat, z, weight, out_shape = self._forward(x, mask)
        current, _ = self._current(flat, z, weight)
        mu_bar, var_bar, _ = self._pooled(current)
        pre = self._normalize(z, mu_bar, var_bar)
        # Moving statistics of the current batch; then push it into the window.
        mo, var = self.momentum, current["nu"] - current["mu"] ** 2
        batch_mean = current["mu"] + self._bias()
        self.w["moving_mean"] = mo * self.w["moving_mean"] + (1 - mo) * batch_mean
        self.w["moving_variance"] = mo * self.w["moving_variance"] + (1 - mo) * var
        if self.k > 1:
            self.past = [current] + self.past[: self.k - 2]
            self.step += 1
        return self._output(pre, out_shape)

    def infer(self, x, mask=None):
        flat, z, weight, out_shape = self._forward(x, mask)
        if self.inference_statistics == "batch":
            current, _ = self._current(flat, z, weight)
            mean, var = current["mu"], current["nu"] - current["mu"] ** 2
        else:
            mean = self.w["moving_mean"] - self._bias()
            var = self.w["moving_variance"]
        return self._output(self._normalize(z, mean, var), out_shape)

    def _normalize(self, z, mean, var):
        gamma = self.w.get("gamma", np.ones(self.channels))
        beta = self.w.get("beta", np.zeros(self.channels))
        return gamma * (z - mean) / np.sqrt(var + self.eps) + beta

    def _output(self, pre, out_shape):
        y = self.act(pre).reshape(*out_shape, self.channels)
        return self._from_last(y).astype(np.float32)

    # ------------------------------------------------------------------------- gradients
    def _product_gradient(self, x, dy, mask):
        """`dL/dz` `(P, C)` of `L = sum(y * dy)` in training mode, and the patches."""
        flat, z, weight, _ = self._forward(x, mask)
        current, m = self._current(flat, z, weight)
        saved = self.dropped
        mu_bar, var_bar, n = self._pooled(current)
        self.dropped = saved
        gamma = self.w.get("gamma", np.ones(self.channels))
        s = 1.0 / np.sqrt(var_bar + self.eps)
        pre = self._normalize(z, mu_bar, var_bar)
        dyl = self._to_last(dy).reshape(-1, self.channels)
        g = dyl * self.act_grad(pre) * gamma
        centred = z - mu_bar
        # mu_bar = (mu_0 + const) / n and var_bar = (nu_0 + const) / n - mu_bar^2, with
        # mu_0 = sum(w z) / m and nu_0 = sum(w z^2) / m: the stored iterations are constants.
        # Every position is normalized (masked ones too), only weighted ones enter mu_0, nu_0.
        through_stats = (s / (n * m) * g.sum(0)
                         + s ** 3 / (n * m) * centred * (g * centred).sum(0))
        return flat, s * g - weight[:, None] * through_stats

    def input_gradient(self, x, dy, mask=None):
        """Gradient of `sum(y * dy)` with respect to `x` (training mode, state unchanged)."""
        flat, dz = self._product_gradient(x, dy, mask)
        dpatches = dz @ self.w["kernel"].reshape(-1, self.channels).T
        xl = self._to_last(x)
        dx = self.patches.adjoint(dpatches, xl.shape).reshape(xl.shape)
        return self._from_last(dx).astype(np.float32)

    def kernel_gradient(self, x, dy, mask=None):
        """Gradient of `sum(y * dy)` with respect to the kernel (none through the window)."""
        flat, dz = self._product_gradient(x, dy, mask)
        return (flat.T @ dz).reshape(self.kernel_shape)

    # ----------------------------------------------------------------------------- state
    def state(self):
        state = {k: v for k, v in self.w.items()
                 if k in ("moving_mean", "moving_variance", "kernel")}
        if self.k == 1:
            return state
        stored, c = self.k - 1, self.channels
        kshape = self.kernel_shape
        mean = np.zeros((stored, c))
        variance = np.zeros((stored, c))
        dmean = np.zeros((stored,) + kshape[:-1])
        dvar = np.zeros((stored,) + kshape)
        kernels = np.zeros((stored,) + kshape)
        for i, past in enumerate(self.past):
            mean[i] = past["mu"]
            variance[i] = past["nu"] - past["mu"] ** 2
            dmean[i] = past["dmu"].reshape(kshape[:-1])
            dvar[i] = (past["dnu"] - 2 * past["mu"] * past["dmu"][:, None]).reshape(kshape)
            kernels[i] = past["kernel"].reshape(kshape)
        state.update(window_mean=mean, window_variance=variance, window_mean_gradient=dmean,
                     window_variance_gradient=dvar, window_kernel=kernels,
                     step=np.array(self.step), window_count=np.array(len(self.past)))
        return state
