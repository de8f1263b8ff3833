"""NumPy references of layer, group, instance and RMS normalization (per-example statistics).

Written from the papers' equations in float64, one normalization set at a time (loops over
examples and groups), independently of the layers' reshapes. None of these layers depends on the
batch: `train` and `infer` are the same function and `state()` is empty.

Masks follow Keras's layout (as `keras.layers.BatchNormalization` reads it): a mask of rank
`ndim - 1` is the input's shape without its LAST axis and a shorter one a prefix of the input's
shape; either covers the leading axes and is broadcast over the rest, whichever axis holds the
channels (so with channels first it flags channels). Masked values leave the statistics, and a
set with no valid value uses all of its values.
"""

import numpy as np


def expand_mask(mask, ndim):
    """The mask as a boolean array of rank `ndim`: size-1 trailing axes (NumPy would broadcast
    a lower-rank array against the trailing axes instead, hence the explicit reshape)."""
    mask = np.asarray(mask, bool)
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def set_statistics(values, valid=None):
    """Mean and biased variance of a 1-D set; valid-only, or all values if none is valid."""
    if valid is not None and valid.any():
        values = values[valid]
    return values.mean(), values.var()


class _PerExample:
    def train(self, x, mask=None):
        return self.apply(x, mask)

    def infer(self, x, mask=None):
        return self.apply(x, mask)

    def state(self):
        return {}


class _FeatureSets(_PerExample):
    """Layer and RMS norm: one set per position of the axes that are not normalized."""

    def __init__(self, weights, axis, epsilon):
        self.w = {k: np.array(v, np.float64) for k, v in weights.items()}
        self.axis = list(axis) if isinstance(axis, (list, tuple)) else [axis]
        self.eps = epsilon

    def _sets(self, x, mask=None):
        """`(rows, valid, axes)`: x as (positions, features), normalized axes moved last."""
        x = np.asarray(x, np.float64)
        ndim = x.ndim
        axes = sorted(a % ndim for a in self.axis)
        last = list(range(ndim - len(axes), ndim))
        moved = np.moveaxis(x, axes, last)
        features = int(np.prod([x.shape[a] for a in axes]))
        rows = moved.reshape(-1, features)
        valid = None
        if mask is not None:
            full = np.broadcast_to(expand_mask(mask, ndim), x.shape)
            valid = np.moveaxis(full, axes, last).reshape(-1, features)
        return rows, valid, axes, last, moved.shape

    def _restore(self, rows, x, axes, last, moved_shape):
        return np.moveaxis(rows.reshape(moved_shape), last, axes).astype(np.float32)

    def apply(self, x, mask=None):
        rows, valid, axes, last, moved_shape = self._sets(x, mask)
        out = np.empty_like(rows)
        for i, row in enumerate(rows):
            out[i] = self._normalize_row(row, None if valid is None else valid[i])
        out = out * self._param("gamma", 1.0) + self._param("beta", 0.0)
        return self._restore(out, x, axes, last, moved_shape)

    def _param(self, name, default):
        return self.w[name].ravel() if name in self.w else default

    def input_gradient(self, x, dy):
        rows, _, axes, last, moved_shape = self._sets(x)
        grads, _, _, _, _ = self._sets(dy)
        grads = grads * self._param("gamma", 1.0)
        dx = np.stack([self._row_gradient(r, g) for r, g in zip(rows, grads)])
        return self._restore(dx, x, axes, last, moved_shape)


