"""The shared layer checker every keras_norm layer test uses.

A `LayerCase` names a layer factory, an input shape and an independent NumPy reference; the
`check_*` functions each assert one property:

- `check_reference`: training-mode outputs, moving statistics after every step, inference-mode
  outputs (and input gradients, when the reference provides them) match the reference, both
  eagerly and traced into a graph (the XLA-compiled kernels' path);
- `check_jit`: `jit_compile=True` equals eager, for outputs and state, in both modes;
- `check_serialization`: `get_config` is unchanged by `build`, `from_config` and `.keras`
  save/load round trips give identical outputs;
- `check_mixed_precision`: under `mixed_float16` outputs are float16 and finite, every
  variable (statistics included) stays float32 and finite after training steps;
- `check_distributed`: under `MirroredStrategy` on two logical CPUs, a synchronized layer gives
  the same outputs, moving statistics and gradients (inputs and weights) as one device on the
  concatenated global batch.

A reference is any object built from the layer's initial weights (a dict of NumPy arrays by
weight name, e.g. "gamma", "moving_mean") with methods `train(x) -> y`, `infer(x) -> y` and
`state() -> {weight name: expected value}`; it may add `input_gradient(x, dy) -> dx` (the
gradient of `sum(y * dy)` in training mode, without advancing its state).

A case with a `mask_fn` runs every check with a Keras mask: the layer gets `mask=`, the
reference's `train`, `infer`, `input_gradient` and `weight_gradients` get the same mask as a
third (or second) argument, and `check_distributed` splits it over the replicas with the batch.
"""

import dataclasses
import os
import tempfile
from typing import Callable, Optional

import keras
import numpy as np
import pytest
import tensorflow as tf


@dataclasses.dataclass
class LayerCase:
    """What the checks need to know about one layer configuration.

    Attributes:
        factory: Returns a new, unbuilt layer (same configuration every call).
        input_shape: Shape of one (global) batch, e.g. `(8, 4, 4, 3)`.
        reference: Builds the NumPy reference from `{weight name: array}`; None for checks
            that need none.
        steps: Training steps per check.
        atol, rtol: Float32 tolerances against the reference and between execution modes.
        input_fn: `(rng, shape) -> np.ndarray`; defaults to N(1.5, 2) values.
        batch_dependent: Whether training and inference differ (moving statistics exist).
        output_shape_fn: `input shape -> output shape`, for layers that change the shape (e.g.
            a wrapped convolution); the upstream gradients `dy` get that shape. Defaults to the
            input shape.
        mask_fn: `(rng, input shape) -> boolean mask` in Keras's layout (the input's shape
            without its last axis, size-1 axes allowed except the batch axis), or None for
            unmasked checks.
    """

    factory: Callable[[], keras.layers.Layer]
    input_shape: tuple
    reference: Optional[Callable] = None
    steps: int = 3
    atol: float = 1e-4
    rtol: float = 1e-4
    input_fn: Optional[Callable] = None
    batch_dependent: bool = True
    output_shape_fn: Optional[Callable] = None
    mask_fn: Optional[Callable] = None

    def output_shape(self, input_shape):
        if self.output_shape_fn is None:
            return tuple(input_shape)
        return tuple(self.output_shape_fn(tuple(input_shape)))

    def inputs(self, seed, shape=None):
        rng = np.random.default_rng(seed)
        shape = tuple(shape or self.input_shape)
        if self.input_fn is not None:
            return np.asarray(self.input_fn(rng, shape), dtype="float32")
        return rng.normal(1.5, 2.0, size=shape).astype("float32")

    def mask(self, seed, shape=None):
        """The mask for `inputs(seed, shape)`, or None for an unmasked case."""
        if self.mask_fn is None:
            return None
        rng = np.random.default_rng(seed + 5000)
        return np.asarray(self.mask_fn(rng, tuple(shape or self.input_shape)), bool)


def layer_test(check, make_case, names, **case_kwargs):
    """A pytest test running `check(make_case(name, **case_kwargs))` for each configuration
    name: `test_jit_equals_eager = layer_test(check_jit, make_case, ["default", "dense"])`."""
    @pytest.mark.parametrize("name", list(names))
    def test(name):
        check(make_case(name, **case_kwargs))

    test.__doc__ = check.__doc__
    return test


