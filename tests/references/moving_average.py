"""NumPy reference of Moving Average Batch Normalization (Yan et al., ICLR 2020).

Written from the paper's equations (docs/algorithms.md section 5), independently of the layer: the
moving averages are kept as Python lists of every past statistic (not as shifted buffers), and
the buffers the layer stores are rebuilt from those lists only to compare states.
"""

import numpy as np


class MovingAverageBatchNormReference:
    """MABN in float64, iteration by iteration.

    `train(x)` is the forward pass of one training iteration (it advances the forward state:
    the history of `chi_B`, the EMA, the step count). `input_gradient(x, dy)` is the backward
    pass of the iteration whose forward pass `train(x)` is about to run: it uses the forward
    state as it is before that `train(x)`, and it advances the backward state (the history of
    `psi_B`), because the layer's backward pass does. Call it before `train(x)`, as
    `harness.check_reference` does.
    """

    def __init__(self, weights, axis=-1, buffer_size=16, warmup_steps=1000, momentum=0.98,
                 epsilon=1e-5, r_max=5.0, inference_statistics="moving", synchronized=False):
        del synchronized  # one device on the global batch: nothing to do
        self.w = {k: np.array(v, dtype=np.float64) for k, v in weights.items()}
        self.axis, self.b, self.warmup = axis, buffer_size, warmup_steps
        self.momentum, self.eps, self.r_max = momentum, epsilon, r_max
        self.inference_statistics = inference_statistics
        self.ema = self.w["moving_second_moment"].copy()
        # The statistics pushed so far, oldest first (what the given buffers hold).
        self.chi_history = self._history(self.w["second_moment_buffer"], self.w["step_counter"])
        self.psi_history = self._history(self.w["backward_buffer"],
                                         self.w["backward_step_counter"])

    def _history(self, buffer, count):
        held = min(int(count), self.b)
        return [row.copy() for row in buffer[:held][::-1]]

    # shapes ---------------------------------------------------------------------------
    def _channels_last(self, x):
        return np.moveaxis(np.asarray(x, np.float64), self.axis, -1)

    def _restore(self, y):
        return np.moveaxis(y, -1, self.axis).astype(np.float32)

    def _gamma_beta(self, c):
        return self.w.get("gamma", np.ones(c)), self.w.get("beta", np.zeros(c))

    def _sma(self, current, history):
        """Mean of `current` and the last `b - 1` values of `history` (fewer while filling)."""
        window = history[len(history) - min(len(history), self.b - 1):]
        return (current + sum(window, np.zeros_like(current))) / (len(window) + 1)

    # forward ----------------------------------------------------------------------------
    def _forward(self, x):
        """Everything the forward pass of the next iteration computes, without side effects."""
        xl = self._channels_last(x)
        c = xl.shape[-1]
        chi = (xl.reshape(-1, c) ** 2).mean(0) if xl.size else np.zeros(c)
        chi_bar = self._sma(chi, self.chi_history)
        sigma = np.sqrt(chi_bar + self.eps)
        z = xl / sigma
        if len(self.chi_history) < self.warmup:
            r = np.ones(c)
        else:
            r = np.clip(sigma / np.sqrt(self.ema + self.eps), 1 / self.r_max, self.r_max)
        return xl, chi, chi_bar, sigma, z, r

    def train(self, x):
        xl, chi, chi_bar, _, z, r = self._forward(x)
        gamma, beta = self._gamma_beta(xl.shape[-1])
        if xl.size:
            self.chi_history.append(chi)
            self.ema = self.momentum * self.ema + (1 - self.momentum) * chi_bar
        return self._restore(gamma * r * z + beta)

    def infer(self, x):
        xl = self._channels_last(x)
        gamma, beta = self._gamma_beta(xl.shape[-1])
        if self.inference_statistics == "batch":
            second_moment = (xl.reshape(-1, xl.shape[-1]) ** 2).mean(0)
        else:
            second_moment = self.ema
        return self._restore(gamma * xl / np.sqrt(second_moment + self.eps) + beta)

    # backward ---------------------------------------------------------------------------
    def input_gradient(self, x, dy):
        """MABN's dL/dx for L = sum(y * dy); appends this iteration's psi_B to its history."""
        xl, _, _, sigma, z, r = self._forward(x)
        gamma, _ = self._gamma_beta(xl.shape[-1])
        g_z = self._channels_last(dy) * gamma * r
        c = xl.shape[-1]
        psi = (g_z * z).reshape(-1, c).mean(0) if xl.size else np.zeros(c)
        psi_bar = self._sma(psi, self.psi_history)
        if xl.size:
            self.psi_history.append(psi)
        return self._restore((g_z - z * psi_bar) / sigma)

    def parameter_gradients(self, x, dy):
        """`{"gamma": dL/dgamma, "beta": dL/dbeta}` of the next iteration (no side effects)."""
        xl, _, _, _, z, r = self._forward(x)
        dyl = self._channels_last(dy).reshape(-1, xl.shape[-1])
        return {"gamma": (dyl * (r * z).reshape(dyl.shape)).sum(0), "beta": dyl.sum(0)}

    # state ------------------------------------------------------------------------------
    def _buffer(self, history, channels):
        """The layer's buffer layout: the newest `b` values, newest first, zero padded."""
        buffer = np.zeros((self.b, channels))
        for i, row in enumerate(reversed(history[-self.b:])):
            buffer[i] = row
        return buffer

    def state(self):
        c = self.ema.shape[0]
        return {
            "moving_second_moment": self.ema,
            "second_moment_buffer": self._buffer(self.chi_history, c),
            "backward_buffer": self._buffer(self.psi_history, c),
            "step_counter": np.float64(len(self.chi_history)),
            "backward_step_counter": np.float64(len(self.psi_history)),
        }
