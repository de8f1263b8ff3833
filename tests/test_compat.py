"""The non-public TensorFlow, Keras and KerasTuner API keras_norm and the recipes rely on.

One test per symbol of `keras_norm._compat` and `recipes._tuner_compat`: each imports the
symbol from its private location (failing with a message that names it when an upgrade moves
it), checks that it still behaves as the library assumes, and, where `_compat` has a
fallback, that the fallback gives the same results and warns once when it is slower.
"""

import importlib
import inspect
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_norm
from keras_norm import _compat

# `recipes` is not installed: it is imported from the project root.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import keras_tuner as kt  # noqa: E402

from recipes import _tuner_compat  # noqa: E402


def _private(module, name, symbol):
    """`module.name`, or a failure naming `symbol` (it moved in this TensorFlow/Keras)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{symbol} moved or was removed in this version ({error}); update "
                    "keras_norm/_compat.py")


@pytest.fixture
def fresh_warnings(monkeypatch):
    """`_compat`'s once-only warnings, forgotten for the test."""
    monkeypatch.setattr(_compat, "_WARNED", set())


def _ops_of(function, *args):
    graph = tf.function(function).get_concrete_function(*args).graph.as_graph_def()
    return ({node.op for node in graph.node}
            | {node.op for f in graph.library.function for node in f.node_def})


# ------------------------------------------------------------------ optimization barrier
def test_optimization_barrier():
    barrier = _private("tensorflow.compiler.tf2xla.python.xla", "optimization_barrier",
                       _compat.OPTIMIZATION_BARRIER)
    assert _compat._xla_barrier is barrier
    a, b = tf.constant([1.0, -2.0]), tf.constant(3.0)

    @tf.function(jit_compile=True)
    def through(a, b):
        return _compat.optimization_barrier(a * 2.0, b + 1.0)

    out_a, out_b = through(a, b)
    np.testing.assert_array_equal(out_a, [2.0, -4.0])
    assert float(out_b) == 4.0
    assert "XlaOptimizationBarrier" in _ops_of(through, a, b), \
        f"{_compat.OPTIMIZATION_BARRIER} no longer emits XlaOptimizationBarrier"