def masked(mask):
    """Extra call arguments for a reference method: `(mask,)`, or none without a mask."""
    return () if mask is None else (mask,)


def mask_kwargs(mask):
    """Extra layer call arguments: `{"mask": tensor}`, or none without a mask."""
    return {} if mask is None else {"mask": tf.constant(mask)}


# ----------------------------------------------------------------------------------- helpers
def weight_name(variable):
    return variable.path.split("/")[-1]


def weights_by_name(layer):
    """`{name: value}` of every weight; names are unique within keras_norm layers."""
    result = {}
    for variable in layer.weights:
        name = weight_name(variable)
        assert name not in result, f"duplicate weight name {name!r} in {layer.name}"
        result[name] = np.array(variable.numpy())
    return result


def build_randomized(case, seed=0, layer=None):
    """A built layer whose trainable weights are random (so gamma/beta/tau are exercised)."""
    layer = case.factory() if layer is None else layer
    layer.build(case.input_shape)
    rng = np.random.default_rng(seed + 1000)
    for variable in layer.trainable_weights:
        shape = tuple(variable.shape)
        if weight_name(variable) == "gamma":  # positive scales, around 1
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.3, shape)
        variable.assign(value.astype(variable.dtype))
    return layer


def clone_layer(case, layer):
    """A second layer with the same configuration and weights."""
    twin = case.factory()
    twin.build(case.input_shape)
    twin.set_weights(layer.get_weights())
    return twin


def assert_close(actual, expected, case, what):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=case.atol,
                               rtol=case.rtol, err_msg=what)


def assert_weights_close(actual, expected, atol=0.0, rtol=0.0):
    """`actual` (a layer or model) has the weights of `expected`, by name and in order, with
    the same values. The names are compared first: a zip alone would skip what one lacks."""
    names = [weight_name(w) for w in actual.weights]
    assert names == [weight_name(w) for w in expected.weights], names
    for a, b in zip(actual.weights, expected.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=atol, rtol=rtol, err_msg=a.path)


def assert_state_equal(layer, expected, case, what):
    actual = weights_by_name(layer)
    for name, value in expected.items():
        assert name in actual, f"{what}: layer has no weight {name!r} ({sorted(actual)})"
        assert_close(actual[name], value, case, f"{what}: weight {name!r}")


# ------------------------------------------------------------------------------------ checks
def check_reference(case, seed=0):
    """Outputs, moving statistics and inference outputs match the NumPy reference, run eagerly
    (plain ops) and traced into a graph (where layers call their XLA-compiled kernels)."""
    for execution in ("eager", "graph"):
        _check_reference(case, seed, execution)


def _check_reference(case, seed, execution):
    layer = build_randomized(case, seed)
    reference = case.reference(weights_by_name(layer))
    wants_gradient = hasattr(reference, "input_gradient")
    # References may also give the trainable weights' gradients, by weight name.
    wants_weight_gradients = hasattr(reference, "weight_gradients")
    trainable = {weight_name(w): w for w in layer.trainable_weights}

    def train(x, dy, call_kwargs):
        if not wants_gradient:
            return layer(x, training=True, **call_kwargs), tf.zeros([]), {}
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, **call_kwargs)
            loss = tf.reduce_sum(y * dy)
        dx, d_weights = tape.gradient(loss, (x, trainable))
        return y, dx, d_weights

    def infer(x, call_kwargs):
        return layer(x, training=False, **call_kwargs)

    if execution == "graph":
        train, infer = tf.function(train), tf.function(infer)
    where = f"({execution})"
    for step in range(case.steps):
        x, mask = case.inputs(seed + step), case.mask(seed + step)
        dy = np.zeros([], "float32")
        if wants_gradient:
            dy = np.random.default_rng(seed + 77 + step).normal(
                size=case.output_shape(x.shape)).astype("float32")
        y, dx, d_weights = train(tf.constant(x), tf.constant(dy), mask_kwargs(mask))
        if wants_gradient:
            assert_close(dx, reference.input_gradient(x, dy, *masked(mask)), case,
                         f"input gradient, step {step} {where}")
        if wants_gradient and wants_weight_gradients:
            expected = reference.weight_gradients(x, dy, *masked(mask))
            assert set(expected) == set(d_weights), (sorted(expected), sorted(d_weights))
            for name, value in expected.items():
                assert_close(d_weights[name], value, case,
                             f"gradient of {name!r}, step {step} {where}")
        assert_close(y, reference.train(x, *masked(mask)), case,
                     f"training output, step {step} {where}")
        assert_state_equal(layer, reference.state(), case, f"state after step {step} {where}")
    x, mask = case.inputs(seed + 99), case.mask(seed + 99)
    assert_close(infer(tf.constant(x), mask_kwargs(mask)), reference.infer(x, *masked(mask)),
                 case, f"inference output {where}")
    assert_state_equal(layer, reference.state(), case, f"state after inference {where}")