class LayerNormReference(_FeatureSets):
    """Ba et al.: `gamma * (x - mean) / sqrt(var + eps) + beta` over the feature axes.

    With `rms_scaling` (Keras's deprecated option): `gamma * x / sqrt(var + eps)`, no beta.
    """

    def __init__(self, weights, axis=-1, epsilon=1e-3, rms_scaling=False):
        super().__init__(weights, axis, epsilon)
        self.rms_scaling = rms_scaling

    def _normalize_row(self, row, valid):
        mean, var = set_statistics(row, valid)
        if self.rms_scaling:
            return row / np.sqrt(var + self.eps)
        return (row - mean) / np.sqrt(var + self.eps)

    def _row_gradient(self, row, g):
        """d/dx of sum(g * x_hat) for one set (closed form)."""
        mean, var = row.mean(), row.var()
        inv = 1.0 / np.sqrt(var + self.eps)
        if self.rms_scaling:  # y = x * inv: inv depends on x through var
            return inv * g - inv ** 3 * (row - mean) * np.mean(g * row)
        xhat = (row - mean) * inv
        return inv * (g - g.mean() - xhat * np.mean(g * xhat))


class RMSNormReference(_FeatureSets):
    """Zhang & Sennrich: `scale * x / sqrt(mean(x^2) + eps)` over the feature axes."""

    def __init__(self, weights, axis=-1, epsilon=1e-6):
        weights = dict(weights)
        weights["gamma"] = weights.pop("scale")
        super().__init__(weights, axis, epsilon)

    def _normalize_row(self, row, valid):
        values = row[valid] if valid is not None and valid.any() else row
        return row / np.sqrt(np.mean(values ** 2) + self.eps)

    def _row_gradient(self, row, g):
        inv = 1.0 / np.sqrt(np.mean(row ** 2) + self.eps)
        return inv * g - inv ** 3 * row * np.mean(g * row)


class GroupNormReference(_PerExample):
    """Wu & He: per example and group of consecutive channels, moments over the spatial axes
    and the group's channels; `gamma`, `beta` per channel. `groups=-1`: one per channel."""

    def __init__(self, weights, groups=32, axis=-1, epsilon=1e-3):
        self.w = {k: np.array(v, np.float64) for k, v in weights.items()}
        self.groups, self.axis, self.eps = groups, axis, epsilon

    def _layout(self, x):
        x = np.asarray(x, np.float64)
        xl = np.moveaxis(x, self.axis, -1)  # (B, spatial..., C)
        channels = xl.shape[-1]
        groups = channels if self.groups == -1 else self.groups
        return xl, channels, groups, channels // groups

    @staticmethod
    def _blocks(batch, groups, size):
        """`(example, channel slice)` of every set of values sharing statistics."""
        for b in range(batch):
            for g in range(groups):
                yield b, slice(g * size, (g + 1) * size)

    def apply(self, x, mask=None):
        xl, channels, groups, size = self._layout(x)
        valid = None
        if mask is not None:
            full = np.broadcast_to(expand_mask(mask, xl.ndim), np.shape(x))
            valid = np.moveaxis(full, self.axis, -1)
        gamma = self.w.get("gamma", np.ones(channels))
        beta = self.w.get("beta", np.zeros(channels))
        y = np.empty_like(xl)
        for b, group in self._blocks(xl.shape[0], groups, size):
            block = xl[b, ..., group]
            block_valid = None if valid is None else valid[b, ..., group].ravel()
            mean, var = set_statistics(block.ravel(), block_valid)
            xhat = (block - mean) / np.sqrt(var + self.eps)
            y[b, ..., group] = xhat * gamma[group] + beta[group]
        return np.moveaxis(y, -1, self.axis).astype(np.float32)

    def input_gradient(self, x, dy):
        xl, channels, groups, size = self._layout(x)
        dyl = np.moveaxis(np.asarray(dy, np.float64), self.axis, -1)
        gamma = self.w.get("gamma", np.ones(channels))
        dx = np.empty_like(xl)
        for b, group in self._blocks(xl.shape[0], groups, size):
            block = xl[b, ..., group]
            grad = dyl[b, ..., group] * gamma[group]
            inv = 1.0 / np.sqrt(block.var() + self.eps)
            xhat = (block - block.mean()) * inv
            dx[b, ..., group] = inv * (grad - grad.mean() - xhat * np.mean(grad * xhat))
        return np.moveaxis(dx, -1, self.axis).astype(np.float32)
