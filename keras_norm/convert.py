"""`convert(model, norm)`: swap every batch normalization of a Keras model for another norm.

Like PyTorch's `convert_sync_batchnorm`, but for any registered normalization and for Keras
Sequential and Functional models (e.g. `keras.applications` networks).
"""

import inspect

import keras
import numpy as np

from keras_norm import _compat, registry

# Arguments of a BatchNormalization that carry over to the new layer when it takes them.
_CARRIED_ARGUMENTS = ("axis", "momentum", "epsilon", "center", "scale")


def _flat_layers(model):
    return _compat.flatten_layers(model)


def _is_batch_norm(layer):
    return isinstance(layer, keras.layers.BatchNormalization) or (
        type(layer).__name__ == "BatchNormalization" and hasattr(layer, "moving_variance"))


def _replacement_factory(norm, kwargs):
    entry = registry.spec(norm) if (norm is None or isinstance(norm, str)) else None
    if entry is not None and entry.kind == "conv_wrapper":
        raise ValueError(
            f"convert: {entry.name!r} wraps the convolution itself (kind 'conv_wrapper'), so it "
            "cannot replace a BatchNormalization layer in place; build the model with it "
            f"instead. Received: norm={norm!r}")

    def build(bn):
        channels = int(bn.moving_mean.shape[0]) if bn.built else None
        probe = registry.get(norm, channels=channels, **kwargs)
        accepted = set(inspect.signature(type(probe).__init__).parameters)
        carried = {name: getattr(bn, name) for name in _CARRIED_ARGUMENTS
                   if name in accepted and name not in kwargs}
        return registry.get(norm, channels=channels, name=bn.name, **{**carried, **kwargs})

    return build


def _copy_weights(source, target):
    """Copies weights from `source` to `target` layer by weight name where shapes match.

    A renorm layer made from a plain BN gets its renorm statistics from the moving ones
    (moving/renorm stddev = sqrt(moving variance), renorm mean = moving mean).
    """
    values = {w.path.split("/")[-1]: w.numpy() for w in source.weights}
    if "moving_variance" in values:
        values.setdefault("moving_stddev", np.sqrt(values["moving_variance"]))
        values.setdefault("renorm_stddev", np.sqrt(values["moving_variance"]))
        values.setdefault("renorm_mean", values.get("moving_mean"))
    copied = []
    for variable in target.weights:
        name = variable.path.split("/")[-1]
        value = values.get(name)
        if value is not None and tuple(value.shape) == tuple(variable.shape):
            variable.assign(value)
            copied.append(name)
    return copied


def convert(model, norm, *, copy_weights=True, **kwargs):
    """Returns a copy of `model` with every BatchNormalization replaced by `norm`.

    Both Keras's `BatchNormalization` and keras_norm's are replaced, in nested models too. Each
    new layer keeps the replaced layer's name and, where it takes them, its `axis`,
    `momentum`, `epsilon`, `center` and `scale` (your `kwargs` win). Weights are carried over
    by name where they map: BN -> sync/ghost/renorm BN keeps gamma, beta and the moving
    statistics (renorm statistics start from them); BN -> group/layer norm keeps gamma and
    beta; every other layer keeps all its weights. The original model is not modified.

    `"norm_act"` norms (FRN, EvoNorm) replace only the BN: the activation after it stays.
    `"conv_wrapper"` norms (Cross-Iteration BN) cannot replace a BN in place.

    Args:
        model: A built Sequential or Functional Keras model (subclassed models cannot be
            cloned by Keras).
        norm: Anything `keras_norm.get` accepts: a registered name, a layer class, a callable
            or a serialized layer dict.
        copy_weights: Copy the weights that map (see above). Defaults to `True`.
        **kwargs: Passed to every new normalization layer.

    Returns:
        A new `keras.Model`.

    Example:

    >>> import keras, keras_norm
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
    ...                           keras.layers.BatchNormalization(), keras.layers.ReLU()])
    >>> synced = keras_norm.convert(model, "sync_batch")
    >>> synced.layers[1].synchronized
    True
    """
    if not isinstance(model, keras.Model) or not (
            isinstance(model, keras.Sequential) or type(model).__name__ == "Functional"):
        raise ValueError("convert: `model` must be a Sequential or Functional keras.Model "
                         "(subclassed models cannot be cloned). "
                         f"Received: model of type {type(model).__name__}")
    if not model.built:
        raise ValueError(f"convert: build the model first (call it on data or give it an "
                         f"Input). Received: unbuilt model {model.name!r}")
    replace = _replacement_factory(norm, kwargs)

    def clone(layer):
        if _is_batch_norm(layer):
            return replace(layer)
        return layer.__class__.from_config(layer.get_config())

    def call(layer, *args, **call_kwargs):
        # A BN is called with `mask=`; its replacement may not take one.
        if "mask" in call_kwargs and "mask" not in inspect.signature(layer.call).parameters:
            call_kwargs.pop("mask")
        return layer(*args, **call_kwargs)

    options = {} if isinstance(model, keras.Sequential) else {"call_function": call}
    converted = keras.models.clone_model(model, clone_function=clone, recursive=True, **options)
    if copy_weights:
        old_layers, new_layers = _flat_layers(model), _flat_layers(converted)
        if len(old_layers) != len(new_layers):
            raise RuntimeError("convert: the cloned model's layers do not match the original's.")
        for old, new in zip(old_layers, new_layers):
            if isinstance(old, keras.Model):
                continue  # nested models: their own layers are in the flattened list
            if _is_batch_norm(old):
                _copy_weights(old, new)
            elif old.weights:
                new.set_weights(old.get_weights())
    return converted