def _run_steps(layer, inputs, masks, training, jit):
    def step(x, call_kwargs):
        return layer(x, training=training, **call_kwargs)

    fn = tf.function(step, jit_compile=True) if jit else step
    return [np.array(fn(tf.constant(x), mask_kwargs(m))) for x, m in zip(inputs, masks)]


def check_jit(case, seed=0):
    """`jit_compile=True` equals eager in training (outputs and state) and inference."""
    eager = build_randomized(case, seed)
    compiled = clone_layer(case, eager)
    inputs = [case.inputs(seed + i) for i in range(case.steps)]
    masks = [case.mask(seed + i) for i in range(case.steps)]
    for training in (True, False):
        expected = _run_steps(eager, inputs, masks, training, jit=False)
        actual = _run_steps(compiled, inputs, masks, training, jit=True)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, case, f"jit vs eager output, training={training}, step {i}")
        assert_state_equal(compiled, weights_by_name(eager), case, f"jit state, {training=}")


def check_serialization(case, seed=0):
    """Config unchanged by build; from_config and .keras round trips give equal outputs."""
    layer = case.factory()
    config = layer.get_config()
    build_randomized(case, seed, layer)
    assert layer.get_config() == config, "get_config() changed after build()"
    x_train, x_test = case.inputs(seed), case.inputs(seed + 1)
    layer(x_train, training=True)  # move the statistics away from their initial values

    restored = layer.__class__.from_config(config)
    restored.build(case.input_shape)
    restored.set_weights(layer.get_weights())
    assert restored.get_config() == config, "from_config(get_config()) is not a round trip"
    assert_close(restored(x_test, training=False), layer(x_test, training=False), case,
                 "from_config inference output")

    inputs = keras.Input(batch_shape=(None,) + tuple(case.input_shape[1:]))
    model = keras.Model(inputs, layer(inputs))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x_test, training=False), model(x_test, training=False),
                                  err_msg=".keras round trip changed inference outputs")
    assert_weights_close(loaded, model)
    if case.batch_dependent:
        twin = clone_layer(case, layer)
        np.testing.assert_allclose(loaded(x_test, training=True), twin(x_test, training=True),
                                   atol=case.atol, err_msg=".keras round trip, training output")


