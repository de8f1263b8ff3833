"""Export needs no knowledge of keras_norm's internals.

Every registered norm, in a small model with trained-looking weights and statistics and with
keras_norm's defaults (compiled kernels on): `model.export` serves the Keras model's
inference outputs from a graph without XLA ops, and the TensorFlow Lite converter, with its
defaults, converts it into a model whose interpreter gives them too. One model trained with
`fit` shows the training step still runs the compiled kernels while `predict`, an inference
trace and `TFLiteConverter.from_keras_model` do not.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_norm
from keras_norm._math import kernels

SHAPE = (2, 6, 6, 4)
CHANNELS = 8


def _model(name):
    """Conv (or the norm wrapping it) -> norm (-> ReLU) -> pooling -> Dense, built as any
    model or recipe builds a registry norm."""
    entry = keras_norm.spec(name)
    inputs = keras.Input(SHAPE[1:])
    conv = entry.conv or keras.layers.Conv2D
    if entry.kind == "conv_wrapper":
        y = entry.build(CHANNELS, layer=conv(CHANNELS, 3, padding="same", use_bias=False))(inputs)
    else:
        y = entry.build(CHANNELS)(conv(CHANNELS, 3, padding="same", use_bias=False)(inputs))
    if entry.kind != "norm_act":
        y = keras.layers.ReLU()(y)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(y))
    return keras.Model(inputs, outputs, name=f"export_{name}")


def _trained(name, seed):
    """A model whose weights and statistics are away from their initial values: one
    optimizer step through `fit` (the compiled training kernels)."""
    keras.utils.set_random_seed(seed)
    model = _model(name)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (8,) + SHAPE[1:]).astype("float32")
    model.fit(x, rng.normal(size=(8, 3)).astype("float32"), batch_size=4, epochs=1, verbose=0)
    return model


def _perturbed(name, seed):
    """A model whose weights and statistics are away from their initial values, cheaply:
    trainable weights scaled and shifted (positive shifts keep learned epsilons valid), then
    two eager training-mode calls to move the batch statistics' state."""
    keras.utils.set_random_seed(seed)
    model = _model(name)
    rng = np.random.default_rng(seed)
    for weight in model.trainable_weights:
        weight.assign(weight * rng.uniform(0.7, 1.3, weight.shape)
                      + rng.uniform(0.0, 0.3, weight.shape))
    for _ in range(2):
        model(rng.normal(1.0, 2.0, (4,) + SHAPE[1:]).astype("float32"), training=True)
    return model


def _inputs(seed):
    return np.random.default_rng(seed + 100).normal(1.0, 2.0, SHAPE).astype("float32")


def _interpret(flatbuffer, x):
    """The TFLite interpreter's outputs for `x`."""
    with warnings.catch_warnings():
        # TF 2.20+ points to the LiteRT package (not installed); the interpreter still runs.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    (input_detail,), (output_detail,) = (interpreter.get_input_details(),
                                         interpreter.get_output_details())
    interpreter.resize_tensor_input(input_detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_detail["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(output_detail["index"])


@pytest.mark.parametrize("name", keras_norm.available())
def test_norm_exports_and_converts_to_tflite(name, tmp_path):
    """`model.export` serves the Keras model's inference outputs, and the TFLite converter,
    with its defaults, converts that SavedModel (as `from_keras_model` does internally) into
    a model whose interpreter gives them too."""
    assert keras_norm.xla_kernels_enabled()  # the defaults: nothing to turn off first
    model = _perturbed(name, seed=sorted(keras_norm.available()).index(name))
    x = _inputs(0)
    expected = model(x, training=False).numpy()
    assert np.isfinite(expected).all() and np.ptp(expected) > 1e-3
    path = str(tmp_path / name)
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)  # kept: its variables live as long as it does
    np.testing.assert_allclose(loaded.serve(tf.constant(x)), expected, rtol=1e-5, atol=1e-5,
                               err_msg=f"{name}: SavedModel serve")
    for signature in loaded.signatures.values():  # only ops every TensorFlow runtime has
        assert _xla_ops(signature) == ([], []), name
    flatbuffer = tf.lite.TFLiteConverter.from_saved_model(path).convert()
    np.testing.assert_allclose(_interpret(flatbuffer, x), expected, rtol=1e-4, atol=1e-4,
                               err_msg=f"{name}: TFLite interpreter")


def _xla_ops(concrete_function):
    graph = concrete_function.graph.as_graph_def()
    ops = {node.op for node in graph.node}
    ops |= {node.op for f in graph.library.function for node in f.node_def}
    compiled = [f.signature.name for f in graph.library.function
                if f.attr.get("_XlaMustCompile") and f.attr["_XlaMustCompile"].b]
    return sorted(op for op in ops if op.startswith("Xla")), compiled


def test_training_compiles_kernels_and_inference_graphs_hold_none(monkeypatch):
    """`fit` runs the compiled kernels (forward and backward); `predict` and an inference
    trace run plain ops only; `TFLiteConverter.from_keras_model` converts the trained model
    with its defaults and the interpreter matches Keras. (EvoNorm-B0: forward and backward
    kernels of a layer's own, around the shared statistics.)"""
    name = "evonorm_b0"
    decisions = []
    decide = kernels.use_xla_kernels

    def recording():
        decisions.append(decide())
        return decisions[-1]

    monkeypatch.setattr(kernels, "use_xla_kernels", recording)
    model = _trained(name, seed=1)
    assert decisions and all(decisions) and len(decisions) >= 2, decisions
    decisions.clear()
    model.predict(_inputs(1), verbose=0)
    assert decisions and not any(decisions), decisions
    serve = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((None,) + SHAPE[1:], tf.float32))
    assert _xla_ops(serve) == ([], [])
    x = _inputs(1)
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    np.testing.assert_allclose(_interpret(flatbuffer, x), model(x, training=False),
                               rtol=1e-4, atol=1e-4)