def test_optimization_barrier_fallback_warns_once(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_compat, "_xla_barrier", None)
    a = tf.constant([1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="optimization_barrier"):
        (out,) = _compat.optimization_barrier(a)
    np.testing.assert_array_equal(out, a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.optimization_barrier(a)  # once only


# -------------------------------------------------------------------- gradient recording
def test_could_possibly_record():
    could_possibly_record = _private("tensorflow.python.eager.record", "could_possibly_record",
                                     _compat.COULD_POSSIBLY_RECORD)
    seen = {}

    @tf.function
    def traced(x):
        seen["traced"] = (could_possibly_record(), _compat.gradient_recording())
        return x * 2.0

    x = tf.constant(1.0)
    assert not could_possibly_record() and not _compat.gradient_recording()
    traced(x)
    assert seen.pop("traced") == (False, False), "an inference trace looks recorded"
    with tf.GradientTape() as tape:
        tape.watch(x)
        assert could_possibly_record() and _compat.gradient_recording()
        traced(tf.constant([1.0]))  # a new signature: traced under the tape
    assert seen.pop("traced") == (True, True), \
        f"{_compat.COULD_POSSIBLY_RECORD} does not see a tape from inside a trace"


def test_gradient_recording_fallback_warns_and_turns_kernels_off(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_compat, "_could_possibly_record", None)
    with pytest.warns(RuntimeWarning, match="could_possibly_record"):
        with tf.GradientTape():
            assert _compat.gradient_recording() is False


def test_outer_graph():
    """`FuncGraph.outer_graph` chains a control-flow branch's graph to the function's."""
    seen = {}

    @tf.function
    def outer(x):
        seen["outer"] = tf.compat.v1.get_default_graph()

        def branch():
            graph = tf.compat.v1.get_default_graph()
            seen["has_attribute"] = hasattr(graph, "outer_graph")
            seen["chain"] = _compat.enclosing_graphs()
            return x * 2.0

        return tf.cond(x > 0, branch, lambda: x)

    outer.get_concrete_function(tf.constant(1.0))
    assert seen["has_attribute"], f"{_compat.OUTER_GRAPH} is gone"
    chain = seen["chain"]
    assert len(chain) == 2 and chain[-1] is seen["outer"], chain
    assert _compat.enclosing_graphs() == []  # eagerly


def test_xla_call_arguments_let_cond_branches_differentiate_compiled_functions():
    """cond_v2's capture path: a compiled function called in a `tf.cond` branch, with its
    arguments passed through `xla_call_arguments`, differentiates like plain ops."""
    compiled = tf.function(lambda a: tf.sin(a) * a, jit_compile=True)
    x = tf.constant([0.5, 1.5, -2.0])

    @tf.function
    def gradient(x, use_compiled):
        with tf.GradientTape() as tape:
            tape.watch(x)

            def branch():
                if use_compiled:
                    return compiled(*_compat.xla_call_arguments([x * 3.0]))
                return tf.sin(x * 3.0) * (x * 3.0)

            y = tf.cond(tf.reduce_sum(x) > -1e9, branch, lambda: x)
            loss = tf.reduce_sum(y)
        return tape.gradient(loss, x)

    np.testing.assert_allclose(gradient(x, True), gradient(x, False), rtol=1e-6)


# ---------------------------------------------------------------------- fused batch norm
def _bessel_batch_norm(x, gamma, beta, epsilon):
    mean, variance = x.mean((0, 1, 2)), x.var((0, 1, 2))
    n = x.size / x.shape[-1]
    return (x - mean) / np.sqrt(variance + epsilon) * gamma + beta, mean, variance * n / (n - 1)


def test_fused_batch_norm(monkeypatch):
    _private("tensorflow.compat.v1.nn", "fused_batch_norm", _compat.FUSED_BATCH_NORM)
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (3, 4, 5, 2)).astype("float32")
    gamma, beta = np.array([0.5, 2.0], "float32"), np.array([1.0, -1.0], "float32")
    expected = _bessel_batch_norm(x.astype("float64"), gamma, beta, 1e-3)
    results = [_compat.fused_batch_norm(tf.constant(x), gamma, beta, 1e-3)]
    monkeypatch.delattr(tf.compat.v1.nn, "fused_batch_norm")  # the public fallback
    results.append(_compat.fused_batch_norm(tf.constant(x), gamma, beta, 1e-3))
    for result in results:
        for value, reference in zip(result, expected):
            np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------- layers of a model
class _Holder(keras.layers.Layer):
    """A custom layer holding a sublayer (only Keras's private walk finds it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization()

    def call(self, inputs):
        return self.norm(inputs)


def _nested_model():
    inner = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Conv2D(3, 1),
                              keras_norm.BatchNormalization()], name="inner")
    inputs = keras.Input((4, 4, 3))
    y = inner(inputs)
    y = keras_norm.get("cross_iteration", channels=3,
                       layer=keras.layers.Conv2D(3, 1, use_bias=False))(y)
    y = _Holder()(y)
    return keras.Model(inputs, y)


def test_flatten_layers(monkeypatch, fresh_warnings):
    walk = _private("keras.layers", "Layer", "keras.Layer")._flatten_layers
    assert {"include_self", "recursive"} <= set(inspect.signature(walk).parameters), \
        f"{_compat.FLATTEN_LAYERS} changed its signature"
    model = _nested_model()
    found = _compat.flatten_layers(model)
    names = [layer.name for layer in found]
    assert model not in found and len(set(map(id, found))) == len(found)
    holder = next(layer for layer in found if isinstance(layer, _Holder))
    assert holder.norm in found  # a custom layer's sublayer
    expected = {"inner", "cross_iteration_batch_normalization"}
    assert expected <= {n.rstrip("_0123456789") for n in names}, names
    assert sum(isinstance(layer, keras.layers.Conv2D) for layer in found) == 2
    # The public fallback: the same walk over Model.layers and Wrapper.layer, with a warning;
    # it misses the custom layer's sublayer and a Sequential's input layer (not in `layers`).
    monkeypatch.delattr(keras.layers.Layer, "_flatten_layers")
    with pytest.warns(RuntimeWarning, match="_flatten_layers"):
        public = _compat.flatten_layers(model)
    sequential_inputs = [layer for layer in model.get_layer("inner")._layers
                         if isinstance(layer, keras.layers.InputLayer)]
    missed = {id(holder.norm)} | {id(layer) for layer in sequential_inputs}
    assert [layer for layer in found if id(layer) not in missed] == public


# -------------------------------------------------------------------------- autocasting
def test_autocast_scope():
    _private("keras.src.backend", "AutocastScope", _compat.AUTOCAST_SCOPE)
    seen = {}

    class Reader(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(), initializer="ones")

        def call(self, inputs):
            seen["autocast"] = tf.convert_to_tensor(self.w).dtype
            with _compat.no_autocast():
                seen["own"] = tf.convert_to_tensor(self.w).dtype
            return inputs

    Reader(dtype="mixed_float16")(tf.ones((1, 2)))
    assert seen == {"autocast": tf.float16, "own": tf.float32}, seen


def test_no_autocast_fallback_warns(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_compat, "_AutocastScope", None)
    with pytest.warns(RuntimeWarning, match="AutocastScope"):
        with _compat.no_autocast():
            pass


# ------------------------------------------------------------------------ causal padding
def test_causal_padding_matches_keras_causal_conv():
    """`causal_padding` then a valid convolution is Keras's causal Conv1D (which computes its
    padding with the private `_compute_causal_padding`); channels first pads the same steps
    (TensorFlow's CPU convolution is channels-last only, so that layout compares paddings)."""
    layer = keras.layers.Conv1D(2, 3, dilation_rate=2, padding="causal")
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 9, 3)), tf.float32)
    expected = layer(x)
    padded = keras.ops.pad(x, _compat.causal_padding(layer))
    outputs = keras.ops.conv(padded, layer.kernel, padding="valid", dilation_rate=2) + layer.bias
    np.testing.assert_allclose(outputs, expected, atol=1e-5)
    first = keras.layers.Conv1D(2, 3, dilation_rate=2, padding="causal",
                                data_format="channels_first")
    padded_first = keras.ops.pad(tf.transpose(x, [0, 2, 1]), _compat.causal_padding(first))
    np.testing.assert_array_equal(tf.transpose(padded_first, [0, 2, 1]), padded)
    for conv in (layer, first):
        private = getattr(conv, "_compute_causal_padding", None)
        if private is not None:  # Keras still has it: the same numbers
            assert _compat.causal_padding(conv) == [list(p) for p in private()]


