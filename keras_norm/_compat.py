"""Every use of TensorFlow's and Keras's non-public API in keras_norm, in one place.

Each helper below names the non-public symbol it relies on, why no public API does the job,
and what happens without it: a public fallback where one exists, and a one-time
`RuntimeWarning` where the fallback is slower or less accurate (never a silent change).
`tests/test_compat.py` checks every symbol at its private location, so an upgrade of
TensorFlow or Keras that moves one fails a test naming it.

| helper | non-public symbol | without it |
|---|---|---|
| `optimization_barrier` | `tensorflow.compiler.tf2xla.python.xla.optimization_barrier` | no barrier: same values, slower kernels under `jit_compile=True` (warns) |
| `gradient_recording` | `tensorflow.python.eager.record.could_possibly_record` | compiled kernels off: same values, slower training steps (warns) |
| `enclosing_graphs` | `FuncGraph.outer_graph` (TensorFlow's tracing graph class), read from `tf.compat.v1.get_default_graph()` | backward kernels in control-flow gradients run as plain ops (warns) |
| `xla_call_arguments` | cond_v2's capture of tensors into an XLA function call | (a workaround, no symbol) |
| `fused_batch_norm` | `tf.compat.v1.nn.fused_batch_norm` (TF1 endpoint) | `tf.raw_ops.FusedBatchNormV3`, the same op |
| `flatten_layers` | `keras.Layer._flatten_layers` | a walk over `Model.layers` and `Wrapper.layer` (warns: misses custom layers' sublayers) |
| `no_autocast` | `keras.src.backend.AutocastScope` | float16 kernel reads under mixed precision (warns) |
| `causal_padding` | replaces `Conv1D._compute_causal_padding` | (public arithmetic, checked against Keras) |
| `override_call`, `restore_call` | `Layer.__call__` dispatching to an instance's own `call` | (no public hook exists) |
"""  # noqa: E501 (a table)

import collections
import inspect
import warnings

import keras
import tensorflow as tf

_WARNED = set()