def check_mixed_precision(case, seed=0):
    """mixed_float16: float16 outputs, float32 finite variables, finite after training."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = case.factory()
        layer.build(case.input_shape)
        for step in range(case.steps):
            x = tf.constant(case.inputs(seed + step), tf.float16)
            y = layer(x, training=True)
            assert y.dtype == tf.float16, f"training output dtype {y.dtype}"
            assert np.all(np.isfinite(y.numpy())), "non-finite training output"
        y = layer(tf.constant(case.inputs(seed + 9), tf.float16), training=False)
        assert y.dtype == tf.float16, f"inference output dtype {y.dtype}"
        assert np.all(np.isfinite(y.numpy())), "non-finite inference output"
        for variable in layer.weights:
            if variable.dtype in ("float16", "float32", "bfloat16"):
                assert variable.dtype == "float32", f"{variable.path} is {variable.dtype}"
            assert np.all(np.isfinite(variable.numpy())), f"{variable.path} is not finite"
    finally:
        keras.mixed_precision.set_global_policy(previous)


def gradient_step(layer, x, dy, training, mask=None):
    call_kwargs = {} if mask is None else {"mask": mask}
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training, **call_kwargs)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    grads = tape.gradient(loss, [x] + list(layer.trainable_variables))
    return y, grads[0], grads[1:]


def check_distributed(case, strategy, seed=0, training=True):
    """Under MirroredStrategy, equals one device on the concatenated global batch.

    The global batch is split evenly over the replicas; the loss is `sum(y * dy)` with a fixed
    random `dy`, so each replica's input gradient must equal the matching slice of the
    one-device gradient, and the replicas' weight gradients must sum to the one-device ones.
    """
    single = build_randomized(case, seed)
    with strategy.scope():
        distributed = case.factory()
        distributed.build(case.input_shape)
        distributed.set_weights(single.get_weights())
    replicas = strategy.num_replicas_in_sync
    assert case.input_shape[0] % replicas == 0, "global batch must split evenly"

    @tf.function
    def replica_step(x, dy, mask=None):
        return gradient_step(distributed, x, dy, training, mask)

    def per_replica(parts):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(parts[ctx.replica_id_in_sync_group]))

    for step in range(case.steps):
        x, mask = case.inputs(seed + step), case.mask(seed + step)
        dy_shape = case.output_shape(x.shape)
        dy = np.random.default_rng(seed + 50 + step).normal(size=dy_shape).astype("float32")
        y, dx, dw = gradient_step(single, tf.constant(x), tf.constant(dy), training,
                                  None if mask is None else tf.constant(mask))

        args = (per_replica(np.split(x, replicas)), per_replica(np.split(dy, replicas)))
        if mask is not None:
            args += (per_replica(np.split(mask, replicas)),)
        ry, rdx, rdw = strategy.run(replica_step, args=args)
        local = strategy.experimental_local_results
        assert_close(np.concatenate(local(ry)), y, case, f"distributed output, step {step}")
        assert_close(np.concatenate(local(rdx)), dx, case, f"distributed input grad, step {step}")
        assert len(rdw) == len(dw) == len(single.trainable_variables), (len(rdw), len(dw))
        for single_grad, replica_grads, variable in zip(dw, rdw, single.trainable_variables):
            total = np.sum([np.asarray(g) for g in local(replica_grads)], axis=0)
            assert_close(total, single_grad, case, f"distributed grad of {variable.path}")
        assert_state_equal(distributed, weights_by_name(single), case,
                           f"distributed state, step {step}")
        for variable in distributed.weights:
            copies = [np.asarray(v) for v in local(variable.value)]
            for copy in copies[1:]:
                np.testing.assert_allclose(copy, copies[0], atol=case.atol,
                                           err_msg=f"replicas disagree on {variable.path}")


def small_classifier(input_shape, *layers):
    """A compiled `Sequential` classifier, the same weights every call (seed 0): `layers`, then
    `Flatten` and a 3-way `Dense`; SGD(0.1) on sparse cross-entropy from logits."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(input_shape), *layers, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def check_fit_matches_one_device(make_model, strategy, x, y, batch_size, epochs=1, rtol=1e-7):
    """`model.fit` under `strategy` leaves the same weights (statistics and training state
    included) as on one device. `make_model()` returns a compiled model with the same weights
    every call. Returns `(single, distributed)` for further checks."""
    single = make_model()
    with strategy.scope():
        distributed = make_model()
    distributed.set_weights(single.get_weights())
    for model in (single, distributed):
        model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    assert_weights_close(distributed, single, atol=1e-4, rtol=rtol)
    return single, distributed


def check_training_reduces_loss(model, x, y, batch_size, optimizer, steps=200):
    """`steps` compiled training steps on consecutive batches of a fixed random order of
    `(x, y)` (wrapping around): every loss and weight stays finite and the mean loss of the
    last 20 steps is below that of the first 20. Returns the losses."""
    order = np.random.default_rng(0).permutation(len(x))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        return loss

    losses = []
    for step in range(steps):
        index = np.take(order, np.arange(step * batch_size, (step + 1) * batch_size), mode="wrap")
        losses.append(float(train_step(x[index], y[index])))
    assert np.all(np.isfinite(losses))
    for variable in model.weights:
        assert np.all(np.isfinite(variable.numpy())), variable.path
    assert np.mean(losses[-20:]) < np.mean(losses[:20]), (losses[:20], losses[-20:])
    return losses