# ------------------------------------------------------------------ instance-level call
def test_instance_call_override():
    """`Layer.__call__` runs a `call` set on the instance, eagerly, traced and in a
    functional model, and `restore_call` brings the class's back."""
    layer = keras.layers.Dense(2, kernel_initializer="ones")
    x = tf.ones((1, 3))
    original = layer(x).numpy()

    def doubled(inputs, *args, **kwargs):
        return 2.0 * type(layer).call(layer, inputs, *args, **kwargs)

    previous = _compat.override_call(layer, doubled)
    assert previous is None
    try:
        np.testing.assert_allclose(layer(x), 2.0 * original,
                                   err_msg=f"{_compat.INSTANCE_CALL}: override ignored")
        np.testing.assert_allclose(tf.function(layer)(x), 2.0 * original)
        inputs = keras.Input((3,))
        np.testing.assert_allclose(keras.Model(inputs, layer(inputs))(x), 2.0 * original)
    finally:
        _compat.restore_call(layer, previous)
    assert "call" not in layer.__dict__
    np.testing.assert_allclose(layer(x), original)


# ---------------------------------------------------------------- KerasTuner (recipes)
@pytest.mark.parametrize("owner, name, parameters", _tuner_compat.PRIVATE_METHODS,
                         ids=[f"{o.__name__}.{n}" for o, n, _ in _tuner_compat.PRIVATE_METHODS])
def test_keras_tuner_private_method(owner, name, parameters):
    symbol = f"keras_tuner {owner.__name__}.{name}"
    method = getattr(owner, name, None)
    assert callable(method), f"{symbol} is gone in KerasTuner {kt.__version__}"
    actual = tuple(p for p in inspect.signature(method).parameters if p != "self")
    assert actual == parameters, f"{symbol} now takes {actual}, recipes pass {parameters}"


def _hyperband_oracle():
    oracle = kt.oracles.HyperbandOracle(objective=kt.Objective("score", "max"), max_epochs=9,
                                        factor=3, seed=0)
    oracle.hyperparameters.Choice("norm", ["batch", "group", "layer"])
    return oracle


