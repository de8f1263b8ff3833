"""The shared statistics module against NumPy: merged moments and the closed-form batch-norm
gradient (the layers' tests cover them again inside each layer)."""

import contextlib

import numpy as np
import pytest
import tensorflow as tf

from keras_norm import _math


def test_merge_moments_equals_two_pass_moments_of_the_union():
    # A large common offset: E[x^2] - E[x]^2 would lose most digits in float32 here.
    x = np.random.default_rng(0).normal(1000.0, 0.5, (6, 5, 4, 3)).astype("float32")
    xt = tf.constant(x)
    weights = np.array([1.0, 2.0, 3.0])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        merged = _math.merge_moments(_math.moments(xt, [1, 2]), [0])
        direct = _math.moments(xt, [0, 1, 2])
        merged_loss = tf.reduce_sum(merged.variance * weights.astype("float32"))
        direct_loss = tf.reduce_sum(direct.variance * weights.astype("float32"))
    np.testing.assert_allclose(merged.count.numpy().ravel(), 120.0)
    np.testing.assert_allclose(merged.mean.numpy().ravel(), x.mean((0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(merged.variance.numpy().ravel(),
                               x.astype("float64").var((0, 1, 2)), rtol=1e-4)
    # d/dx of sum_c w_c Var_c = w_c * 2 (x - mean_c) / n, in float64. Both gradients agree with
    # it to float32 rounding of inputs near 1000 (spacing 6e-5).
    x64 = x.astype("float64")
    expected = weights * 2.0 * (x64 - x64.mean((0, 1, 2))) / 120.0
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(tape.gradient(merged_loss, xt), expected, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(tape.gradient(direct_loss, xt), expected, rtol=1e-3, atol=1e-5)


def _numpy_standardize(x, axes, gamma, beta, epsilon, dy, center):
    """Forward values, the input gradient and the per-element gamma and beta gradient terms
    of standardization over `axes` (gamma may vary along them); without `center`, division
    by the root mean square."""
    x = x.astype("float64")
    mean = x.mean(axes, keepdims=True) if center else 0.0
    var = ((x - mean) ** 2).mean(axes, keepdims=True)
    x_hat = (x - mean) / np.sqrt(var + epsilon)
    n = np.prod([x.shape[a] for a in axes])
    d_x_hat = dy * gamma
    d_x = n * d_x_hat - x_hat * (d_x_hat * x_hat).sum(axes, keepdims=True)
    if center:
        d_x = d_x - d_x_hat.sum(axes, keepdims=True)
    d_x = d_x / (n * np.sqrt(var + epsilon))
    return x_hat * gamma + beta, d_x, (dy * x_hat), dy, mean, var


#: How `standardize` runs: eagerly (plain ops), traced into a graph (the XLA-compiled kernels
#: by default) and traced with the kernels turned off.
EXECUTIONS = ["eager", "graph", "graph_without_xla_kernels"]


@contextlib.contextmanager
def _xla_kernels(enabled):
    """`_math.set_xla_kernels(enabled)` for the duration of the block."""
    previous = _math.set_xla_kernels(enabled)
    try:
        yield
    finally:
        _math.set_xla_kernels(previous)


def _run(execution, function):
    if execution == "eager":
        return function()
    with _xla_kernels(execution == "graph"):
        return tf.function(function)()


def _check_standardize(x, axes, gamma, beta, parameter_axes, dy, execution, center=True):
    """`_math.standardize` values and gradients against NumPy; `parameter_axes` are the
    axes gamma/beta share (their gradients sum over them)."""
    xt, gt, bt = (tf.constant(v) for v in (x, gamma, beta))

    def step():
        with tf.GradientTape() as tape:
            tape.watch([xt, gt, bt])
            y, moments = _math.standardize(xt, axes, 1e-3, gt, bt, center=center)
            loss = tf.reduce_sum(y * dy)
        return (y, moments.mean, moments.variance), tape.gradient(loss, [xt, gt, bt])

    (y, mean, variance), (d_x, d_gamma, d_beta) = _run(execution, step)
    expected_y, expected_dx, gamma_terms, beta_terms, expected_mean, expected_var = (
        _numpy_standardize(x, tuple(axes), gamma, beta, 1e-3, dy, center))
    np.testing.assert_allclose(y, expected_y, atol=1e-5)
    np.testing.assert_allclose(d_x, expected_dx, atol=1e-5)
    np.testing.assert_allclose(d_gamma, gamma_terms.sum(parameter_axes, keepdims=True),
                               atol=1e-4)
    np.testing.assert_allclose(d_beta, beta_terms.sum(parameter_axes, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(mean.numpy() + np.zeros_like(expected_var), expected_mean
                               + np.zeros_like(expected_var), atol=1e-5)
    np.testing.assert_allclose(variance.numpy(), expected_var, rtol=1e-5)


@pytest.mark.parametrize("center", [True, False], ids=["centred", "rms"])
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_standardize_per_group_matches_numpy(execution, center):
    """Ghost-batch layout `(G, v, H, C)`: statistics per group, gamma/beta shared by groups."""
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (3, 4, 5, 2)).astype("float32")
    gamma = rng.uniform(0.5, 1.5, (1, 1, 1, 2)).astype("float32")
    beta = rng.normal(size=(1, 1, 1, 2)).astype("float32")
    _check_standardize(x, [1, 2], gamma, beta, (0, 1, 2), rng.normal(size=x.shape), execution,
                       center)


@pytest.mark.parametrize("center", [True, False], ids=["centred", "rms"])
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_standardize_with_parameters_along_the_reduced_axes(execution, center):
    """Layer norm: statistics per example over (H, W), gamma and beta per (H, W) position."""
    rng = np.random.default_rng(3)
    x = rng.normal(-2.0, 3.0, (4, 5, 6)).astype("float32")
    gamma = rng.uniform(0.5, 1.5, (1, 5, 6)).astype("float32")
    beta = rng.normal(size=(1, 5, 6)).astype("float32")
    _check_standardize(x, [1, 2], gamma, beta, (0,), rng.normal(size=x.shape), execution,
                       center)


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_standardize_group_norm_layout(execution):
    """Group norm on `(B, H, G, C/G)`: parameters vary along a reduced axis (C/G) and are
    shared over the examples; statistics per example and group."""
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 2.0, (3, 5, 2, 4)).astype("float32")
    gamma = rng.uniform(0.5, 1.5, (1, 1, 2, 4)).astype("float32")
    beta = rng.normal(size=(1, 1, 2, 4)).astype("float32")
    _check_standardize(x, [1, 3], gamma, beta, (0, 1), rng.normal(size=x.shape), execution)


def _compiled_functions(function, *args):
    """The XLA-compiled functions in the graph `function(*args)` traces into (by name, with
    their ops)."""
    graph = tf.function(function).get_concrete_function(*args).graph
    return {f.signature.name: {node.op for node in f.node_def}
            for f in graph.as_graph_def().library.function
            if f.attr.get("_XlaMustCompile") and f.attr["_XlaMustCompile"].b}


def _all_ops(function, *args):
    """Every op type in the graph `function(*args)` traces into, its functions' included."""
    graph = tf.function(function).get_concrete_function(*args).graph.as_graph_def()
    return ({node.op for node in graph.node}
            | {node.op for f in graph.library.function for node in f.node_def})


def _training_step(x):
    """A training step's shape: the forward pass under a tape, then the gradient."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(_math.standardize(x, [0], 1e-3)[0] * tf.range(3.0))
    return tape.gradient(loss, x)


def test_training_traces_call_the_compiled_kernels():
    """Traced for a training step (a gradient tape records the forward pass), `standardize`
    runs its forward and its backward pass as XLA-compiled functions, each of which passes
    its inputs through XLA's optimization barrier; with the kernels off it calls none (the
    kernels are an implementation choice the switch controls)."""
    x = tf.random.normal((4, 3))
    with _xla_kernels(True):
        compiled = _compiled_functions(_training_step, x)
    assert any("_standardize_forward" in name for name in compiled), sorted(compiled)
    assert any("_standardize_backward" in name for name in compiled), sorted(compiled)
    # The barrier is TensorFlow-internal API (keras_norm._compat): fail loudly if it is lost.
    for name, ops in compiled.items():
        assert "XlaOptimizationBarrier" in ops, name
    with _xla_kernels(False):
        assert not _compiled_functions(_training_step, x)


def test_inference_traces_hold_only_plain_ops():
    """Traced without a gradient tape (inference: `predict`, `model.export`, the TFLite
    converter), `standardize` calls no compiled function and no XLA op, with the kernels on;
    tracing a training step first does not change that."""
    x = tf.random.normal((4, 3))

    def inference(x):
        return _math.standardize(x, [0], 1e-3)[0]

    with _xla_kernels(True):
        _compiled_functions(_training_step, x)
        assert not _compiled_functions(inference, x)
        ops = _all_ops(inference, x)
    assert not {op for op in ops if op.startswith("Xla")}, sorted(ops)


def test_backward_kernels_compile_inside_control_flow_gradients():
    """The gradient of a `tf.cond` branch is traced in a graph of its own, after the tape
    has stopped recording; its backward kernel still compiles (the branch's forward kernel
    did), so layers inside control flow keep their compiled training step."""
    x = tf.random.normal((4, 3))

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cond(tf.reduce_sum(x) > -1e9, lambda: _math.standardize(x, [0], 1e-3)[0],
                        lambda: x)
            loss = tf.reduce_sum(y * tf.range(3.0))
        return tape.gradient(loss, x)

    with _xla_kernels(True):
        compiled = _compiled_functions(step, x)
    assert any("_standardize_backward" in name for name in compiled), sorted(compiled)


def _renorm_style_statistics(mean, variance):
    """Batch Renormalization's correction against fixed statistics, with clipping, as
    statistics to normalize by (`x_hat r + d = (x - M) / s`, `s = sqrt(var + eps) / r`,
    `M = mean - d s`)."""
    sigma = tf.constant([[[[1.5, 0.5]]]])
    r = tf.stop_gradient(tf.clip_by_value(tf.sqrt(variance + 1e-3) / sigma, 0.8, 1.5))
    d = tf.stop_gradient(tf.clip_by_value((mean - tf.constant([[[[2.0, -1.0]]]])) / sigma,
                                          -0.4, 0.4))
    scale = tf.sqrt(variance + 1e-3) / r
    return mean - d * scale, tf.square(scale) - 1e-3


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_standardize_with_renorm_statistics_matches_numpy(execution):
    """Batch renorm through `standardize_with`: `gamma (x_hat r + d) + beta` with `r`, `d`
    constants per ghost batch; the input gradient is standardization's with scale `gamma r`,
    and gamma's gradient goes through both `r` and `d`."""
    rng = np.random.default_rng(6)
    x = rng.normal(3.0, 2.0, (3, 4, 5, 2)).astype("float32")
    gamma = rng.uniform(0.5, 1.5, (1, 1, 1, 2)).astype("float32")
    beta = rng.normal(size=(1, 1, 1, 2)).astype("float32")
    dy = rng.normal(size=x.shape)
    xt, gt, bt = (tf.constant(v) for v in (x, gamma, beta))

    def step():
        with tf.GradientTape() as tape:
            tape.watch([xt, gt, bt])
            y, _ = _math.standardize_with(xt, [1, 2], 1e-3, _renorm_style_statistics, gt, bt)
            loss = tf.reduce_sum(y * dy)
        return y, tape.gradient(loss, [xt, gt, bt])

    y, (d_x, d_gamma, d_beta) = _run(execution, step)
    x64 = x.astype("float64")
    mean, var = x64.mean((1, 2), keepdims=True), x64.var((1, 2), keepdims=True)
    r = np.clip(np.sqrt(var + 1e-3) / np.array([1.5, 0.5]), 0.8, 1.5)
    d = np.clip((mean - np.array([2.0, -1.0])) / np.array([1.5, 0.5]), -0.4, 0.4)
    assert np.ptp(r) > 0.1 and np.ptp(d) > 0.1  # the correction differs between groups
    expected_y, expected_dx, *_ = _numpy_standardize(x, (1, 2), gamma * r, gamma * d + beta,
                                                     1e-3, dy, center=True)
    x_hat = (x64 - mean) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(y, expected_y, atol=1e-5)
    np.testing.assert_allclose(d_x, expected_dx, atol=1e-5)
    np.testing.assert_allclose(d_gamma, (dy * (x_hat * r + d)).sum((0, 1, 2), keepdims=True),
                               atol=1e-4)
    np.testing.assert_allclose(d_beta, dy.sum((0, 1, 2), keepdims=True), atol=1e-4)


def test_set_xla_kernels_rejects_non_bool():
    with pytest.raises(TypeError, match="set_xla_kernels.*enabled.*1"):
        _math.set_xla_kernels(1)


def test_standardize_without_affine_parameters():
    x = np.random.default_rng(2).normal(-4.0, 0.1, (16, 3)).astype("float32")
    y, _ = _math.standardize(tf.constant(x), [0], 1e-5)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), atol=1e-4)


def _control_flow_gradients(use_kernels):
    """Gradients of `standardize` inside `tf.cond` and `tf.while_loop` in a graph."""
    x = tf.constant(np.random.default_rng(5).normal(2.0, 3.0, (6, 5)), tf.float32)
    weights = tf.range(5.0) ** 2

    def conditional(x):
        return tf.cond(tf.reduce_sum(x) > -1e9, lambda: _math.standardize(x, [1], 1e-3)[0],
                       lambda: 2.0 * x)

    def looped(x):
        return tf.while_loop(
            lambda i, h: i < 3,
            lambda i, h: (i + 1, _math.standardize(h * 1.5, [0], 1e-3, center=False)[0]),
            [0, x])[1]

    @tf.function
    def gradients(x):
        result = []
        for function in (conditional, looped):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(function(x) * weights)
            result.append(tape.gradient(loss, x))
        return result

    with _xla_kernels(use_kernels):
        return [g.numpy() for g in gradients(x)]


def test_compiled_kernels_differentiate_inside_control_flow():
    """A compiled kernel's gradient inside a `tf.cond` branch or a `tf.while_loop` body (a
    layer in a conditional branch or an RNN cell) builds and equals the plain ops'."""
    for with_kernels, plain in zip(_control_flow_gradients(True), _control_flow_gradients(False)):
        assert np.abs(plain).max() > 1e-3
        np.testing.assert_allclose(with_kernels, plain, atol=1e-5)


def _derived_statistics(mean, variance):
    """A channel-wise map of the moments that mixes both (as Cross-Iteration BN's pooling)."""
    return 0.5 * mean + 0.3, 0.7 * variance + 0.2 * tf.square(mean) + 0.1


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_standardize_with_derived_statistics_matches_autodiff(execution):
    """`standardize_with`: values and gradients (x, gamma, beta) equal automatic
    differentiation of the formula written with `tf.nn.moments`."""
    rng = np.random.default_rng(7)
    x = tf.constant(rng.normal(2.0, 3.0, (6, 4, 5, 3)), tf.float32)
    gamma = tf.constant(rng.uniform(0.5, 1.5, (1, 1, 1, 3)), tf.float32)
    beta = tf.constant(rng.normal(size=(1, 1, 1, 3)), tf.float32)
    dy = tf.constant(rng.normal(size=x.shape), tf.float32)

    def closed_form():
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, moments = _math.standardize_with(x, [0, 1, 2], 1e-3, _derived_statistics,
                                                gamma, beta)
            loss = tf.reduce_sum(y * dy)
        return y, moments.variance, tape.gradient(loss, [x, gamma, beta])

    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        mean, variance = tf.nn.moments(x, [0, 1, 2], keepdims=True)
        derived_mean, derived_variance = _derived_statistics(mean, variance)
        expected_y = gamma * (x - derived_mean) / tf.sqrt(derived_variance + 1e-3) + beta
        loss = tf.reduce_sum(expected_y * dy)
    expected_gradients = tape.gradient(loss, [x, gamma, beta])

    y, batch_variance, gradients = _run(execution, closed_form)
    np.testing.assert_allclose(y, expected_y, atol=1e-5)
    np.testing.assert_allclose(batch_variance, variance, rtol=1e-5)
    for actual, expected, name in zip(gradients, expected_gradients, ["x", "gamma", "beta"]):
        np.testing.assert_allclose(actual, expected, atol=1e-4, err_msg=name)


def test_standardize_with_identity_is_standardize():
    x = tf.constant(np.random.default_rng(8).normal(1.0, 2.0, (8, 5)), tf.float32)
    dy = tf.constant(np.random.default_rng(9).normal(size=(8, 5)), tf.float32)

    def gradient(function):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, _ = function()
            loss = tf.reduce_sum(y * dy)
        return y, tape.gradient(loss, x)

    ours = gradient(lambda: _math.standardize_with(x, [0], 1e-3, lambda m, v: (m, v)))
    plain = gradient(lambda: _math.standardize(x, [0], 1e-3))
    for a, b in zip(ours, plain):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_standardize_with_rejects_parameters_varying_along_the_axes():
    with pytest.raises(ValueError, match=r"standardize_with: `gamma` must have size 1 along "
                                         r"the reduced axes \[0, 1\]. Received: gamma.shape="):
        _math.standardize_with(tf.ones((4, 3, 2)), [0, 1], 1e-3, lambda m, v: (m, v),
                               gamma=tf.ones((1, 3, 2)))