def warn_once(key, message):
    """`warnings.warn(message, RuntimeWarning)` the first time `key` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"keras_norm: {message}", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------ XLA optimization barrier
#: Where the optimization barrier lives (no public endpoint, not even in `tf.raw_ops`).
OPTIMIZATION_BARRIER = "tensorflow.compiler.tf2xla.python.xla.optimization_barrier"

try:
    from tensorflow.compiler.tf2xla.python.xla import optimization_barrier as _xla_barrier
except ImportError:  # pragma: no cover - depends on the TensorFlow build
    _xla_barrier = None


def optimization_barrier(*tensors):
    """`tensors` (a list) passed through XLA's optimization barrier, which keeps XLA from
    merging the arithmetic on either side of it (see `keras_norm._math.kernels._behind_barrier`).

    Without the barrier op the tensors are returned as they are: the same values, but a
    kernel inlined into a `jit_compile=True` model may be merged with its neighbours and run
    slower, so this warns once.
    """
    if _xla_barrier is None:
        warn_once("barrier", f"this TensorFlow has no {OPTIMIZATION_BARRIER}; compiled kernels "
                  "inside jit_compile=True models run without it (same results, possibly "
                  "slower)")
        return list(tensors)
    return list(_xla_barrier(*tensors))


# ---------------------------------------------------------------------- gradient recording
#: TensorFlow's test for an active gradient tape (no public endpoint).
COULD_POSSIBLY_RECORD = "tensorflow.python.eager.record.could_possibly_record"

try:
    from tensorflow.python.eager.record import could_possibly_record as _could_possibly_record
except ImportError:  # pragma: no cover - depends on the TensorFlow version
    _could_possibly_record = None


def gradient_recording():
    """Whether a gradient tape is recording the operations run now (`tf.GradientTape`, as in
    every Keras training step).

    What keras_norm's compiled kernels use to tell a training step, where their closed-form
    gradients pay off, from an inference trace (`predict`, `model.export`, the TFLite
    converter), which must hold only ordinary TensorFlow ops. Without TensorFlow's own test
    this answers False (the kernels run as plain ops: same results, slower training steps)
    and warns once.
    """
    if _could_possibly_record is None:
        warn_once("record", f"this TensorFlow has no {COULD_POSSIBLY_RECORD}; keras_norm's "
                  "XLA-compiled kernels are off (same results, slower training steps)")
        return False
    return bool(_could_possibly_record())


#: The attribute of a `tf.function`'s graph that names the graph it is traced in.
OUTER_GRAPH = "FuncGraph.outer_graph"


def enclosing_graphs():
    """The `tf.function` graphs being traced now, innermost first: the current one (e.g. a
    `tf.cond` branch or a gradient's graph) and each one it is traced inside.

    `tf.compat.v1.get_default_graph()` is the graph ops go into; a traced function's graph
    (TensorFlow's `FuncGraph`) names the graph it is traced inside as `outer_graph`, an
    attribute of a class TensorFlow does not export. Graphs without it (the global graph
    outside any function) end the chain and are not returned. Empty when executing eagerly.
    """
    if tf.executing_eagerly():
        return []
    graph = tf.compat.v1.get_default_graph()
    graphs = []
    while graph is not None and hasattr(graph, "outer_graph") and graph not in graphs:
        graphs.append(graph)
        graph = graph.outer_graph
    if not graphs and type(graph).__name__ == "FuncGraph":
        warn_once("outer_graph", f"this TensorFlow's graphs have no {OUTER_GRAPH}; backward "
                  "kernels inside control flow run as plain ops (same results, slower)")
        graphs.append(graph)
    return graphs


def xla_call_arguments(tensors):
    """`tensors` made safe to pass to an XLA-compiled `tf.function` (a list).

    A compiled function captures its arguments into the caller's graph inside an XLA
    context; in the gradient graph of a `tf.cond` branch, capturing a forward-pass tensor
    that way takes cond_v2's XLA-only capture path (TensorFlow internals) and the gradient
    fails ("Could not find external tensor capture"). An identity outside the call captures
    it the ordinary way (and copies nothing).
    """
    return [tf.identity(t) for t in tensors]


# -------------------------------------------------------------------- fused batch norm op
#: The TF1 endpoint of the fused batch-norm kernel (TF2 has no `tf.nn` one).
FUSED_BATCH_NORM = "tf.compat.v1.nn.fused_batch_norm"


def fused_batch_norm(x, scale, offset, epsilon):
    """TensorFlow's fused batch-norm kernel in training mode on an NHWC tensor:
    `(outputs, batch mean, Bessel-corrected batch variance)`.

    `tf.compat.v1.nn.fused_batch_norm` where TensorFlow still has it, else the op it calls,
    `tf.raw_ops.FusedBatchNormV3` (public, the same kernel and gradient).
    """
    v1 = getattr(getattr(getattr(tf.compat, "v1", None), "nn", None), "fused_batch_norm", None)
    if v1 is not None:
        return v1(x, scale, offset, epsilon=epsilon, is_training=True)
    empty = tf.constant([], x.dtype)
    outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
    return outputs, mean, variance


# ------------------------------------------------------------------------ layers of a model
#: Keras's own walk over a layer's sublayers, nested ones included.
FLATTEN_LAYERS = "keras.Layer._flatten_layers"


def _public_sublayers(layer):
    """The direct sublayers public API shows: a model's `layers`, a wrapper's `layer`."""
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    if isinstance(layer, keras.layers.Wrapper):
        return [layer.layer]
    return []


def flatten_layers(model):
    """Every layer inside `model` (not `model` itself), nested ones included, each once, in
    the order of Keras's `_flatten_layers(include_self=False, recursive=True)`.

    Keras 3 has no public way to list a layer's sublayers beyond `Model.layers`: the private
    walk also finds layers held by custom layers. Without it, the same walk runs over the
    public `Model.layers` and `Wrapper.layer` only, and this warns once.
    """
    walk = getattr(model, "_flatten_layers", None)
    if walk is not None and {"include_self", "recursive"} <= set(
            inspect.signature(walk).parameters):
        return list(walk(include_self=False, recursive=True))
    warn_once("flatten", f"this Keras has no {FLATTEN_LAYERS}(include_self, recursive); "
              "layers nested inside custom layers are not found")
    # Keras's order: depth first, each layer's sublayers pushed with `extendleft`.
    layers, seen = [], set()
    queue = collections.deque(_public_sublayers(model))
    while queue:
        layer = queue.popleft()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        layers.append(layer)
        queue.extendleft(_public_sublayers(layer))
    return layers


# ----------------------------------------------------------------------------- autocasting
#: Keras's context manager that sets (here: clears) the dtype variables are read in.
AUTOCAST_SCOPE = "keras.src.backend.AutocastScope"

try:
    from keras.src.backend import AutocastScope as _AutocastScope
except ImportError:  # pragma: no cover - depends on the Keras version
    _AutocastScope = None


def no_autocast():
    """A context in which Keras variables read in their own dtype (no mixed-precision
    autocast): Keras 3 has no public way to read a float32 variable as float32 inside a
    float16 layer call. Without `AutocastScope` the context does nothing (variables read in
    the compute dtype) and this warns once."""
    if _AutocastScope is None:
        warn_once("autocast", f"this Keras has no {AUTOCAST_SCOPE}; under mixed precision "
                  "variables are read in float16")
        return _NullContext()
    return _AutocastScope(None)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


# ----------------------------------------------------------------------- causal padding
def causal_padding(layer):
    """The input padding of a causal `keras.layers.Conv1D`: `dilation * (kernel - 1)` steps
    before the sequence, on its time axis (what Keras's private `_compute_causal_padding`
    returns, computed from the layer's public attributes)."""
    left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
    if layer.data_format == "channels_last":
        return [[0, 0], [left, 0], [0, 0]]
    return [[0, 0], [0, 0], [left, 0]]


# ------------------------------------------------------------------ instance-level `call`
#: What `override_call` relies on: Keras's `Layer.__call__` calls `self.call`, so a `call`
#: set on the instance replaces the class's for that layer only.
INSTANCE_CALL = "keras.Layer.__call__ -> self.call"


def override_call(layer, call):
    """Makes `layer(...)` run `call` (same arguments as the layer's own `call`) instead of its
    class's `call`; returns what `restore_call` needs to undo it.

    Keras 3 has no public pre-call hook or per-instance behaviour switch for its own layers
    (e.g. to make `keras.layers.BatchNormalization` use batch statistics at inference), so
    the instance attribute shadows the method; Keras reads `self.call` at every call.
    """
    previous = layer.__dict__.get("call")
    layer.call = call
    return previous


def restore_call(layer, previous):
    """Undoes `override_call(layer, ...)`, which returned `previous`."""
    del layer.call
    if previous is not None:
        layer.call = previous
