"""The shared statistics module against NumPy: merged moments and the closed-form batch-norm
gradient (the layers' tests cover them again inside each layer)."""

import numpy as np
import tensorflow as tf

from keras_norm import stats


def test_merge_moments_equals_two_pass_moments_of_the_union():
    # A large common offset: E[x^2] - E[x]^2 would lose most digits in float32 here.
    x = np.random.default_rng(0).normal(1000.0, 0.5, (6, 5, 4, 3)).astype("float32")
    xt = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        merged = stats.merge_moments(stats.moments(xt, [1, 2]), [0])
        direct = stats.moments(xt, [0, 1, 2])
        merged_loss = tf.reduce_sum(merged.variance * [1.0, 2.0, 3.0])
        direct_loss = tf.reduce_sum(direct.variance * [1.0, 2.0, 3.0])
    np.testing.assert_allclose(merged.count.numpy().ravel(), 120.0)
    np.testing.assert_allclose(merged.mean.numpy().ravel(), x.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(merged.variance.numpy().ravel(),
                               x.astype("float64").var((0, 1, 2)), rtol=1e-4)
    # Gradients agree to float32 rounding of inputs near 1000 (spacing 6e-5).
    np.testing.assert_allclose(tape.gradient(merged_loss, xt), tape.gradient(direct_loss, xt),
                               rtol=1e-3, atol=1e-5)


def _numpy_batch_norm(x, axes, gamma, beta, epsilon, dy):
    """Forward values, the input gradient and the per-element gamma and beta gradient terms
    of standardization over `axes` (gamma may vary along them)."""
    x = x.astype("float64")
    mean = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    x_hat = (x - mean) / np.sqrt(var + epsilon)
    n = np.prod([x.shape[a] for a in axes])
    d_x_hat = dy * gamma
    d_x = (n * d_x_hat - d_x_hat.sum(axes, keepdims=True)
           - x_hat * (d_x_hat * x_hat).sum(axes, keepdims=True)) / (n * np.sqrt(var + epsilon))
    return x_hat * gamma + beta, d_x, (dy * x_hat), dy


def _check_standardize(x, axes, gamma, beta, parameter_axes, dy):
    """`stats.standardize` values and gradients against NumPy; `parameter_axes` are the
    axes gamma/beta share (their gradients sum over them)."""
    xt, gt, bt = (tf.constant(v) for v in (x, gamma, beta))
    with tf.GradientTape() as tape:
        tape.watch([xt, gt, bt])
        y, moments = stats.standardize(xt, axes, 1e-3, gt, bt)
        loss = tf.reduce_sum(y * dy)
    d_x, d_gamma, d_beta = tape.gradient(loss, [xt, gt, bt])
    expected_y, expected_dx, gamma_terms, beta_terms = _numpy_batch_norm(
        x, tuple(axes), gamma, beta, 1e-3, dy)
    np.testing.assert_allclose(y, expected_y, atol=1e-5)
    np.testing.assert_allclose(d_x, expected_dx, atol=1e-5)
    np.testing.assert_allclose(d_gamma, gamma_terms.sum(parameter_axes, keepdims=True),
                               atol=1e-4)
    np.testing.assert_allclose(d_beta, beta_terms.sum(parameter_axes, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(moments.mean.numpy(), x.mean(tuple(axes), keepdims=True),
                               atol=1e-5)
    np.testing.assert_allclose(moments.variance.numpy(), x.var(tuple(axes), keepdims=True),
                               rtol=1e-5)


def test_standardize_per_group_matches_numpy():
    """Ghost-batch layout `(G, v, H, C)`: statistics per group, gamma/beta shared by groups."""
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (3, 4, 5, 2)).astype("float32")
    gamma = rng.uniform(0.5, 1.5, (1, 1, 1, 2)).astype("float32")
    beta = rng.normal(size=(1, 1, 1, 2)).astype("float32")
    _check_standardize(x, [1, 2], gamma, beta, (0, 1, 2), rng.normal(size=x.shape))


def test_standardize_with_parameters_along_the_reduced_axes():
    """Layer norm: statistics per example over (H, W), gamma and beta per (H, W) position."""
    rng = np.random.default_rng(3)
    x = rng.normal(-2.0, 3.0, (4, 5, 6)).astype("float32")
    gamma = rng.uniform(0.5, 1.5, (1, 5, 6)).astype("float32")
    beta = rng.normal(size=(1, 5, 6)).astype("float32")
    _check_standardize(x, [1, 2], gamma, beta, (0,), rng.normal(size=x.shape))


def test_standardize_group_norm_layout():
    """Group norm on `(B, H, G, C/G)`: parameters vary along a reduced axis (C/G) and are
    shared over the examples; statistics per example and group."""
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, (3, 5, 2, 4)).astype("float32")
    gamma = rng.uniform(0.5, 1.5, (1, 1, 2, 4)).astype("float32")
    beta = rng.normal(size=(1, 1, 2, 4)).astype("float32")
    _check_standardize(x, [1, 3], gamma, beta, (0, 1), rng.normal(size=x.shape))


def test_standardize_without_affine_parameters():
    x = np.random.default_rng(2).normal(-4.0, 0.1, (16, 3)).astype("float32")
    y, _ = stats.standardize(tf.constant(x), [0], 1e-5)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), atol=1e-4)