@pytest.mark.parametrize("owner, name, kind", _tuner_compat.PRIVATE_ATTRIBUTES,
                         ids=[f"{o.__name__}.{n}" for o, n, _ in _tuner_compat.PRIVATE_ATTRIBUTES])
def test_keras_tuner_private_attribute(owner, name, kind):
    oracle = _hyperband_oracle()
    assert isinstance(oracle, owner)
    symbol = f"keras_tuner {owner.__name__}.{name}"
    assert hasattr(oracle, name), f"{symbol} is gone in KerasTuner {kt.__version__}"
    assert isinstance(getattr(oracle, name), kind), \
        f"{symbol} is now a {type(getattr(oracle, name)).__name__}, not a {kind.__name__}"


def test_keras_tuner_hyperband_bracket_layout():
    """What `recipes.oracles.HyperbandOracle._random_trial` reads and writes: a bracket's
    `rounds[0]` gains `{"past_id": None, "id": trial_id}` and the values carry the budget."""
    oracle = _hyperband_oracle()
    bracket = {"bracket_num": 1, "rounds": [[] for _ in range(2)]}
    assert set(bracket) == set(_tuner_compat.BRACKET_KEYS)
    response = oracle._random_trial("t0", bracket)
    assert bracket["rounds"][0] == [dict.fromkeys(_tuner_compat.ROUND_ENTRY_KEYS)
                                    | {"id": "t0"}], bracket
    assert response["values"]["tuner/epochs"] == oracle._get_epochs(1, 0)
    assert response["values"]["norm"] in ("batch", "group", "layer")


def test_keras_tuner_grpc_service():
    """The chief's gRPC pieces: a registration function and a servicer built on an oracle
    that answers KerasTuner's requests (`GetSpace` returns the oracle's search space)."""
    for symbol in (_tuner_compat.GRPC_PROTOS, _tuner_compat.ORACLE_SERVICER):
        module, _, name = symbol.rpartition(".") if symbol.endswith("Servicer") else (
            symbol, "", "")
        try:
            imported = importlib.import_module(module)
        except ImportError as error:
            pytest.fail(f"{symbol} is gone in KerasTuner {kt.__version__}: {error}")
        assert not name or hasattr(imported, name), \
            f"{symbol} is gone in KerasTuner {kt.__version__}"
    add_servicer_to_server, servicer_class = _tuner_compat.oracle_service()
    assert callable(add_servicer_to_server)
    servicer = servicer_class(_hyperband_oracle())
    assert hasattr(servicer, "stop_triggered") and servicer.stop_triggered is False, \
        f"{_tuner_compat.ORACLE_SERVICER}.stop_triggered changed"
    response = servicer.GetSpace(None, None)
    names = [hp.name for hp in response.hyperparameters.space.choice_space]
    assert names == ["norm"], f"{_tuner_compat.ORACLE_SERVICER}.GetSpace answered {response}"


def test_keras_tuner_client_keeps_the_local_oracle(monkeypatch):
    """KerasTuner's `OracleClient` wraps the worker's own oracle as `_oracle` (the channel is
    only opened on the first request, so nothing listens on the port here)."""
    from keras_tuner.src.distribute.oracle_client import OracleClient
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "1")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    oracle = _hyperband_oracle()
    client = OracleClient(oracle)
    assert _tuner_compat.local_oracle(client) is oracle, \
        f"keras_tuner OracleClient.{_tuner_compat.CLIENT_LOCAL_ORACLE} is gone"


def test_hyperband_plan_counts_every_round():
    """KerasTuner 1.4's schedule for max_epochs=9, factor=3, written out from its equations
    (not from the private methods the helper calls, so a change in them fails here): brackets
    b = 0, 1, 2 while 9 / 3**b >= min_epochs (1); round r of bracket b holds
    ceil(s / (b + 1) * 3**(b - r)) trials, s = ceil(1 + log_3 9) = 3."""
    brackets, trials = _tuner_compat.hyperband_plan(_hyperband_oracle())
    assert brackets == 3
    assert trials == 3 + (5 + 2) + (9 + 3 + 1)  # brackets 0, 1 and 2, round by round
